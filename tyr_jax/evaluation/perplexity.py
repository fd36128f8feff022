"""Perplexity over non-overlapping windows, jitted and batched.

ppl = exp( Σ_windows Σ_{t=1}^{T-1} −log p(x_t | x_<t) / (W · (T − 1)) ): every token of a window but
the first is scored, each window independently (no context carried across windows).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig
from tyr_jax.sharding import to_host


@functools.partial(jax.jit, static_argnames=("cfg", "implementation"))
def _window_nll(weights, windows_bt, cfg: ModelConfig, masks=None, implementation=None):
    """Summed negative log-likelihood of tokens 1..T-1 of each window: [B] fp32."""
    logp = llama.token_logprobs(weights, windows_bt[:, :-1], windows_bt[:, 1:], cfg, masks=masks,
                                implementation=implementation)
    return -jnp.sum(logp, axis=-1)


def perplexity(weights, cfg: ModelConfig, windows: np.ndarray, *, batch_size: int = 8, masks=None,
               data_sharding=None, progress: bool = True, implementation: str | None = None) -> dict:
    """Perplexity of `windows` [W, T] (int32 token ids).

    Returns {"ppl", "tokens_scored", "seq_len", "windows", "nll"}; the last batch is padded by
    repeating windows, whose scores are discarded, so every call with one batch size compiles once.
    """
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [W, T] with T >= 2, got shape {windows.shape}")
    num, seq_len = windows.shape
    total = 0.0
    for start in tqdm(range(0, num, batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = windows[start: start + batch_size]
        real = len(batch)
        if real < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
        batch = jnp.asarray(batch) if data_sharding is None else jax.device_put(batch, data_sharding)
        nll = _window_nll(weights, batch, cfg, masks, implementation)
        total += float(np.sum(to_host(nll).astype(np.float64)[:real]))
    scored = num * (seq_len - 1)
    return {"ppl": math.exp(total / scored), "tokens_scored": scored, "seq_len": seq_len, "windows": num,
            "nll": total / scored}
