"""Autoregressive decoding with a key/value cache, for the pruned models' inference speed.

Decoding reads every weight once per token, so it runs at the memory bandwidth when each matrix-vector
product reads its weight once and nothing else copies it: `layout` lays the weights out so (q, k, v as one
matrix, gate and up as one, MLP widths rounded up to multiples of 128; why in `Layer` and `MLP_MULTIPLE`),
once, before decoding. Each layer keeps its own cache [B, S, K_l, H] (pruned layers have fewer KV groups; a
removed attention sublayer has none). `prefill` runs the prompt and fills the caches; `decode_step` adds
one token per sequence. Greedy `generate` (compiled with `COMPILER_OPTIONS`) is what the speed benchmark
times.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array

from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig


# Each layer's MLP width is rounded up to this many channels (zero ones: silu(0)·0 = 0) for decoding.
# At batch 1, XLA on GPU splits a GEMV's contraction dimension K over split_k blocks and pads K to a
# multiple of 8·split_k first, as a copy of the whole weight on every step (on an H200 the split is 8
# for K from about 4k to 16k: multiples of 64; 16 above: multiples of 128); the widths a search picks,
# multiples of 224, were padded per token (BENCHMARKS.md). Multiples of 128 never are, up to K ≈ 32k.
MLP_MULTIPLE = 128

# `generate`'s caches hold a multiple of this many positions (the ones past the current token are masked).
# With a 2080-position cache, XLA padded both caches to 2112 positions for the attention product on every
# step, 2 copies per layer and token (0.17 ms of a 4.7 ms step on an H200; BENCHMARKS.md). That was the
# einsum attention ("xla"); with cuDNN's, the default on GPU, 2080 and 2176 positions decoded equally fast.
CACHE_MULTIPLE = 128

# What `generate` is compiled with. XLA on GPU rewrites a matrix-vector product with (N + 1)·K < 10⁷ as
# an elementwise multiply and a reduce (its dot-strength-reduction pass), written out in between: a pruned
# layer's small weights (o_proj of ≤ 4 KV groups, q/k/v of ≤ 3) were read at 0.8 TB/s of the H200's 4.3.
# Without the pass, 50%-pruned decoding went from 3.52 to 2.93 ms per token (BENCHMARKS.md). Pass these to
# any `jax.jit` of your own that decodes (compiler options of an inner jit do not apply).
COMPILER_OPTIONS = {"xla_disable_hlo_passes": "dot-strength-reduction"}


class Layer(NamedTuple):
    """One decoder layer laid out for decoding: each sublayer's input projections as one matrix, so
    a step reads each weight once in one matrix-vector product. Side by side, XLA on GPU merges the two
    products of gate and up that share their input by copying both weights into one, every step (for
    weights under 64 MB: pruned layers). K = 0 KV groups or F = 0 channels: the sublayer is removed."""
    attn_norm_d: Array
    qkv_dn: Array              # [D, K·G·H + 2·K·H]: the queries ([K, G, H] flat), the keys, the values
    qkv_bias_n: Array | None
    o_nd: Array                # [K·G·H, D]
    o_bias_d: Array | None
    mlp_norm_d: Array
    gate_up_dn: Array          # [D, 2F']: gate then up, F' = F rounded up to MLP_MULTIPLE
    gate_up_bias_n: Array | None
    down_fd: Array             # [F', D]
    down_bias_d: Array | None


def layout(weights: llama.Weights, multiple: int = MLP_MULTIPLE) -> llama.Weights:
    """`weights` with its blocks as decoding `Layer`s (a copy of the block weights: do it once)."""
    def matrix(*ws):  # [D, ...] each → [D, N]
        return jnp.concatenate([w.reshape(w.shape[0], math.prod(w.shape[1:])) for w in ws], axis=1)

    def vector(*bs):  # [...] each → [N]
        return None if bs[0] is None else jnp.concatenate([b.reshape(-1) for b in bs])

    def pad_f(a, axis):  # zero channels up to a multiple of `multiple` along the MLP axis
        return None if a is None else jnp.pad(a, [(0, -a.shape[axis] % multiple if i == axis else 0)
                                                 for i in range(a.ndim)])

    def one(blk: llama.Block) -> Layer:
        a, m = blk.attn, blk.mlp
        *kgh, d = a.o_kghd.shape
        return Layer(attn_norm_d=a.norm_d, qkv_dn=matrix(a.q_dkgh, a.k_dkh, a.v_dkh),
                     qkv_bias_n=vector(a.q_bias_kgh, a.k_bias_kh, a.v_bias_kh),
                     o_nd=a.o_kghd.reshape(math.prod(kgh), d), o_bias_d=a.o_bias_d, mlp_norm_d=m.norm_d,
                     gate_up_dn=matrix(pad_f(m.gate_df, 1), pad_f(m.up_df, 1)),
                     gate_up_bias_n=vector(pad_f(m.gate_bias_f, 0), pad_f(m.up_bias_f, 0)),
                     down_fd=pad_f(m.down_fd, 0), down_bias_d=m.down_bias_d)

    return dataclasses.replace(weights, blocks=[one(b) for b in weights.blocks])


def _kv_groups(layer: Layer, cfg: ModelConfig) -> int:
    return layer.qkv_dn.shape[1] // ((cfg.q_per_kv + 2) * cfg.head_dim)


def init_cache(weights: llama.Weights, batch: int, max_len: int, cfg: ModelConfig):
    """Zero caches of `layout` weights: per layer (k, v) of [B, S, K_l, H]."""
    return [(jnp.zeros((batch, max_len, _kv_groups(layer, cfg), cfg.head_dim), layer.qkv_dn.dtype),) * 2
            for layer in weights.blocks]


def _cached_attention(q, k_cache, v_cache, positions_bt, cfg: ModelConfig, implementation: str | None = None):
    """Queries at `positions_bt` against every cached position up to theirs (fp32 logits).

    `implementation` "cudnn" (None: `llama.default_attention`, so on GPU in half precision): one new token
    per sequence through cuDNN's fused attention, the cache cut at position + 1 by its key lengths; a sliding
    window, which that cut cannot express, keeps the einsum form ("xla"). On an H200, cuDNN's kernel made
    8B-shaped decoding 2% faster than the einsum form (dense: 4.31 against 4.39 ms per token; BENCHMARKS.md)."""
    b, t, kv, g, h = q.shape
    implementation = implementation or llama.default_attention(q.dtype)
    if implementation == "cudnn" and t == 1 and cfg.sliding_window is None:
        out = jax.nn.dot_product_attention(q.reshape(b, 1, kv * g, h), k_cache, v_cache,
                                           key_value_seq_lengths=positions_bt[:, 0] + 1, implementation="cudnn")
        return out.reshape(b, 1, kv, g, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k_cache, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
    kpos, qpos = jnp.arange(k_cache.shape[1]), positions_bt[0][:, None]
    visible = kpos[None, :] <= qpos
    if cfg.sliding_window is not None:
        visible = visible & (qpos - kpos[None, :] < cfg.sliding_window)
    probs = jax.nn.softmax(jnp.where(visible, logits, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bkgts,bskh->btkgh", probs.astype(v_cache.dtype), v_cache)


def _plus_bias(y, bias):
    return y if bias is None else y + bias


def _qkv(layer: Layer, x_btd, cfg: ModelConfig, rope):
    """Rotated queries [B, T, K, G, H], rotated keys and values [B, T, K, H], from one product."""
    b, t, _ = x_btd.shape
    k, g, h = _kv_groups(layer, cfg), cfg.q_per_kv, cfg.head_dim
    xn = llama.rms_norm(x_btd, layer.attn_norm_d, cfg.rms_norm_eps)
    qkv = _plus_bias(xn @ layer.qkv_dn, layer.qkv_bias_n)
    q, key, value = jnp.split(qkv, [k * g * h, k * g * h + k * h], axis=-1)
    q, key, value = q.reshape(b, t, k, g, h), key.reshape(b, t, k, h), value.reshape(b, t, k, h)
    cos, sin = rope
    return llama.apply_rope(q, cos, sin), llama.apply_rope(key, cos, sin), value


def _mlp(layer: Layer, x_btd, cfg: ModelConfig):
    """silu(gate)·up, then down: the MLP's contribution to the residual stream."""
    xn = llama.rms_norm(x_btd, layer.mlp_norm_d, cfg.rms_norm_eps)
    gate, up = jnp.split(_plus_bias(xn @ layer.gate_up_dn, layer.gate_up_bias_n), 2, axis=-1)
    return _plus_bias((jax.nn.silu(gate) * up) @ layer.down_fd, layer.down_bias_d)


def _step(weights, cache, tokens_bt, start, cfg: ModelConfig, *, prompt: bool, attention: str | None = None):
    """Runs tokens at positions start..start+T-1 against the cache; returns (last logits [B, V], cache).

    A prompt (start 0) attends over itself with `llama.attend` (cuDNN's fused kernel on GPU in half
    precision), not over the whole cache; later tokens attend over the cache (`_cached_attention`, with
    `attention` as its implementation). o_proj is one [B·T, K·G·H] × [K·G·H, D] product: as the einsum
    btkgh,kghd->btd, XLA on GPU transposed the whole weight every layer and token to match the 1-token
    context (12% of a step, BENCHMARKS.md)."""
    b, t = tokens_bt.shape
    positions = start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    rope = llama.rope_tables(cfg, positions)
    x = llama.embed(weights, tokens_bt)
    new_cache = []
    for layer, (k_cache, v_cache) in zip(weights.blocks, cache, strict=True):
        if _kv_groups(layer, cfg):
            q, k, v = _qkv(layer, x, cfg, rope)
            k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k, start, axis=1)
            v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v, start, axis=1)
            ctx = (llama.attend(q, k, v, cfg) if prompt
                   else _cached_attention(q, k_cache, v_cache, positions, cfg, attention))
            x = x + _plus_bias(ctx.reshape(b, t, -1) @ layer.o_nd, layer.o_bias_d)
        elif layer.o_bias_d is not None:
            x = x + layer.o_bias_d
        if layer.down_fd.shape[0]:
            x = x + _mlp(layer, x, cfg)
        elif layer.down_bias_d is not None:
            x = x + layer.down_bias_d
        new_cache.append((k_cache, v_cache))
    return llama.unembed(weights, x[:, -1:], cfg)[:, 0], new_cache


def prefill(weights, cache, prompt_bt, cfg: ModelConfig):
    """Fills the caches with the prompt; returns (next-token logits [B, V], cache)."""
    return _step(weights, cache, prompt_bt, 0, cfg, prompt=True)


def decode_step(weights, cache, token_b, position, cfg: ModelConfig, attention: str | None = None):
    """One new token per sequence at `position`; returns (logits [B, V], cache). `attention`: "xla",
    "cudnn" or None, the default (`_cached_attention`)."""
    return _step(weights, cache, token_b[:, None], position, cfg, prompt=False, attention=attention)


@functools.partial(jax.jit, static_argnames=("cfg", "num_new", "attention"), compiler_options=COMPILER_OPTIONS)
def generate(weights, prompt_bt, cfg: ModelConfig, num_new: int, attention: str | None = None):
    """Greedy continuation of `prompt_bt` by `num_new` tokens: [B, num_new] (`layout` weights); `attention`
    as in `decode_step`."""
    positions = prompt_bt.shape[1] + num_new
    cache = init_cache(weights, prompt_bt.shape[0], -(-positions // CACHE_MULTIPLE) * CACHE_MULTIPLE, cfg)
    logits, cache = prefill(weights, cache, prompt_bt, cfg)

    def body(carry, i):
        logits, cache = carry
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits, cache = decode_step(weights, cache, token, prompt_bt.shape[1] + i, cfg, attention)
        return (logits, cache), token

    _, tokens = jax.lax.scan(body, (logits, cache), jnp.arange(num_new))
    return tokens.T
