"""Autoregressive decoding with a key/value cache, for the pruned models' inference speed.

Each layer keeps its own cache [B, S, K_l, H] (pruned layers have fewer KV groups; a removed
attention sublayer has none). `prefill` runs the prompt and fills the caches; `decode_step` adds one
token per sequence. Greedy `generate` is what the speed benchmark times.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig


def init_cache(weights: llama.Weights, batch: int, max_len: int):
    """Zero caches: per layer (k, v) of [B, S, K_l, H]."""
    return [(jnp.zeros((batch, max_len) + blk.attn.k_dkh.shape[1:], blk.attn.k_dkh.dtype),) * 2
            for blk in weights.blocks]


def _cached_attention(q, k_cache, v_cache, positions_bt, cfg: ModelConfig):
    """Queries at `positions_bt` against every cached position up to theirs (fp32 logits)."""
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k_cache, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
    kpos, qpos = jnp.arange(k_cache.shape[1]), positions_bt[0][:, None]
    visible = kpos[None, :] <= qpos
    if cfg.sliding_window is not None:
        visible = visible & (qpos - kpos[None, :] < cfg.sliding_window)
    probs = jax.nn.softmax(jnp.where(visible, logits, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bkgts,bskh->btkgh", probs.astype(v_cache.dtype), v_cache)


def _output_projection(attn: llama.Attention, ctx_btkgh):
    """o_proj as one [B·T, K·G·H] × [K·G·H, D] matmul. As the einsum btkgh,kghd->btd (`llama.attention`),
    XLA on GPU kept the 1-token context in the order attention left it and transposed the whole weight to
    match, every layer and token (12% of a decoding step, BENCHMARKS.md)."""
    b, t = ctx_btkgh.shape[:2]
    out = ctx_btkgh.reshape(b, t, -1) @ attn.o_kghd.reshape(-1, attn.o_kghd.shape[-1])
    return out if attn.o_bias_d is None else out + attn.o_bias_d


def _step(weights, cache, tokens_bt, start, cfg: ModelConfig, *, prompt: bool):
    """Runs tokens at positions start..start+T-1 against the cache; returns (last logits [B, V], cache).

    A prompt (start 0) attends over itself with `llama.attend` (cuDNN's fused kernel on GPU in half
    precision), not over the whole cache; later tokens attend over the cache."""
    b, t = tokens_bt.shape
    positions = start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    rope = llama.rope_tables(cfg, positions)
    x = llama.embed(weights, tokens_bt)
    new_cache = []
    for blk, (k_cache, v_cache) in zip(weights.blocks, cache, strict=True):
        a = blk.attn
        if a.q_dkgh.shape[1]:
            q, k, v = llama.project_qkv(a, x, cfg, rope)
            k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k, start, axis=1)
            v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v, start, axis=1)
            ctx = llama.attend(q, k, v, cfg) if prompt else _cached_attention(q, k_cache, v_cache, positions, cfg)
            x = x + _output_projection(a, ctx)
        elif a.o_bias_d is not None:
            x = x + a.o_bias_d
        x = x + llama.mlp(blk.mlp, x, cfg)
        new_cache.append((k_cache, v_cache))
    return llama.unembed(weights, x[:, -1:], cfg)[:, 0], new_cache


def prefill(weights, cache, prompt_bt, cfg: ModelConfig):
    """Fills the caches with the prompt; returns (next-token logits [B, V], cache)."""
    return _step(weights, cache, prompt_bt, 0, cfg, prompt=True)


def decode_step(weights, cache, token_b, position, cfg: ModelConfig):
    """One new token per sequence at `position`; returns (logits [B, V], cache)."""
    return _step(weights, cache, token_b[:, None], position, cfg, prompt=False)


def generate(weights, prompt_bt, cfg: ModelConfig, num_new: int):
    """Greedy continuation of `prompt_bt` by `num_new` tokens: [B, num_new]."""
    cache = init_cache(weights, prompt_bt.shape[0], prompt_bt.shape[1] + num_new)
    logits, cache = prefill(weights, cache, prompt_bt, cfg)

    def body(carry, i):
        logits, cache = carry
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits, cache = decode_step(weights, cache, token, prompt_bt.shape[1] + i, cfg)
        return (logits, cache), token

    _, tokens = jax.lax.scan(body, (logits, cache), jnp.arange(num_new))
    return tokens.T
