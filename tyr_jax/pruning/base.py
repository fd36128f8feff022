"""What every local pruner shares: calibration statistics, the result type and the registry.

A sublayer is pruned through the input channels of its output projection W [d_in, d_out]
(`o_proj` or `down_proj`). Channels come in units of `unit_size` consecutive channels (a KV group:
G·H channels; an MLP channel: 1). A pruner is a pure function

    pruner(w_io, stats, *, unit_size, removals, **hparams) -> LevelResult

that returns one pruned copy per entry of `removals` (how many units to remove: an int32 array [E], which
may be traced, or a tuple of ints), all from one compiled call. The counts are data, not part of the
program: one compiled pruner serves every layer and coarse-to-fine iteration whose shapes agree. Shapes
stay static: removed rows of W are zero and `keep_eu` says which units survive; `tyr_jax.supernet`
slices the kept rows out when it stores a copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int


class SublayerStats(NamedTuple):
    """Sufficient statistics of the calibration inputs X [N, d_in] of one output projection."""

    hessian_ii: Float[Array, "I I"]   # Σ xᵀx (fp32)
    sum_i: Float[Array, "I"]          # Σ x (fp32), for means (FLAP)
    count: Float[Array, ""]           # N, the number of tokens

    @staticmethod
    def zeros(d_in: int) -> SublayerStats:
        return SublayerStats(jnp.zeros((d_in, d_in), jnp.float32), jnp.zeros((d_in,), jnp.float32),
                             jnp.zeros((), jnp.float32))


def accumulate_stats(stats: SublayerStats, x_ni: Array) -> SublayerStats:
    """Adds a batch of inputs [N, d_in] (any float dtype; matmul accumulates in fp32)."""
    return SublayerStats(
        stats.hessian_ii + jnp.einsum("ni,nj->ij", x_ni, x_ni, preferred_element_type=jnp.float32),
        stats.sum_i + jnp.sum(x_ni, axis=0, dtype=jnp.float32),
        stats.count + x_ni.shape[0])


class LevelResult(NamedTuple):
    """E pruned copies of one output projection."""

    keep_eu: Bool[Array, "E U"]          # which units survive in each copy
    w_eio: Float[Array, "E I O"]         # pruned weights (removed rows are 0), dtype of the input W
    bias_eo: Float[Array, "E O"] | None  # output bias to add (FLAP's compensation), else None


Removals = Int[Array, " E"] | tuple[int, ...]   # units removed per level


class Pruner(Protocol):
    def __call__(self, w_io: Array, stats: SublayerStats, *, unit_size: int, removals: Removals,
                 **hparams) -> LevelResult: ...


PRUNERS: dict[str, Pruner] = {}


def register(name: str) -> Callable[[Pruner], Pruner]:
    """Decorator: makes a pruner selectable by name (`method:` in configs)."""

    def wrap(fn: Pruner) -> Pruner:
        PRUNERS[name] = fn
        return fn

    return wrap


def get_pruner(name: str) -> Pruner:
    if name not in PRUNERS:
        raise ValueError(f"unknown pruner {name!r}; registered: {', '.join(sorted(PRUNERS))}")
    return PRUNERS[name]


def validate_removals(num_units: int, removals: Removals) -> None:
    """Removal counts are a non-empty vector in [0, num_units]. The values are checked where they are known;
    traced counts (under jit) cannot be: their caller makes them (e.g. `supernet.level_removals`)."""
    traced = any(isinstance(r, jax.core.Tracer) for r in jax.tree.leaves(removals))
    counts = jnp.asarray(removals) if traced else np.asarray(removals)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"removals must be a non-empty vector of unit counts, got {removals}")
    if not traced and not np.all((counts >= 0) & (counts <= num_units)):
        raise ValueError(f"removals must be unit counts in [0, {num_units}], got {removals}")


def unit_view(x: Array, unit_size: int) -> Array:
    """[d_in, ...] → [U, unit_size, ...]."""
    return x.reshape((x.shape[0] // unit_size, unit_size) + x.shape[1:])


def keep_lowest_removed(scores_u: Array, removals: Removals) -> Bool[Array, "E U"]:
    """For each removal count r, the mask that drops the r lowest-scoring units (ties: lower index first):
    keep_eu = rank_u ≥ r_e, rank 0 the lowest score."""
    order = jnp.argsort(scores_u, stable=True)        # ascending: first = pruned first
    rank = jnp.empty_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return rank[None, :] >= jnp.asarray(removals, rank.dtype)[:, None]


def masked_rows(w_io: Array, keep_eu: Array, unit_size: int) -> Array:
    """W with the rows of removed units zeroed, one copy per level: [E, I, O]."""
    keep_ei = jnp.repeat(keep_eu, unit_size, axis=1)
    return jnp.where(keep_ei[:, :, None], w_io[None], jnp.zeros((), w_io.dtype))


