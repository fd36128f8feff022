"""Baseline local pruners: magnitude, Wanda-sp and FLAP (paper Table 1 baselines).

All three score units once from W and the calibration statistics, then drop the lowest-scoring units
for every removal count at once (`keep_lowest_removed`); only FLAP changes anything besides the mask
(an output bias). Scores are computed in fp32 whatever the dtype of W.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from tyr_jax.pruning.base import (LevelResult, Removals, SublayerStats, keep_lowest_removed, masked_rows, register,
                                  unit_view, validate_removals)


def _check(w_io: Array, stats: SublayerStats, unit_size: int, removals: Removals) -> None:
    d_in = w_io.shape[0]
    if unit_size < 1 or d_in % unit_size:
        raise ValueError(f"unit_size {unit_size} must divide d_in {d_in}")
    if stats.hessian_ii.shape != (d_in, d_in) or stats.sum_i.shape != (d_in,):
        raise ValueError(f"stats are for d_in {stats.sum_i.shape}, W has d_in {d_in}")
    validate_removals(d_in // unit_size, removals)


def _unit_sum(score_i: Array, unit_size: int) -> Array:
    return unit_view(score_i, unit_size).sum(axis=1)


@register("magnitude")
def magnitude(w_io: Float[Array, "I O"], stats: SublayerStats, *, unit_size: int,
              removals: Removals) -> LevelResult:
    """Removes the units with the smallest weight norm; no update.

    score_u = ‖W_u‖_F = sqrt(Σ_{i∈u, o} W_io²)   (structured magnitude pruning, e.g. Li et al. 2017).
    """
    _check(w_io, stats, unit_size, removals)
    w = w_io.astype(jnp.float32)
    score_u = jnp.sqrt(_unit_sum(jnp.sum(w * w, axis=1), unit_size))
    keep_eu = keep_lowest_removed(score_u, removals)
    return LevelResult(keep_eu, masked_rows(w_io, keep_eu, unit_size), None)


@register("wanda_sp")
def wanda_sp(w_io: Float[Array, "I O"], stats: SublayerStats, *, unit_size: int,
             removals: Removals) -> LevelResult:
    """Wanda-sp: weight magnitude times input-activation norm, summed over a unit; no update.

    score_u = Σ_{j∈u} Σ_o |W_jo| · ‖X_j‖₂,  ‖X_j‖₂ = sqrt(H_jj)
    (Sun et al. 2024, "A Simple and Effective Pruning Approach for LLMs", Eq. 1, structured variant
    as used by An et al. 2024 and by the Týr paper's baselines).
    """
    _check(w_io, stats, unit_size, removals)
    x_norm_i = jnp.sqrt(jnp.maximum(jnp.diagonal(stats.hessian_ii), 0.0))
    keep_eu = keep_lowest_removed(wanda_sp_scores(w_io, x_norm_i, unit_size), removals)
    return LevelResult(keep_eu, masked_rows(w_io, keep_eu, unit_size), None)


def wanda_sp_scores(w_io: Float[Array, "I O"], x_norm_i: Float[Array, " I"], unit_size: int) -> Float[Array, " U"]:
    """The Wanda-sp metric of every unit, score_u = Σ_{j∈u} Σ_o |W_jo| · ‖X_j‖₂, in fp32.

    Shared with the policy-gradient initialisation (`tyr_jax.pruning.policy_gradient`), which has the
    input norms ‖X_j‖₂ without a Hessian."""
    return _unit_sum(jnp.sum(jnp.abs(w_io.astype(jnp.float32)), axis=1) * x_norm_i, unit_size)


@register("flap")
def flap(w_io: Float[Array, "I O"], stats: SublayerStats, *, unit_size: int,
         removals: Removals) -> LevelResult:
    """FLAP: fluctuation metric with bias compensation of the removed channels' mean output.

    mean_j = Σ_n X_nj / N,  Var_j = H_jj / N − mean_j²  (population, 1/N, variance),
    score_u = Σ_{j∈u} Var_j · ‖W_j‖₂²,
    bias_o = Σ_{j removed} mean_j · W_jo,  W_j = 0 for removed j
    (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning for LLMs", Eq. 4-5 and 9;
    the cross-layer standardisation is left out: each call prunes one sublayer at given counts).
    """
    _check(w_io, stats, unit_size, removals)
    w = w_io.astype(jnp.float32)
    n = jnp.maximum(stats.count, 1.0)  # no tokens: all scores 0 instead of NaN
    mean_i = stats.sum_i / n
    var_i = jnp.maximum(jnp.diagonal(stats.hessian_ii) / n - mean_i * mean_i, 0.0)
    score_u = _unit_sum(var_i * jnp.sum(w * w, axis=1), unit_size)
    keep_eu = keep_lowest_removed(score_u, removals)
    removed_mean_ei = jnp.where(jnp.repeat(keep_eu, unit_size, axis=1), 0.0, mean_i[None])
    bias_eo = jnp.einsum("ei,io->eo", removed_mean_ei, w, precision=jax.lax.Precision.HIGHEST)
    return LevelResult(keep_eu, masked_rows(w_io, keep_eu, unit_size), bias_eo.astype(w_io.dtype))
