"""The Llama-family decoder as registered-dataclass pytrees and pure functions.

Covers Llama 2/3/3.x, Mistral, Qwen2 and SmolLM2 (MHA, GQA, MQA). Attention weights are stored grouped
by KV group, so removing a group is slicing one axis and the result is a real, smaller GQA layer:
`q_dkgh` is [D, K, G, H] (K KV groups, G query heads per group). Every layer may have its own K and
MLP width F, including 0 (the sublayer is then a residual pass-through), so `blocks` is a list.
Search loops use the static-shape form instead: `UnitMasks` of per-layer keep masks over KV groups and
MLP channels multiply the inputs of `o_proj` and `down_proj`, which equals slicing the units away.

Dimension letters: B batch, T/S time, D model, V vocab, K KV groups, G query heads per group,
H head dim, F MLP channels, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from tyr_jax.models.config import ModelConfig


def _pytree(cls):
    """Registers a dataclass as a pytree whose fields are all children (None fields are empty)."""
    cls = dataclasses.dataclass(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])


def _axes(*names: str | None):
    """Field metadata: the logical axis of each array dimension (see `tyr_jax.sharding`)."""
    return dataclasses.field(default=None, metadata={"axes": names})


@_pytree
class Attention:
    norm_d: Array = _axes("embed")
    q_dkgh: Array = _axes("embed", "kv", None, "head_dim")
    k_dkh: Array = _axes("embed", "kv", "head_dim")
    v_dkh: Array = _axes("embed", "kv", "head_dim")
    o_kghd: Array = _axes("kv", None, "head_dim", "embed")
    q_bias_kgh: Array | None = _axes("kv", None, "head_dim")
    k_bias_kh: Array | None = _axes("kv", "head_dim")
    v_bias_kh: Array | None = _axes("kv", "head_dim")
    o_bias_d: Array | None = _axes("embed")


@_pytree
class Mlp:
    norm_d: Array = _axes("embed")
    gate_df: Array = _axes("embed", "mlp")
    up_df: Array = _axes("embed", "mlp")
    down_fd: Array = _axes("mlp", "embed")
    gate_bias_f: Array | None = _axes("mlp")
    up_bias_f: Array | None = _axes("mlp")
    down_bias_d: Array | None = _axes("embed")


@_pytree
class Block:
    attn: Attention = None
    mlp: Mlp = None


@_pytree
class Weights:
    embed_vd: Array = _axes("vocab", "embed")
    blocks: list[Block] | Block = None   # a list, or one Block stacked on a leading layer axis (stack_blocks)
    final_norm_d: Array = _axes("embed")
    lm_head_dv: Array | None = _axes("embed", "vocab")  # None when tied to the embedding


class UnitMasks(NamedTuple):
    """Static-shape keep masks (1 keep, 0 prune) over KV groups and MLP channels of every layer."""

    kv_lk: Float[Array, "L K"]
    mlp_lf: Float[Array, "L F"]


# -- building blocks ----------------------------------------------------------------------------


def rms_norm(x: Float[Array, "... D"], weight: Float[Array, "D"], eps: float) -> Float[Array, "... D"]:
    """RMSNorm computed in fp32 and cast back before the scale, as the HF reference does."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> Float[Array, "H/2"]:
    """Inverse frequencies θ^(-2i/H), rescaled for `linear` and `llama3` rope scaling."""
    rope, h = cfg.rope, cfg.head_dim
    inv_freq = 1.0 / (rope.theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, smooth in between.
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        mid = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
        return jnp.where(wavelen > low_wavelen, inv_freq / rope.factor,
                         jnp.where(wavelen < high_wavelen, inv_freq, mid))
    return inv_freq


def rope_tables(cfg: ModelConfig, positions_bt: Int[Array, "B T"]) -> tuple[Array, Array]:
    """cos and sin tables [B, T, H] in fp32 (HF's rotate-half layout: frequencies repeated twice)."""
    angles = positions_bt[..., None].astype(jnp.float32) * rope_frequencies(cfg)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Float[Array, "B T *N H"], cos: Array, sin: Array) -> Array:
    """Rotates pairs (i, i + H/2): x·cos + rotate_half(x)·sin, in fp32, cast back."""
    extra = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[-1:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[-1:])
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def project_qkv(attn: Attention, x_btd: Array, cfg: ModelConfig, rope: tuple[Array, Array]):
    """Normed input → rotated queries [B,T,K,G,H], rotated keys and values [B,T,K,H]."""
    xn = rms_norm(x_btd, attn.norm_d, cfg.rms_norm_eps)
    q = jnp.einsum("btd,dkgh->btkgh", xn, attn.q_dkgh)
    k = jnp.einsum("btd,dkh->btkh", xn, attn.k_dkh)
    v = jnp.einsum("btd,dkh->btkh", xn, attn.v_dkh)
    if attn.q_bias_kgh is not None:
        q, k, v = q + attn.q_bias_kgh, k + attn.k_bias_kh, v + attn.v_bias_kh
    cos, sin = rope
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attention_context(attn: Attention, x_btd: Array, cfg: ModelConfig, rope: tuple[Array, Array],
                      *, implementation: str | None = None) -> Float[Array, "B T K G H"]:
    """Normed input → per-head attention output, the input of `o_proj` (before any mask)."""
    q, k, v = project_qkv(attn, x_btd, cfg, rope)
    return attend(q, k, v, cfg, implementation=implementation)


def default_attention(dtype) -> str:
    """cuDNN's fused attention where it exists (GPU, bf16/fp16), else XLA's."""
    half = dtype in (jnp.bfloat16, jnp.float16)
    return "cudnn" if half and jax.default_backend() == "gpu" else "xla"


def attend(q_btkgh: Array, k_btkh: Array, v_btkh: Array, cfg: ModelConfig, *,
           implementation: str | None = None) -> Float[Array, "B T K G H"]:
    """Causal self-attention of T queries over the same T positions.

    `implementation`: "xla" (our einsum attention, fp32 logits), "cudnn" (fused, GPU only) or None
    (`default_attention`)."""
    if (implementation or default_attention(q_btkgh.dtype)) == "cudnn":
        b, t, kv, g, h = q_btkgh.shape
        window = None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)
        out = jax.nn.dot_product_attention(q_btkgh.reshape(b, t, kv * g, h), k_btkh, v_btkh, is_causal=True,
                                           implementation="cudnn", local_window_size=window)
        return out.reshape(b, t, kv, g, h)
    return causal_attention(q_btkgh, k_btkh, v_btkh, cfg.sliding_window)


def causal_attention(q_btkgh: Array, k_bskh: Array, v_bskh: Array, window: int | None = None) -> Array:
    """softmax(q·kᵀ/√H + causal mask) · v with fp32 logits; `window` limits how far back a token sees."""
    t, s, h = q_btkgh.shape[1], k_bskh.shape[1], q_btkgh.shape[-1]
    logits = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32)
    logits = logits * (1.0 / math.sqrt(h))
    qpos, kpos = jnp.arange(t)[:, None], jnp.arange(s)[None, :]
    visible = kpos <= qpos
    if window is not None:
        visible = visible & (qpos - kpos < window)
    logits = jnp.where(visible, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_bskh.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)


def attention(attn: Attention, x_btd: Array, cfg: ModelConfig, rope, *, kv_mask_k: Array | None = None,
              implementation: str | None = None) -> Float[Array, "B T D"]:
    """Attention sublayer's contribution to the residual stream (0 when it has no KV groups)."""
    if attn.q_dkgh.shape[1] == 0:
        return _bias_or_zero(attn.o_bias_d, x_btd)
    ctx = attention_context(attn, x_btd, cfg, rope, implementation=implementation)
    if kv_mask_k is not None:
        ctx = ctx * kv_mask_k[:, None, None].astype(ctx.dtype)
    out = jnp.einsum("btkgh,kghd->btd", ctx, attn.o_kghd)
    return out if attn.o_bias_d is None else out + attn.o_bias_d


def mlp_hidden(mlp: Mlp, x_btd: Array, cfg: ModelConfig) -> Float[Array, "B T F"]:
    """Normed input → silu(gate) · up, the input of `down_proj` (before any mask)."""
    xn = rms_norm(x_btd, mlp.norm_d, cfg.rms_norm_eps)
    gate = jnp.einsum("btd,df->btf", xn, mlp.gate_df)
    up = jnp.einsum("btd,df->btf", xn, mlp.up_df)
    if mlp.gate_bias_f is not None:
        gate, up = gate + mlp.gate_bias_f, up + mlp.up_bias_f
    return jax.nn.silu(gate) * up


def mlp(mlp_w: Mlp, x_btd: Array, cfg: ModelConfig, *, mask_f: Array | None = None) -> Float[Array, "B T D"]:
    """MLP sublayer's contribution to the residual stream (0 when it has no channels)."""
    if mlp_w.down_fd.shape[0] == 0:
        return _bias_or_zero(mlp_w.down_bias_d, x_btd)
    hidden = mlp_hidden(mlp_w, x_btd, cfg)
    if mask_f is not None:
        hidden = hidden * mask_f.astype(hidden.dtype)
    out = jnp.einsum("btf,fd->btd", hidden, mlp_w.down_fd)
    return out if mlp_w.down_bias_d is None else out + mlp_w.down_bias_d


def _bias_or_zero(bias: Array | None, x_btd: Array) -> Array:
    return jnp.zeros_like(x_btd) if bias is None else jnp.broadcast_to(bias, x_btd.shape).astype(x_btd.dtype)


def block(blk: Block, x_btd: Array, cfg: ModelConfig, rope, *, kv_mask_k=None, mlp_mask_f=None,
          implementation: str | None = None) -> Float[Array, "B T D"]:
    """One pre-norm decoder block: x + attn(x), then + mlp(·)."""
    x_btd = x_btd + attention(blk.attn, x_btd, cfg, rope, kv_mask_k=kv_mask_k, implementation=implementation)
    return x_btd + mlp(blk.mlp, x_btd, cfg, mask_f=mlp_mask_f)


# -- the whole model ----------------------------------------------------------------------------


def embed(weights: Weights, tokens_bt: Int[Array, "B T"]) -> Float[Array, "B T D"]:
    return jnp.take(weights.embed_vd, tokens_bt, axis=0)


def unembed(weights: Weights, x_btd: Array, cfg: ModelConfig) -> Float[Array, "B T V"]:
    """Final norm and lm_head; logits accumulate in fp32."""
    xn = rms_norm(x_btd, weights.final_norm_d, cfg.rms_norm_eps)
    if weights.lm_head_dv is None:
        return jnp.einsum("btd,vd->btv", xn, weights.embed_vd, preferred_element_type=jnp.float32)
    return jnp.einsum("btd,dv->btv", xn, weights.lm_head_dv, preferred_element_type=jnp.float32)


def default_positions(tokens_bt: Array) -> Int[Array, "B T"]:
    return jnp.broadcast_to(jnp.arange(tokens_bt.shape[1], dtype=jnp.int32), tokens_bt.shape)


def hidden_states(weights: Weights, tokens_bt: Int[Array, "B T"], cfg: ModelConfig, *,
                  masks: UnitMasks | None = None, positions_bt: Array | None = None,
                  implementation: str | None = None) -> Float[Array, "B T D"]:
    """Residual stream after the last block (before the final norm)."""
    if positions_bt is None:
        positions_bt = default_positions(tokens_bt)
    rope = rope_tables(cfg, positions_bt)
    x = embed(weights, tokens_bt)
    if isinstance(weights.blocks, Block):   # stacked on a leading layer axis: one compiled block, any depth
        return scan_blocks(weights.blocks, x, cfg, rope, masks=masks, implementation=implementation)
    for i, blk in enumerate(weights.blocks):
        x = block(blk, x, cfg, rope, implementation=implementation,
                  kv_mask_k=None if masks is None else masks.kv_lk[i],
                  mlp_mask_f=None if masks is None else masks.mlp_lf[i])
    return x


def _layout(blk: Block) -> tuple:
    return jax.tree.structure(blk), [(x.shape, x.dtype) for x in jax.tree.leaves(blk)]


def stackable(blocks: list[Block]) -> bool:
    """Whether every block has layer 0's arrays, shapes and dtypes (a dense or uniformly pruned model)."""
    return all(_layout(b) == _layout(blocks[0]) for b in blocks)


def stack_blocks(blocks: list[Block]) -> Block:
    """Blocks of one shape → one `Block` whose arrays carry a leading layer axis [L, ...]."""
    if not stackable(blocks):
        odd = [i for i, b in enumerate(blocks) if _layout(b) != _layout(blocks[0])]
        raise ValueError(f"layers {odd} differ in size from layer 0: only blocks of one shape stack "
                         f"(keep a pruned model with per-layer sizes as a list of blocks)")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)


def unstack_blocks(stacked: Block) -> list[Block]:
    """Inverse of `stack_blocks`."""
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)]


def scan_blocks(stacked: Block, x_btd: Array, cfg: ModelConfig, rope, *, masks: UnitMasks | None = None,
                implementation: str | None = None) -> Float[Array, "B T D"]:
    """`block` over stacked layers with `lax.scan`: compile time and program size do not grow with depth."""
    def step(x, layer):
        blk, kv_mask_k, mlp_mask_f = layer
        return block(blk, x, cfg, rope, kv_mask_k=kv_mask_k, mlp_mask_f=mlp_mask_f,
                     implementation=implementation), None

    xs = (stacked, None, None) if masks is None else (stacked, masks.kv_lk, masks.mlp_lf)
    x_btd, _ = jax.lax.scan(step, x_btd, xs)
    return x_btd


def forward(weights: Weights, tokens_bt: Int[Array, "B T"], cfg: ModelConfig, *,
            masks: UnitMasks | None = None, positions_bt: Array | None = None,
            implementation: str | None = None) -> Float[Array, "B T V"]:
    """Next-token logits (fp32) of the decoder; `masks` prune units without changing shapes."""
    x = hidden_states(weights, tokens_bt, cfg, masks=masks, positions_bt=positions_bt,
                      implementation=implementation)
    return unembed(weights, x, cfg)


def token_logprobs(weights: Weights, tokens_bt: Int[Array, "B T"], targets_bt: Int[Array, "B T"],
                   cfg: ModelConfig, *, masks: UnitMasks | None = None,
                   implementation: str | None = None) -> Float[Array, "B T"]:
    """log p(targets[b, t] | tokens[b, ≤t]) in fp32, without keeping the [B, T, V] log-softmax."""
    logits = forward(weights, tokens_bt, cfg, masks=masks, implementation=implementation)
    picked = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


# -- shapes, initialisation, slicing ------------------------------------------------------------


def abstract_weights(cfg: ModelConfig, dtype=jnp.bfloat16) -> Weights:
    """`jax.ShapeDtypeStruct` weights of `cfg` (per-layer sizes honoured): shapes from one place."""
    d, h, g, v = cfg.hidden_size, cfg.head_dim, cfg.q_per_kv, cfg.vocab_size
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    blocks = []
    for i in range(cfg.num_layers):
        k, f = cfg.layer_kv_groups(i), cfg.layer_mlp_width(i)
        attn = Attention(
            norm_d=s(d), q_dkgh=s(d, k, g, h), k_dkh=s(d, k, h), v_dkh=s(d, k, h), o_kghd=s(k, g, h, d),
            q_bias_kgh=s(k, g, h) if cfg.qkv_bias else None, k_bias_kh=s(k, h) if cfg.qkv_bias else None,
            v_bias_kh=s(k, h) if cfg.qkv_bias else None, o_bias_d=s(d) if cfg.o_bias else None)
        mlp_w = Mlp(norm_d=s(d), gate_df=s(d, f), up_df=s(d, f), down_fd=s(f, d),
                    gate_bias_f=s(f) if cfg.mlp_bias else None, up_bias_f=s(f) if cfg.mlp_bias else None,
                    down_bias_d=s(d) if cfg.mlp_bias or cfg.down_bias else None)
        blocks.append(Block(attn=attn, mlp=mlp_w))
    return Weights(embed_vd=s(v, d), blocks=blocks, final_norm_d=s(d),
                   lm_head_dv=None if cfg.tie_word_embeddings else s(d, v))


def init_weights(cfg: ModelConfig, *, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Weights:
    """Random weights (normal · scale; norms 1) in the shapes of `cfg`: for tests and benchmarks."""
    shapes = abstract_weights(cfg, dtype)
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(key, len(leaves))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
    out = [jnp.ones(leaf.shape, dtype) if "norm" in path else
           (scale * jax.random.normal(k, leaf.shape, jnp.float32)).astype(dtype)
           for leaf, k, path in zip(leaves, keys, paths)]
    return jax.tree.unflatten(treedef, out)


def slice_block(blk: Block, kv_keep: Array, mlp_keep: Array) -> Block:
    """Keeps the given KV-group and MLP-channel indices (sorted int arrays): a physically smaller block."""
    a, m = blk.attn, blk.mlp
    take = functools.partial(jnp.take, indices=kv_keep)
    attn = dataclasses.replace(
        a, q_dkgh=take(a.q_dkgh, axis=1), k_dkh=take(a.k_dkh, axis=1), v_dkh=take(a.v_dkh, axis=1),
        o_kghd=take(a.o_kghd, axis=0),
        q_bias_kgh=None if a.q_bias_kgh is None else take(a.q_bias_kgh, axis=0),
        k_bias_kh=None if a.k_bias_kh is None else take(a.k_bias_kh, axis=0),
        v_bias_kh=None if a.v_bias_kh is None else take(a.v_bias_kh, axis=0))
    take = functools.partial(jnp.take, indices=mlp_keep)
    mlp_w = dataclasses.replace(
        m, gate_df=take(m.gate_df, axis=1), up_df=take(m.up_df, axis=1), down_fd=take(m.down_fd, axis=0),
        gate_bias_f=None if m.gate_bias_f is None else take(m.gate_bias_f, axis=0),
        up_bias_f=None if m.up_bias_f is None else take(m.up_bias_f, axis=0))
    return Block(attn=attn, mlp=mlp_w)


def apply_masks(weights: Weights, cfg: ModelConfig, masks: UnitMasks) -> tuple[Weights, ModelConfig]:
    """Physically removes the masked-out units: the smaller model computes what the masked one does."""
    kv, mlp_m = np.asarray(masks.kv_lk) > 0, np.asarray(masks.mlp_lf) > 0
    blocks = [slice_block(b, np.flatnonzero(kv[i]), np.flatnonzero(mlp_m[i])) for i, b in enumerate(weights.blocks)]
    pruned_cfg = cfg.with_layer_sizes(kv.sum(axis=1), mlp_m.sum(axis=1))
    return dataclasses.replace(weights, blocks=blocks), pruned_cfg
