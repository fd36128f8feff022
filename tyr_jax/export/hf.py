"""Export: a (pruned) model → a Hugging Face directory that tyr-jax and transformers load.

The directory holds `model.safetensors`, `config.json` and, if given, `tokenizer.json`. tyr-jax loads
every export (`tyr_jax.loading.load_model(dir)`, `tyr-jax eval --model dir`): per-layer sizes and biases
that the model type's own keys cannot say are `tyr_*` keys of config.json (`ModelConfig.to_hf`).

transformers (checked against 5.24) builds every decoder layer of LlamaForCausalLM, Qwen2ForCausalLM and
MistralForCausalLM from the one global `num_attention_heads`, `num_key_value_heads` and
`intermediate_size` of the config (`LlamaModel.__init__`, `LlamaAttention`, `LlamaMLP` in
modeling_llama.py); its `per_layer_config` is not read by these models. So an export whose layers all keep
the same, non-zero number of KV groups and MLP channels, with biases the architecture has, is written as
a smaller dense model of the original type, which `AutoModelForCausalLM.from_pretrained(dir)` loads
(Llama: zeros stand in for biases it needs but the model lacks). Every other export gets
`model_type: "tyr"` and a copy of `remote_code/modeling_tyr.py`, which builds each layer at its own size
(`auto_map`), and loads with `from_pretrained(dir, trust_remote_code=True)`; `EXPORT_NOTE.txt` says why.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import pathlib
import shutil
import struct
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from tyr_jax.loading.hf import DTYPES, weights_to_hf
from tyr_jax.models.llama import abstract_weights
from tyr_jax.models.config import ModelConfig
from tyr_jax.models.llama import Weights

__all__ = ["NOTE_FILE", "REMOTE_CODE_FILE", "copy_remote_code", "export_model", "prepare_model_dir",
           "remote_code_config", "save_safetensors", "transformers_blockers"]

NOTE_FILE = "EXPORT_NOTE.txt"
REMOTE_CODE_FILE = "modeling_tyr.py"
_AUTO_MAP = {"AutoConfig": "modeling_tyr.TyrConfig", "AutoModelForCausalLM": "modeling_tyr.TyrForCausalLM"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
# Biases each transformers architecture can hold (Qwen2: always q/k/v, never o/MLP; Mistral: none).
_HF_BIASES = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
              "qwen2": ("q_proj", "k_proj", "v_proj"), "mistral": ()}
_SAFETENSORS_CODES = {np.dtype(t): code for code, t in DTYPES.items()}


def export_model(weights: Weights, cfg: ModelConfig, out_dir: str | os.PathLike, *,
                 tokenizer: tokenizers.Tokenizer | None = None, overwrite: bool = False) -> dict:
    """Writes `weights` (fp32 or bf16, as they are) as an HF model directory.

    Args:
      weights, cfg: the model, e.g. from `llama.apply_masks` or `supernet.assemble`; which biases exist is
        read from the weights (a bias that some layers have is written for all, zeros elsewhere).
      out_dir: created if missing. A directory that already holds a model is refused unless `overwrite`,
        which replaces its weights, config, tokenizer and note (other files are left alone).
      tokenizer: written as `tokenizer.json` if given.

    Returns:
      {"tyr_jax": True, "transformers": True, "trust_remote_code": whether transformers needs
       `trust_remote_code=True` (the bundled modeling_tyr.py) to load it, "transformers_note": how it loads
       there, and why remote code if it does (then also written to EXPORT_NOTE.txt)}.
    """
    out = pathlib.Path(out_dir)
    weights, cfg = _with_uniform_biases(weights, cfg)
    _check_shapes(weights, cfg)
    blockers = transformers_blockers(cfg)
    if not blockers:
        cfg = _as_dense(cfg)
    tensors = weights_to_hf(weights, cfg)
    hf_config = cfg.to_hf()
    hf_config["dtype"] = str(np.dtype(weights.embed_vd.dtype))
    zero_biases = [] if blockers else _add_zero_biases(tensors, cfg, hf_config)
    if blockers:
        hf_config = remote_code_config(cfg, hf_config)
    note = _note(cfg, blockers, zero_biases)

    prepare_model_dir(out, overwrite)
    save_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
    if blockers:
        copy_remote_code(out)
        (out / NOTE_FILE).write_text(note + "\n")
    # config.json last: a directory cut short by a kill has none and is not mistaken for a model.
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return {"tyr_jax": True, "transformers": True, "trust_remote_code": bool(blockers), "transformers_note": note}


def transformers_blockers(cfg: ModelConfig) -> list[str]:
    """Why transformers' own class for `cfg.model_type` cannot hold this model (empty: it can; else the
    export carries modeling_tyr.py)."""
    arch = _ARCHITECTURES[cfg.model_type]
    kv = [cfg.layer_kv_groups(i) for i in range(cfg.num_layers)]
    widths = [cfg.layer_mlp_width(i) for i in range(cfg.num_layers)]
    facts = ([f"layer {i} has no attention heads" for i, k in enumerate(kv) if k == 0] +
             [f"layer {i} has no MLP channels" for i, f in enumerate(widths) if f == 0])
    for sizes, what in ((kv, "KV groups"), (widths, "MLP channels")):
        if len({s for s in sizes if s}) > 1:
            facts.append(f"layers keep different numbers of {what} ({', '.join(map(str, sizes))})")
    reasons = []
    if facts:
        reasons.append(f"{'; '.join(facts)}: transformers' {arch} builds every layer with the one global "
                       "num_attention_heads, num_key_value_heads and intermediate_size and cannot remove a "
                       "sublayer (it does not read per_layer_config: per-layer sizes there make it raise "
                       "AmbiguousGlobalPerLayerAttributeError, and `skip` is ignored)")
    if cfg.model_type == "llama":
        heads = sorted({k * cfg.q_per_kv for k in kv if k and cfg.hidden_size % (k * cfg.q_per_kv)})
        if heads:
            reasons.append(f"LlamaConfig requires hidden_size ({cfg.hidden_size}) to be a multiple of "
                           f"num_attention_heads ({', '.join(map(str, heads))}), although head_dim is explicit")
    extra = [p for p in cfg.bias_projections() if p not in _HF_BIASES[cfg.model_type]]
    if extra:
        reasons.append(f"transformers' {arch} has no bias on {', '.join(extra)}")
    return reasons


def remote_code_config(cfg: ModelConfig, hf_config: dict) -> dict:
    """`hf_config` (from `cfg.to_hf()`) as modeling_tyr.py reads it: model_type "tyr" over the base type,
    `auto_map` to the bundled classes, and every bias named in `tyr_biases` (the one key it reads)."""
    return {**hf_config, "architectures": ["TyrForCausalLM"], "model_type": "tyr",
            "tyr_base_model_type": cfg.model_type, "auto_map": dict(_AUTO_MAP),
            "tyr_biases": cfg.bias_projections()}


def copy_remote_code(out: pathlib.Path) -> None:
    """Writes modeling_tyr.py (package data of tyr_jax.export) into the export directory `out`."""
    source = importlib.resources.files("tyr_jax.export").joinpath("remote_code", REMOTE_CODE_FILE)
    with importlib.resources.as_file(source) as path:
        shutil.copyfile(path, out / REMOTE_CODE_FILE)


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, *,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Writes a `.safetensors` file, bf16 included (ml_dtypes), atomically (a `.partial` file renamed).

    Layout: little-endian u64 header length, JSON header {name: dtype, shape, data_offsets}, raw data.
    """
    path = pathlib.Path(path)
    arrays = {name: np.ascontiguousarray(tensors[name]) for name in sorted(tensors)}
    header, offset = {}, 0
    for name, a in arrays.items():
        if a.dtype not in _SAFETENSORS_CODES:
            raise ValueError(f"tensor {name} has dtype {a.dtype}, which safetensors cannot store")
        header[name] = {"dtype": _SAFETENSORS_CODES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data 8-byte aligned, as the reference writer keeps it
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays.values():
            f.write(a.reshape(-1).view(np.uint8).data)
    os.replace(partial, path)


# -- helpers ------------------------------------------------------------------------------------


def _with_uniform_biases(weights: Weights, cfg: ModelConfig) -> tuple[Weights, ModelConfig]:
    """Bias flags read from the weights; a bias some layers have is given to all (zeros: exact no-ops)."""
    def present(part, name):
        return any(getattr(getattr(b, part), name) is not None for b in weights.blocks)

    qkv = {present("attn", n) for n in ("q_bias_kgh", "k_bias_kh", "v_bias_kh")}
    gate_up = {present("mlp", n) for n in ("gate_bias_f", "up_bias_f")}
    if len(qkv) > 1 or len(gate_up) > 1:
        raise ValueError("q/k/v biases must come together, and gate/up biases together")
    qkv_bias, mlp_bias = qkv.pop(), gate_up.pop()
    o_bias = present("attn", "o_bias_d")
    down_bias = mlp_bias or present("mlp", "down_bias_d")

    def filled(bias, shape, like):
        return jnp.zeros(shape, like.dtype) if bias is None else bias

    blocks = []
    for b in weights.blocks:
        a, m = b.attn, b.mlp
        if qkv_bias:
            a = dataclasses.replace(a, q_bias_kgh=filled(a.q_bias_kgh, a.q_dkgh.shape[1:], a.q_dkgh),
                                    k_bias_kh=filled(a.k_bias_kh, a.k_dkh.shape[1:], a.k_dkh),
                                    v_bias_kh=filled(a.v_bias_kh, a.v_dkh.shape[1:], a.v_dkh))
        if o_bias:
            a = dataclasses.replace(a, o_bias_d=filled(a.o_bias_d, a.o_kghd.shape[-1:], a.o_kghd))
        if mlp_bias:
            m = dataclasses.replace(m, gate_bias_f=filled(m.gate_bias_f, m.gate_df.shape[1:], m.gate_df),
                                    up_bias_f=filled(m.up_bias_f, m.up_df.shape[1:], m.up_df))
        if down_bias:
            m = dataclasses.replace(m, down_bias_d=filled(m.down_bias_d, m.down_fd.shape[1:], m.down_fd))
        blocks.append(dataclasses.replace(b, attn=a, mlp=m))
    cfg = dataclasses.replace(cfg, qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias,
                              down_bias=down_bias and not mlp_bias)
    return dataclasses.replace(weights, blocks=blocks), cfg


def _check_shapes(weights: Weights, cfg: ModelConfig) -> None:
    """The weights must be exactly what `cfg` describes, or the directory would not load."""
    expected = abstract_weights(cfg, jnp.float32)
    got_paths = jax.tree_util.tree_flatten_with_path(weights)[0]
    want_paths = jax.tree_util.tree_flatten_with_path(expected)[0]
    got = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in got_paths}
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in want_paths}
    if got != want:
        bad = sorted(set(got) ^ set(want)) or sorted(k for k in got if got[k] != want[k])
        raise ValueError(f"the weights do not match the config at {bad[0]} (weights: {got.get(bad[0])}, "
                         f"config: {want.get(bad[0])}); pass the config that belongs to these weights")


def _as_dense(cfg: ModelConfig) -> ModelConfig:
    """Every layer the same size: the smaller dense model that any HF loader reads."""
    k, f = cfg.layer_kv_groups(0), cfg.layer_mlp_width(0)
    return dataclasses.replace(cfg, num_heads=k * cfg.q_per_kv, num_kv_heads=k, intermediate_size=f,
                               kv_groups=None, mlp_widths=None)


def _add_zero_biases(tensors: dict[str, np.ndarray], cfg: ModelConfig, hf_config: dict) -> list[str]:
    """Zero biases that transformers' class builds but the model lacks; returns their projections."""
    if cfg.model_type == "llama":
        needed = ((["q_proj", "k_proj", "v_proj", "o_proj"] if hf_config["attention_bias"] else []) +
                  (["gate_proj", "up_proj", "down_proj"] if hf_config["mlp_bias"] else []))
    else:
        needed = list(_HF_BIASES[cfg.model_type])
    zeroed = [p for p in needed if p not in cfg.bias_projections()]
    for i in range(cfg.num_layers):
        for proj in zeroed:
            part = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            w = tensors[f"model.layers.{i}.{part}.{proj}.weight"]
            tensors[f"model.layers.{i}.{part}.{proj}.bias"] = np.zeros(w.shape[:1], w.dtype)
    return zeroed


def _note(cfg: ModelConfig, blockers: list[str], zero_biases: list[str]) -> str:
    if blockers:
        return (f"transformers' own {_ARCHITECTURES[cfg.model_type]} cannot hold this export: "
                + "; ".join(blockers) + f". transformers loads it through {REMOTE_CODE_FILE} (written next to "
                "config.json; it builds each layer at its own size): "
                "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True). tyr-jax loads it: "
                "tyr_jax.loading.load_model(DIR), or `tyr-jax eval --model DIR`.")
    note = (f"transformers loads this export: AutoModelForCausalLM.from_pretrained(DIR) gives "
            f"{_ARCHITECTURES[cfg.model_type]} with num_attention_heads={cfg.num_heads}, "
            f"num_key_value_heads={cfg.num_kv_heads}, intermediate_size={cfg.intermediate_size}.")
    if zero_biases:
        note += (f" Biases of {', '.join(zero_biases)} are stored as zeros: transformers' "
                 f"{_ARCHITECTURES[cfg.model_type]} has them, the model does not (tyr-jax skips them).")
    return note


def prepare_model_dir(out: pathlib.Path, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ours = [p for p in out.iterdir() if p.suffix == ".safetensors" or p.name in (
        "config.json", "tokenizer.json", "model.safetensors.index.json", NOTE_FILE, REMOTE_CODE_FILE)]
    if ours and not overwrite:
        raise FileExistsError(f"{out} already holds a model ({ours[0].name}); pass overwrite=True to replace it")
    for p in ours:
        p.unlink()
