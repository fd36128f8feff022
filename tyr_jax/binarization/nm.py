"""N:M semi-structured masks along the input dimension, and PBS²P's coarse-to-fine selection (CFS).

Fine stage: the saliency of weight (r, j) is the OBS cost of removing it,

    s_rj = w_rj² / [U]²_jj          (U: the upper Cholesky factor of H⁻¹ that GPTQ works with)

and in every group of M consecutive input columns of a row the lowest-saliency weights go.
Coarse stage: every decoder block gets its own N from its importance 1 / cos(x_in, x_out) (a block
that changes its input less matters less), mapped linearly into [N_low, N_high] and rounded so that
the average N, hence the kept fraction of the whole model, is exactly the target.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def saliency(w_rc: Float[Array, "R C"], u_diag_c: Float[Array, " C"]) -> Float[Array, "R C"]:
    """s_rj = w_rj² / U_jj² (fp32)."""
    w = w_rc.astype(jnp.float32)
    return w * w / jnp.square(u_diag_c)[None, :]


def group_ranks(score_rc: Float[Array, "R C"], m: int) -> Int[Array, "R C"]:
    """Rank of every entry inside its group of M consecutive columns (0: lowest score; ties: lower
    column first)."""
    r, c = score_rc.shape
    grouped = score_rc.reshape(r, c // m, m)
    order = jnp.argsort(grouped, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True).reshape(r, c)


def nm_keep(score_rc: Float[Array, "R C"], pruned: int | Array, m: int) -> Bool[Array, "R C"]:
    """Keeps all but the `pruned` lowest-scoring entries of every group of M columns."""
    return group_ranks(score_rc, m) >= pruned


def spbo_schedule(n: int, m: int, steps: int) -> tuple[int, ...]:
    """Entries pruned per group after each SPBO step: `steps` even steps from 0 to M − N
    (M − N steps: one more entry per group each step; 1 step: all at once)."""
    total = m - n
    if total == 0:
        return ()
    if not 1 <= steps <= total:
        raise ValueError(f"SPBO steps must lie in [1, M − N = {total}], got {steps}")
    return tuple(int(round(total * (k + 1) / steps)) for k in range(steps))


def cfs_block_n(importance: np.ndarray, n: int, low: int, high: int) -> list[int]:
    """Per-block N (coarse stage): N + spread · z, z the importance centred and scaled to max |z| = 1,
    spread = min(N − low, high − N), rounded (largest remainders) so that Σ N_l = L · N exactly.

    Every N_l lies in [low, high]; with equal importance, or low = high = N, every block gets N."""
    imp = np.asarray(importance, np.float64)
    if not low <= n <= high:
        raise ValueError(f"the CFS bounds [{low}, {high}] must contain N = {n}")
    z = imp - imp.mean()
    scale = np.abs(z).max()
    spread = min(n - low, high - n)
    raw = n + (spread * z / scale if scale > 0 else 0 * z)
    base = np.floor(raw + 1e-9).astype(int)
    short = len(imp) * n - int(base.sum())
    if short:
        order = np.argsort(-(raw - base), kind="stable")   # largest remainders first
        base[order[:short]] += 1
    return [int(b) for b in base]
