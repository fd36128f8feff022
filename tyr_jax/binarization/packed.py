"""The packed PBS²P format: signs and N:M masks as bits, α and μ in float16, in safetensors.

For every compressed projection (HF name `model.layers.{i}.{part}.{proj}.weight`, [O, I]) the file holds

    <name>_mask   uint8 [O, ceil(I/8)]       keep bits of every weight (absent when nothing is pruned)
    <name>_signs  uint8 [O, ceil(K/8)]       the signs (1: +1) of the K kept weights of each row, in order
    <name>_alpha  float16 [O, ceil(I/bs)]    α per row and block of `bs` input columns
    <name>_mu     float16 [O, ceil(I/bs)]    μ likewise

(bits little-endian within a byte), and every other tensor (embeddings, norms, lm_head, biases) as the
dense export writes it. `config.json` is the model's HF config plus `tyr_binary` (format, variant, M,
block size, N per layer: null for a block left dense, `masked` per layer: whether its projections have a
`_mask`), which `tyr_jax.loading.load_model` reads to unpack: within a block of columns a row's kept weights
take exactly the two values μ ± α, pruned ones are exactly 0. transformers loads the directory with
`trust_remote_code=True`: the export carries modeling_tyr.py, whose `PackedLinear` unpacks the same way.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import tokenizers

from tyr_jax.binarization.linear import BinaryLinear, dense_weight
from tyr_jax.export import (NOTE_FILE, REMOTE_CODE_FILE, copy_remote_code, prepare_model_dir, remote_code_config,
                            save_safetensors)
from tyr_jax.loading.hf import weights_to_hf
from tyr_jax.models.config import ModelConfig
from tyr_jax.models.llama import Weights

FORMAT = 1
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PARTS = ("_mask", "_signs", "_alpha", "_mu")
TRANSFORMERS_NOTE = (f"transformers loads this packed PBS²P export through {REMOTE_CODE_FILE} (written next to "
                     "config.json; it unpacks the 1-bit projections in every forward): "
                     "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True). tyr-jax loads it: "
                     "tyr_jax.loading.load_model(DIR), or `tyr-jax eval --model DIR`.")


def weight_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{proj}.weight"


def pack(lin: BinaryLinear) -> dict[str, np.ndarray]:
    """BinaryLinear → {"mask"?, "signs", "alpha", "mu"} host arrays (every row keeps as many weights).

    The bits are gathered and packed where the arrays live (on the device), so only the packed bytes
    travel to the host."""
    keep, sign = jnp.asarray(lin.keep_oi), jnp.asarray(lin.sign_oi)
    kept = np.asarray(jnp.sum(keep, axis=1))
    if np.any(kept != kept[0]):
        raise ValueError("every row of an N:M weight keeps the same number of weights; this one does not")
    cols = jnp.argsort(jnp.logical_not(keep).astype(jnp.int8), axis=1, stable=True)[:, : int(kept[0])]
    signs = jnp.take_along_axis(sign, cols, axis=1)       # the kept weights' signs, in column order
    out = {"signs": np.asarray(jnp.packbits(signs, axis=1, bitorder="little")),
           "alpha": np.asarray(lin.alpha_ob, np.float16), "mu": np.asarray(lin.mu_ob, np.float16)}
    if kept[0] < keep.shape[1]:
        out["mask"] = np.asarray(jnp.packbits(keep, axis=1, bitorder="little"))
    return out


def unpack(packed: dict[str, np.ndarray], shape: tuple[int, int]) -> BinaryLinear:
    """The inverse of `pack` for a weight of `shape` [O, I] (host arrays)."""
    o, i = shape
    if "mask" in packed:
        keep = np.unpackbits(np.asarray(packed["mask"]), axis=1, count=i, bitorder="little").astype(bool)
    else:
        keep = np.ones(shape, bool)
    kept = int(keep[0].sum())
    signs = np.unpackbits(np.asarray(packed["signs"]), axis=1, count=kept, bitorder="little").astype(bool)
    if signs.shape != (o, kept) or np.any(keep.sum(axis=1) != kept):
        raise ValueError(f"packed weight of shape {shape}: mask and signs do not match; the file is corrupt")
    sign = np.zeros(shape, bool)
    sign[keep] = signs.reshape(-1)
    return BinaryLinear(keep, sign, np.asarray(packed["alpha"]), np.asarray(packed["mu"]))


def export_binary(weights: Weights, cfg: ModelConfig, packed_layers: list[dict[str, dict]], meta: dict,
                  out_dir: str | os.PathLike, *, tokenizer: tokenizers.Tokenizer | None = None,
                  overwrite: bool = False) -> dict:
    """Writes the packed model: `packed_layers[i][proj]` from `pack`, everything else from `weights`.

    `meta` (variant, m, block_size, n_per_layer, ...) goes into config.json under `tyr_binary`.
    Returns how transformers loads it (with `trust_remote_code`, as EXPORT_NOTE.txt says), the sizes and
    bits per weight (module docstring of `tyr_jax.binarization.compress`)."""
    out = pathlib.Path(out_dir)
    tensors = weights_to_hf(weights, cfg)
    dense_bytes = sum(t.nbytes for t in tensors.values())
    compressed_weights = packed_bytes = sign_scale_bytes = 0
    for i, layer in enumerate(packed_layers):
        for proj in PROJECTIONS if layer is not None else ():    # None: a block left dense
            name = weight_name(i, proj)
            compressed_weights += tensors.pop(name).size
            for part, array in layer[proj].items():
                tensors[f"{name}_{part}"] = array
                packed_bytes += array.nbytes
                sign_scale_bytes += 0 if part == "mask" else array.nbytes
    # A layer's projections all have a mask or none: each keeps I·N/M < I weights per row exactly when N < M.
    masked = [None if layer is None else "mask" in layer[PROJECTIONS[0]] for layer in packed_layers]
    binary = {"format": FORMAT, **meta, "masked": masked}
    hf_config = remote_code_config(cfg, cfg.to_hf() | {"dtype": str(np.dtype(weights.embed_vd.dtype)),
                                                       "tyr_binary": binary})
    prepare_model_dir(out, overwrite)
    save_safetensors(tensors, out / "model.safetensors", metadata={"format": "tyr-binary"})
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
    copy_remote_code(out)
    (out / NOTE_FILE).write_text(TRANSFORMERS_NOTE + "\n")
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")   # last: marks a whole model
    file_bytes = (out / "model.safetensors").stat().st_size
    ns = [n for n in meta["n_per_layer"] if n is not None]
    return {"trust_remote_code": True, "transformers_note": TRANSFORMERS_NOTE, "file_bytes": file_bytes, "dense_file_bytes": dense_bytes,
            "file_over_dense": file_bytes / dense_bytes,
            "weights_compressed": compressed_weights,
            "bits_per_weight": {
                "file": 8 * packed_bytes / compressed_weights,
                "signs_and_scales": 8 * sign_scale_bytes / compressed_weights,
                "paper_convention": float(np.mean(ns)) / meta["m"] * 1.1}}


def unpacked_tensors(tensors: dict, binary: dict, cfg: ModelConfig) -> dict:
    """HF tensor loaders with every packed projection replaced by a loader of its dense weight [O, I]."""
    if binary.get("format") != FORMAT:
        raise ValueError(f"config.json's tyr_binary has format {binary.get('format')!r}; this tyr-jax reads "
                         f"format {FORMAT}: export the model again with this version")
    out = dict(tensors)
    for i in range(cfg.num_layers):
        for proj in PROJECTIONS if binary["n_per_layer"][i] is not None else ():
            name = weight_name(i, proj)
            parts = {p[1:]: out.pop(name + p) for p in PARTS if name + p in out}
            if not {"signs", "alpha", "mu"} <= set(parts):
                raise ValueError(f"the packed model lacks {name}_signs/_alpha/_mu; the file is incomplete or "
                                 "not a tyr-jax binary export")
            shape = projection_shape(cfg, i, proj)
            out[name] = (lambda name=name, parts=parts, shape=shape: _dense(name, parts, shape, binary["block_size"]))
    return out


def projection_shape(cfg: ModelConfig, layer: int, proj: str) -> tuple[int, int]:
    """[O, I] of a projection of `layer`, as HF stores it."""
    d, attn = cfg.hidden_size, cfg.layer_kv_groups(layer) * cfg.head_dim
    f = cfg.layer_mlp_width(layer)
    return {"self_attn.q_proj": (attn * cfg.q_per_kv, d), "self_attn.k_proj": (attn, d),
            "self_attn.v_proj": (attn, d), "self_attn.o_proj": (d, attn * cfg.q_per_kv),
            "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}[proj]


def _dense(name: str, parts: dict, shape: tuple[int, int], block_size: int) -> np.ndarray:
    try:
        lin = unpack({k: v() for k, v in parts.items()}, shape)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    scales = (shape[0], -(-shape[1] // block_size))
    if lin.alpha_ob.shape != scales or lin.mu_ob.shape != scales:
        raise ValueError(f"{name}: packed weight of shape {shape} has scales of shape {lin.alpha_ob.shape}, not "
                         f"{scales}; the file does not belong to this config.json")
    return dense_weight(*lin, block_size)
