"""The Týr-the-Pruner local pruner (ALGORITHMS.md §1.1): OBS with a first-order term, progressive rounds
and a final refit of the kept weights.

With H = XᵀX (fp32), H_d = H + λ·I (λ = damp · mean(diag H), step 2) and G = H_d W₀, for a unit g (its
channel rows) the score is

    score_g = Σ_ij W_g ⊙ [ (H⁻¹_gg)⁻¹ W_g / 2 + G_g ]                      (one channel: ‖W_p‖²/(2H⁻¹_pp) + G_p·W_p)

with H⁻¹ the inverse of H_d, and units are removed in rounds of `round_size` lowest scores P, each
followed by the OBS update

    W −= H⁻¹[:,P] (H⁻¹_PP)⁻¹ W_P ,   H⁻¹ −= H⁻¹[:,P] (H⁻¹_PP)⁻¹ H⁻¹[P,:] ,   W_P = 0 .

Channels with diag(H) = 0 are dead and go first. The kept set K of every level is refit (step 5):

- `refit="towards_w0"` (default; the reference code, which damps H in place before it computes G):
  W_K = (H_d)_KK⁻¹ (H_d W₀)_K, ridge regression towards W₀,
  argmin ‖X_K W_K − X W₀‖² + λ‖W_K − W₀_K‖²; the 0% copy is W₀ exactly. G = H_d W₀ in the score too.
- `refit="towards_zero"` (this project's default before 2026-12-03): G = H W₀ from the undamped H, in
  the score and the refit, W_K = (H_d)_KK⁻¹ G_K: ridge with penalty λ‖W_K‖², which shrinks even the 0%
  copy towards 0.
- `refit="exact"`: G = H W₀ and W_K = (H_KK)⁻¹ G_K (a 1e-6 relative jitter keeps the Cholesky from
  failing), exact least squares to X W₀; it overfits the calibration text.

Measured with `towards_zero` against `exact` (BENCHMARKS.md): SmolLM2-135M at a uniform 25%, held-out
perplexity 70.8 vs 331.6 with 4,096 calibration tokens and 52.5 vs 62.9 with 32,768. Removal is greedy,
so a level with r units removed is a prefix of a level with more: one pass along the removal path serves
all levels, and H⁻¹ is factorised once. Rounds never straddle a level (a round ends at the next removal
count at the latest), so recording the units removed before each round, `order_u`, gives every level's
kept set as `order_u ≥ r`. The removal counts are traced (a `lax.while_loop` runs as many rounds as the
largest count needs), so one compiled pruner serves every layer and coarse-to-fine iteration.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tyr_jax.pruning.base import LevelResult, Removals, SublayerStats, register, validate_removals

# The final refit's variants (ALGORITHMS.md §1.1 step 5; the module docstring).
REFITS = ("towards_w0", "towards_zero", "exact")


def damped_hessian(hessian_ii, damp: float):
    """H + damp · mean(diag H) · I (a tiny floor keeps an all-dead sublayer invertible)."""
    diag_mean = jnp.mean(jnp.diagonal(hessian_ii))
    eye = jnp.eye(hessian_ii.shape[0], dtype=jnp.float32)
    return hessian_ii + (damp * diag_mean + 1e-10) * eye


def _spd_inverse(a):
    return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a), jnp.eye(a.shape[0], dtype=a.dtype))


def unit_scores(w_io, hinv_ii, g_io, alive_u, dead_u, unit_size: int, *, first_order: bool = True,
                hessian_term: bool = True):
    """score_g for every unit (removed units +inf, dead units −inf)."""
    num_units = w_io.shape[0] // unit_size
    w = w_io.reshape(num_units, unit_size, -1)
    score = jnp.zeros((num_units,), jnp.float32)
    if hessian_term:
        blocks = hinv_ii.reshape(num_units, unit_size, num_units, unit_size)
        blocks = jnp.moveaxis(jnp.diagonal(blocks, axis1=0, axis2=2), -1, 0)   # [U, u, u]
        eye = jnp.eye(unit_size, dtype=jnp.float32)
        blocks = jnp.where(alive_u[:, None, None], blocks, eye)               # removed: any SPD block
        if unit_size == 1:
            solved = w / blocks
        else:
            solved = jax.vmap(lambda b, x: jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(b), x))(blocks, w)
        score = score + 0.5 * jnp.sum(w * solved, axis=(1, 2))
    if first_order:
        score = score + jnp.sum(w * g_io.reshape(w.shape), axis=(1, 2))
    score = jnp.where(dead_u, -jnp.inf, score)
    return jnp.where(alive_u, score, jnp.inf)


@register("tyr")
def tyr_prune(w_io, stats: SublayerStats, *, unit_size: int, removals: Removals, damp: float = 0.01,
              round_size: int = 1, first_order: bool = True, hessian_term: bool = True,
              refit: str = "towards_w0") -> LevelResult:
    """Týr local pruning of one output projection at every removal count of `removals`.

    Args:
      w_io: dense output-projection weights [d_in, d_out].
      stats: calibration statistics of its inputs (H = Σ xᵀx).
      unit_size: channels per unit (G·H for a KV group, 1 for an MLP channel).
      removals: units to remove, one pruned copy each: int32 [E], traced or not (a tuple works too);
        traced counts cannot be checked and are clipped to [0, U].
      damp: relative damping of H (ALGORITHMS.md §1.1 step 2).
      round_size: units removed per progressive round (1 KV group, 16 channels in the paper).
      first_order, hessian_term: keep the G and the OBS term of the score (ablations).
      refit: "towards_w0" (default, the reference's), "towards_zero" or "exact": which G the score and
        the refit use and which H the refit solves with (module docstring; ALGORITHMS.md §1.1 step 5).
    Returns:
      LevelResult with refit weights (removed rows exactly 0) in the dtype of `w_io`.
    """
    d_in = w_io.shape[0]
    num_units = d_in // unit_size
    if d_in % unit_size:
        raise ValueError(f"d_in {d_in} is not a multiple of unit_size {unit_size}")
    validate_removals(num_units, removals)
    if round_size < 1:
        raise ValueError(f"round_size must be >= 1, got {round_size}")
    if refit not in REFITS:
        raise ValueError(f"refit must be one of {', '.join(REFITS)}, got {refit!r}")
    with jax.default_matmul_precision("highest"):
        removals_e = jnp.clip(jnp.asarray(removals, jnp.int32), 0, num_units)
        return _tyr_prune(w_io, stats, unit_size, removals_e, damp, round_size, first_order, hessian_term, refit)


def _tyr_prune(w_io, stats, unit_size, removals_e, damp, round_size, first_order, hessian_term, refit):
    d_in = w_io.shape[0]
    num_units = d_in // unit_size
    w0 = w_io.astype(jnp.float32)
    hessian = stats.hessian_ii.astype(jnp.float32)
    hd = damped_hessian(hessian, damp)
    g_io = (hd if refit == "towards_w0" else hessian) @ w0
    h_refit = damped_hessian(hessian, 1e-6) if refit == "exact" else hd  # 1e-6: a jitter only, for Cholesky
    dead_u = jnp.all((jnp.diagonal(hessian) == 0).reshape(num_units, unit_size), axis=1)

    def one_round(carry):
        """Removes the `count` lowest-scoring units, count = min(round_size, next removal count − done)."""
        w, hinv, alive, order_u, done = carry
        count = jnp.minimum(round_size, jnp.min(jnp.where(removals_e > done, removals_e, num_units)) - done)
        score = unit_scores(w, hinv, g_io, alive, dead_u, unit_size, first_order=first_order,
                            hessian_term=hessian_term)
        _, picked = jax.lax.top_k(-score, min(round_size, num_units))    # lowest scores first
        valid = jnp.arange(picked.shape[0]) < count
        chans = (picked[:, None] * unit_size + jnp.arange(unit_size)).reshape(-1)
        valid_c = jnp.repeat(valid, unit_size)
        s_ip = jnp.where(valid_c[None, :], hinv[:, chans], 0.0)
        a_pp = hinv[chans][:, chans]
        a_pp = jnp.where(valid_c[:, None] & valid_c[None, :], a_pp, jnp.eye(chans.shape[0], dtype=jnp.float32))
        rhs = jnp.where(valid_c[:, None], jnp.concatenate([w[chans], hinv[chans]], axis=1), 0.0)
        coef = s_ip @ jnp.linalg.solve(a_pp, rhs)                      # H⁻¹[:,P] (H⁻¹_PP)⁻¹ [W_P | H⁻¹_P:]
        w, hinv = w - coef[:, : w.shape[1]], hinv - coef[:, w.shape[1]:]
        removed_u = jnp.zeros((num_units,), bool).at[picked].max(valid)
        removed_c = jnp.repeat(removed_u, unit_size)
        w = jnp.where(removed_c[:, None], 0.0, w)
        hinv = jnp.where(removed_c[:, None] | removed_c[None, :], 0.0, hinv)
        return w, hinv, alive & ~removed_u, jnp.where(removed_u, done, order_u), done + count

    # order_u: units removed before the round that removed u (num_units if never removed).
    start = (w0, _spd_inverse(hd), jnp.ones((num_units,), bool), jnp.full((num_units,), num_units, jnp.int32),
             jnp.zeros((), jnp.int32))
    order_u = jax.lax.while_loop(lambda c: c[-1] < jnp.max(removals_e), one_round, start)[3]
    keep_eu = order_u[None, :] >= removals_e[:, None]

    def refit_level(keep_u):
        """W_K = (h_refit_KK)⁻¹ G_K with removed rows 0, as one SPD solve with identity on removed channels.

        towards_w0 solves for the correction to W₀ instead, W_K = W₀_K + (H_d)_KK⁻¹ (H_d)_KR W₀_R (R the
        removed rows; the same solution, since G_K = (H_d)_KK W₀_K + (H_d)_KR W₀_R): the solve's fp32 error
        scales with the correction, not with W₀, and the 0% copy is W₀ bit for bit."""
        m = jnp.repeat(keep_u, unit_size)
        a = jnp.where(m[:, None] & m[None, :], h_refit, jnp.diag(jnp.where(m, 0.0, 1.0)))
        if refit == "towards_w0":
            base = jnp.where(m[:, None], w0, 0.0)
            rhs = jnp.where(m[:, None], hd @ (w0 - base), 0.0)
        else:
            base, rhs = 0.0, jnp.where(m[:, None], g_io, 0.0)
        return base + jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a), rhs)

    w_eio = jax.lax.map(refit_level, keep_eu)
    return LevelResult(keep_eu=keep_eu, w_eio=w_eio.astype(w_io.dtype), bias_eo=None)
