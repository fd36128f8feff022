"""Binarization with alternating refinement (ARB, the ARB-LLM step PBS²P builds on; ALGORITHMS.md §3).

Every row r of a block of columns is approximated on its kept entries K_r by

    ŵ_rj = α_r · B_rj + μ_r ,   B ∈ {−1, +1},   j ∈ K_r          (pruned entries are exactly 0)

starting from μ = mean(W), α = mean|W − μ|, B = sign(W − μ) and refined `iters` times by

    μ ← mean(W − α B),   α ← mean(B (W − μ)),   B ← sign(W − μ)

where every mean runs over the row's kept entries only. sign(0) is +1. Rows: outputs, columns: inputs
(the [O, I] layout of GPTQ); a block is typically 128 input columns.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


class Binary(NamedTuple):
    """Row-wise binarization of a block: ŵ = α·B + μ on kept entries."""

    alpha_r: Float[Array, " R"]
    mu_r: Float[Array, " R"]
    sign_rc: Bool[Array, "R C"]      # True: B = +1


def _sign(x):
    return x >= 0


def _pm(sign_rc):
    return jnp.where(sign_rc, 1.0, -1.0).astype(jnp.float32)


def _masked_mean(x_rc, keep_rc):
    count = jnp.maximum(jnp.sum(keep_rc, axis=1), 1).astype(jnp.float32)
    return jnp.sum(jnp.where(keep_rc, x_rc, 0.0), axis=1) / count


def arb_init(w_rc: Float[Array, "R C"], keep_rc: Bool[Array, "R C"]) -> Binary:
    """μ = mean(W), α = mean|W − μ|, B = sign(W − μ) over the kept entries of every row."""
    w = w_rc.astype(jnp.float32)
    mu = _masked_mean(w, keep_rc)
    centred = w - mu[:, None]
    return Binary(_masked_mean(jnp.abs(centred), keep_rc), mu, _sign(centred))


def arb_refine(w_rc: Float[Array, "R C"], keep_rc: Bool[Array, "R C"], start: Binary, iters: int) -> Binary:
    """`iters` rounds of μ ← mean(W − αB), α ← mean(B(W − μ)), B ← sign(W − μ) over kept entries."""
    w = w_rc.astype(jnp.float32)

    def one(_, b: Binary) -> Binary:
        mu = _masked_mean(w - b.alpha_r[:, None] * _pm(b.sign_rc), keep_rc)
        centred = w - mu[:, None]
        alpha = _masked_mean(_pm(b.sign_rc) * centred, keep_rc)
        return Binary(alpha, mu, _sign(centred))

    return jax.lax.fori_loop(0, iters, one, start)


def binarize(w_rc: Float[Array, "R C"], keep_rc: Bool[Array, "R C"], iters: int) -> Binary:
    """ARB from scratch on the kept entries."""
    return arb_refine(w_rc, keep_rc, arb_init(w_rc, keep_rc), iters)


def reconstruct(b: Binary, keep_rc: Bool[Array, "R C"]) -> Float[Array, "R C"]:
    """ŵ = α·B + μ on kept entries, exactly 0 elsewhere (fp32)."""
    w = b.alpha_r[:, None].astype(jnp.float32) * _pm(b.sign_rc) + b.mu_r[:, None].astype(jnp.float32)
    return jnp.where(keep_rc, w, 0.0)
