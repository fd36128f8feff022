"""One linear layer → 1-bit weights with N:M sparsity, in GPTQ order (ALGORITHMS.md §3).

With H = XᵀX of the layer's calibration inputs, damped by `damp`·mean(diag H), and U the upper
Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), the input columns are compressed in blocks of `block_size`:

  1. mask and binarize the block (variant below) → Ŵ₁;
  2. push its error onto the columns not yet compressed (lazy batch update, as GPTQ and BiLLM): column
     j's error e_j = (w_j − ŵ_j) / U_jj, w_j updated by the errors of the block's earlier columns, i.e.
         E · U₁ = W₁ − Ŵ₁   (U₁ the block's upper-triangular diagonal block),   W[:, later] −= E · U[block, later]

Variants of step 1:
  * `binarize` — ARB on every entry (no pruning: the ~1-bit reference point);
  * `nm_then_binarize` — the N:M mask by saliency w²/U_jj² in one shot, then ARB from scratch;
  * `pbs2p` — SPBO: ARB on the whole block, then reach N:M in `spbo_steps` steps, each pruning more
    entries of every group of M and re-running the ARB refinement (warm) on the entries still kept.
    `spbo_metric` ranks what the next step prunes: `saliency` (w²/U_jj², fixed), or `error` — the
    Hessian-weighted error that pruning adds given the current binarization,
        (w² − (w − ŵ)²) / U_jj² ,
    which is negative where binarization fits a weight worse than 0 does.

α and μ are rounded to float16 (what the packed export stores) before Ŵ is formed, so the errors fed
back, and the model evaluated, are exactly those of the exported file.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from tyr_jax.binarization import arb, nm

VARIANTS = ("pbs2p", "nm_then_binarize", "binarize")
SPBO_METRICS = ("saliency", "error")
SCALE_DTYPE = jnp.float16


class BinaryLinear(NamedTuple):
    """A compressed [O, I] weight: ŵ = α·B + μ on kept entries, 0 elsewhere; α, μ per row and block."""

    keep_oi: Bool[Array, "O I"]
    sign_oi: Bool[Array, "O I"]          # True: +1 (meaningless where not kept)
    alpha_ob: Float[Array, "O NB"]       # float16
    mu_ob: Float[Array, "O NB"]          # float16

    def dense(self, block_size: int) -> Float[Array, "O I"]:
        """The weight this stands for, fp32."""
        return dense_weight(self.keep_oi, self.sign_oi, self.alpha_ob, self.mu_ob, block_size)


def dense_weight(keep_oi, sign_oi, alpha_ob, mu_ob, block_size: int):
    """ŵ_rj = α_r,b(j) · (±1) + μ_r,b(j) where kept, else 0 (fp32); works on NumPy and JAX arrays."""
    xp = jnp if isinstance(keep_oi, jax.Array) else np
    cols = keep_oi.shape[1]
    block_of = xp.arange(cols) // block_size
    alpha = alpha_ob.astype(xp.float32)[:, block_of]
    mu = mu_ob.astype(xp.float32)[:, block_of]
    return xp.where(keep_oi, alpha * xp.where(sign_oi, 1.0, -1.0).astype(xp.float32) + mu, 0.0).astype(xp.float32)


def check_pattern(n: int, m: int, block_size: int) -> None:
    """Refuses an N:M pattern that cannot be, naming the key."""
    if not 1 <= n <= m:
        raise ValueError(f"pbs2p.n must lie in [1, pbs2p.m = {m}], got N = {n}")
    if block_size % m:
        raise ValueError(f"pbs2p.block_size ({block_size}) must be a multiple of pbs2p.m ({m})")


def check_settings(d_in: int, n: int, m: int, block_size: int) -> None:
    """Refuses N:M settings that cannot apply to a layer with `d_in` inputs, naming the key."""
    check_pattern(n, m, block_size)
    if d_in % m:
        raise ValueError(f"pbs2p.m ({m}) must divide every layer's input size; {d_in} is not a multiple")


def upper_cholesky_inverse(hessian_ii: Float[Array, "I I"], damp: float) -> Float[Array, "I I"]:
    """U with UᵀU = (H + damp·mean(diag H)·I)⁻¹ (dead inputs, diag H = 0, get H_jj = 1 first)."""
    h = hessian_ii.astype(jnp.float32)
    dead = jnp.diagonal(h) == 0
    h = jnp.where(jnp.diag(dead), 1.0, h)
    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(h.shape[0], dtype=jnp.float32)
    chol = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(h.shape[0], dtype=jnp.float32))
    return jnp.linalg.cholesky(hinv).T


def _mask_and_binarize(w_rc, u_diag_c, valid_c, dead_c, *, variant, n, m, arb_iters, spbo_steps, spbo_metric):
    """Mask and binary weights of one block of columns (step 1 of the module docstring); dead inputs
    (never active in calibration) are the first pruned."""
    keep_all = jnp.broadcast_to(valid_c[None, :], w_rc.shape)
    if variant == "binarize" or n == m:
        return keep_all, arb.binarize(w_rc, keep_all, arb_iters)
    sal = jnp.where(dead_c[None, :], -jnp.inf, nm.saliency(w_rc, u_diag_c))
    if variant == "nm_then_binarize":
        keep = nm.nm_keep(sal, m - n, m) & keep_all
        return keep, arb.binarize(w_rc, keep, arb_iters)
    keep, b = keep_all, arb.binarize(w_rc, keep_all, arb_iters)
    for pruned in nm.spbo_schedule(n, m, spbo_steps):
        if spbo_metric == "error":
            w = w_rc.astype(jnp.float32)
            score = (w * w - jnp.square(w - arb.reconstruct(b, keep))) / jnp.square(u_diag_c)[None, :]
            score = jnp.where(dead_c[None, :], -jnp.inf, score)
        else:
            score = sal
        keep = nm.nm_keep(jnp.where(keep, score, -jnp.inf), pruned, m) & keep_all
        b = arb.arb_refine(w_rc, keep, b, arb_iters)
    return keep, b


@functools.partial(jax.jit, static_argnames=("variant", "n", "m", "block_size", "damp", "arb_iters",
                                             "spbo_steps", "spbo_metric"))
def compress_linear(w_oi: Float[Array, "O I"], hessian_ii: Float[Array, "I I"], *, variant: str = "pbs2p",
                    n: int = 6, m: int = 8, block_size: int = 128, damp: float = 0.01, arb_iters: int = 15,
                    spbo_steps: int | None = None, spbo_metric: str = "error") -> BinaryLinear:
    """Compresses one weight [O, I] given H = Σ xᵀx of its inputs [N, I] (module docstring).

    Args:
      w_oi: the weight in [outputs, inputs] layout, any float dtype.
      hessian_ii: Σ xᵀx over the calibration tokens (fp32); its scale does not matter.
      variant: `pbs2p`, `nm_then_binarize` or `binarize`.
      n, m: keep at most N of every M consecutive inputs of a row (`binarize`: ignored).
      block_size: input columns per block (α, μ per row and block; a ragged last block is padded).
      damp: relative damping of H.
      arb_iters: ARB refinement rounds per binarization.
      spbo_steps: SPBO steps (default M − N); `spbo_metric`: `saliency` or `error`.
    Returns:
      BinaryLinear with keep / sign [O, I] and float16 α, μ [O, ceil(I / block_size)].
    """
    o, i = w_oi.shape
    check_settings(i, n, m, block_size)
    steps = (m - n) if spbo_steps is None else spbo_steps
    nb = -(-i // block_size)
    pad = nb * block_size - i
    with jax.default_matmul_precision("highest"):
        dead = jnp.pad(jnp.diagonal(hessian_ii) == 0, (0, pad))
        w = jnp.pad(jnp.where(dead[None, :i], 0.0, w_oi.astype(jnp.float32)), ((0, 0), (0, pad)))
        # Padding columns (a ragged last block) are zero weights with an identity factor: never kept.
        u = jnp.pad(upper_cholesky_inverse(hessian_ii, damp), ((0, pad), (0, pad)))
        u = u + jnp.diag(jnp.arange(nb * block_size) >= i).astype(jnp.float32)
        valid = jnp.arange(nb * block_size) < i

        def one_block(w, b):
            start = b * block_size
            w1 = jax.lax.dynamic_slice_in_dim(w, start, block_size, axis=1)
            u_rows = jax.lax.dynamic_slice_in_dim(u, start, block_size, axis=0)      # [bs, I]
            u_diag = jax.lax.dynamic_slice_in_dim(jnp.diagonal(u), start, block_size)
            keep, bits = _mask_and_binarize(w1, u_diag, jax.lax.dynamic_slice_in_dim(valid, start, block_size),
                                            jax.lax.dynamic_slice_in_dim(dead, start, block_size),
                                            variant=variant, n=n, m=m, arb_iters=arb_iters, spbo_steps=steps,
                                            spbo_metric=spbo_metric)
            bits = bits._replace(alpha_r=bits.alpha_r.astype(SCALE_DTYPE), mu_r=bits.mu_r.astype(SCALE_DTYPE))
            # GPTQ's errors for a block whose values are fixed: e_j = (w_j − ŵ_j) / U_jj with w_j updated by
            # the block's earlier columns, i.e. E·U₁ = W₁ − Ŵ₁ (U₁ upper triangular): one triangular solve.
            u_block = jax.lax.dynamic_slice_in_dim(u_rows, start, block_size, axis=1)
            err = jax.scipy.linalg.solve_triangular(u_block, (w1 - arb.reconstruct(bits, keep)).T, trans="T").T
            # U is upper triangular: columns before the block get nothing, the block's own (already
            # compressed) columns are never read again, so the whole row band can be applied.
            w = w - err @ u_rows
            return w, (keep, bits.sign_rc, bits.alpha_r, bits.mu_r)

        _, (keep, sign, alpha, mu) = jax.lax.scan(one_block, w, jnp.arange(nb))
    to_oi = lambda x: jnp.moveaxis(x, 0, 1).reshape(o, nb * block_size)[:, :i]  # noqa: E731  [NB,O,bs]→[O,I]
    return BinaryLinear(to_oi(keep), to_oi(sign), alpha.T, mu.T)


def output_error(w_oi, w_hat_oi, hessian_ii) -> Float[Array, ""]:
    """Relative output error ‖X W − X Ŵ‖² / ‖X W‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) ([O, I] layout)."""
    w = w_oi.astype(jnp.float32)
    delta = w - w_hat_oi.astype(jnp.float32)
    h = hessian_ii.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
        return jnp.sum((delta @ h) * delta) / jnp.sum((w @ h) * w)
