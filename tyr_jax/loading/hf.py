"""Hugging Face checkpoints: `config.json` + `*.safetensors` (single or sharded) + `tokenizer.json`.

Safetensors files are memory-mapped with a small reader of our own (numpy has no bfloat16, so
`safetensors`' numpy backend refuses bf16 checkpoints; ml_dtypes supplies the type). Tensors are
converted from HF's [out, in] layout to ours on the host and placed shard by shard on the devices of
the requested sharding, so a model never has to fit on one device first. No torch import.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from collections.abc import Callable, Mapping

import jax
import ml_dtypes
import numpy as np

from tyr_jax.models.config import ModelConfig
from tyr_jax.models.llama import Attention, Block, Mlp, Weights, abstract_weights

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
# Buffers some old checkpoints carry that are recomputed from the config.
_IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


class SafetensorsFile:
    """Memory-mapped read-only view of one `.safetensors` file."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path} is not a safetensors file (only {size} bytes); re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"{self.path} is truncated or not a safetensors file (header of {n} bytes "
                                 f"in a {size}-byte file); re-download it")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path} has a corrupt safetensors header ({e}); re-download it") from None
        header.pop("__metadata__", None)
        self.header = header
        self._base = 8 + n
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self._base + end > size:
            raise ValueError(f"{self.path} is truncated: tensors need {self._base + end} bytes, the file has "
                             f"{size}; re-download it")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")

    def keys(self):
        return self.header.keys()

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, stop = info["data_offsets"]
        raw = self._map[self._base + start: self._base + stop]
        return raw.view(dtype).reshape(info["shape"])


def open_safetensors(model_dir: pathlib.Path) -> dict[str, SafetensorsFile]:
    """Tensor name → file holding it, for a single file or a sharded checkpoint with an index."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {f: SafetensorsFile(model_dir / f) for f in sorted(set(weight_map.values()))}
        return {name: files[f] for name, f in weight_map.items()}
    paths = sorted(model_dir.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights (PyTorch .bin checkpoints are not "
                                "read; convert them with transformers' save_pretrained(safe_serialization=True))")
    table = {}
    for path in paths:
        st = SafetensorsFile(path)
        table.update({name: st for name in st.keys()})
    return table


# -- HF layout ↔ ours ---------------------------------------------------------------------------


def _hf_layer_tensors(cfg: ModelConfig, i: int) -> dict[str, tuple[str, Callable]]:
    """For layer i: our field path → (HF tensor name, HF array → our array)."""
    d, h, g = cfg.hidden_size, cfg.head_dim, cfg.q_per_kv
    pre = f"model.layers.{i}."
    table = {
        "attn.norm_d": (pre + "input_layernorm.weight", lambda w: w),
        "attn.q_dkgh": (pre + "self_attn.q_proj.weight", lambda w: w.T.reshape(d, -1, g, h)),
        "attn.k_dkh": (pre + "self_attn.k_proj.weight", lambda w: w.T.reshape(d, -1, h)),
        "attn.v_dkh": (pre + "self_attn.v_proj.weight", lambda w: w.T.reshape(d, -1, h)),
        "attn.o_kghd": (pre + "self_attn.o_proj.weight", lambda w: w.T.reshape(-1, g, h, d)),
        "mlp.norm_d": (pre + "post_attention_layernorm.weight", lambda w: w),
        "mlp.gate_df": (pre + "mlp.gate_proj.weight", lambda w: w.T),
        "mlp.up_df": (pre + "mlp.up_proj.weight", lambda w: w.T),
        "mlp.down_fd": (pre + "mlp.down_proj.weight", lambda w: w.T),
    }
    if cfg.qkv_bias:
        table["attn.q_bias_kgh"] = (pre + "self_attn.q_proj.bias", lambda w: w.reshape(-1, g, h))
        table["attn.k_bias_kh"] = (pre + "self_attn.k_proj.bias", lambda w: w.reshape(-1, h))
        table["attn.v_bias_kh"] = (pre + "self_attn.v_proj.bias", lambda w: w.reshape(-1, h))
    if cfg.o_bias:
        table["attn.o_bias_d"] = (pre + "self_attn.o_proj.bias", lambda w: w)
    if cfg.mlp_bias:
        table["mlp.gate_bias_f"] = (pre + "mlp.gate_proj.bias", lambda w: w)
        table["mlp.up_bias_f"] = (pre + "mlp.up_proj.bias", lambda w: w)
    if cfg.mlp_bias or cfg.down_bias:
        table["mlp.down_bias_d"] = (pre + "mlp.down_proj.bias", lambda w: w)
    return table


def _global_tensors(cfg: ModelConfig) -> dict[str, tuple[str, Callable]]:
    table = {"embed_vd": ("model.embed_tokens.weight", lambda w: w),
             "final_norm_d": ("model.norm.weight", lambda w: w)}
    if not cfg.tie_word_embeddings:
        table["lm_head_dv"] = ("lm_head.weight", lambda w: w.T)
    return table


def weights_from_hf(cfg: ModelConfig, tensors: Mapping[str, Callable[[], np.ndarray]], *,
                    dtype=jax.numpy.float32, shardings: Weights | None = None) -> Weights:
    """Builds `Weights` from HF-named tensors (name → loader of an [out, in] numpy array).

    Each array is converted on the host and placed with `shardings` (a pytree of `Sharding`s like
    the weights; default: the default device). Missing, unexpected or mis-shaped tensors are errors.
    """
    expected = abstract_weights(cfg, dtype)
    used = set()

    def place(path: str, hf_name: str, convert: Callable, target: jax.ShapeDtypeStruct, sharding):
        if hf_name not in tensors:
            raise ValueError(f"checkpoint has no tensor {hf_name} that config.json implies; the weights and "
                             "config.json do not belong together")
        used.add(hf_name)
        raw = tensors[hf_name]()
        try:
            host = np.asarray(convert(raw))
        except ValueError:
            host = None
        if host is None or host.shape != target.shape:
            raise ValueError(f"tensor {hf_name} has shape {tuple(raw.shape)}, which does not fit {path} "
                             f"{target.shape} from config.json; the weights and config do not match")
        host = host.astype(target.dtype)
        if sharding is None:
            return jax.device_put(host)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    def field(node, name):
        for part in name.split("."):
            node = getattr(node, part)
        return node

    def build(table, abstract, sharding_tree, make):
        values = {}
        for path, (hf_name, convert) in table.items():
            values[path] = place(path, hf_name, convert, field(abstract, path),
                                 None if sharding_tree is None else field(sharding_tree, path))
        return make(values)

    def make_block(values):
        attn = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("attn.")}
        mlp_w = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("mlp.")}
        return Block(attn=Attention(**attn), mlp=Mlp(**mlp_w))

    blocks = [build(_hf_layer_tensors(cfg, i), expected.blocks[i],
                    None if shardings is None else shardings.blocks[i], make_block)
              for i in range(cfg.num_layers)]
    weights = build(_global_tensors(cfg), expected, shardings,
                    lambda values: Weights(blocks=blocks, **values))
    # All-zero biases the config does not use are exact no-ops; exports write them where transformers'
    # Llama (biases on all of q/k/v/o or none, on all of gate/up/down or none) needs them.
    extra = sorted(n for n in tensors if n not in used and not n.endswith(_IGNORED_TENSOR_SUFFIXES)
                   and not (cfg.tie_word_embeddings and n == "lm_head.weight")
                   and not (n.endswith("_proj.bias") and not np.any(tensors[n]())))
    if extra:
        raise ValueError(f"checkpoint has {len(extra)} tensor(s) the config does not explain, e.g. {extra[0]}; "
                         "it is not a plain Llama-family checkpoint with this config.json")
    return weights


def weights_to_hf(weights: Weights, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our weights → HF-named numpy arrays in [out, in] layout (the inverse of `weights_from_hf`)."""
    out = {"model.embed_tokens.weight": np.asarray(weights.embed_vd),
           "model.norm.weight": np.asarray(weights.final_norm_d)}
    if weights.lm_head_dv is not None:
        out["lm_head.weight"] = np.asarray(weights.lm_head_dv).T
    for i, blk in enumerate(weights.blocks):
        pre = f"model.layers.{i}."
        a, m = blk.attn, blk.mlp
        d = a.norm_d.shape[0]
        out[pre + "input_layernorm.weight"] = np.asarray(a.norm_d)
        out[pre + "post_attention_layernorm.weight"] = np.asarray(m.norm_d)
        out[pre + "self_attn.q_proj.weight"] = np.asarray(a.q_dkgh).reshape(d, -1).T
        out[pre + "self_attn.k_proj.weight"] = np.asarray(a.k_dkh).reshape(d, -1).T
        out[pre + "self_attn.v_proj.weight"] = np.asarray(a.v_dkh).reshape(d, -1).T
        out[pre + "self_attn.o_proj.weight"] = np.asarray(a.o_kghd).reshape(-1, d).T
        out[pre + "mlp.gate_proj.weight"] = np.asarray(m.gate_df).T
        out[pre + "mlp.up_proj.weight"] = np.asarray(m.up_df).T
        out[pre + "mlp.down_proj.weight"] = np.asarray(m.down_fd).T
        for name, value in (("self_attn.q_proj.bias", a.q_bias_kgh), ("self_attn.k_proj.bias", a.k_bias_kh),
                            ("self_attn.v_proj.bias", a.v_bias_kh), ("self_attn.o_proj.bias", a.o_bias_d),
                            ("mlp.gate_proj.bias", m.gate_bias_f), ("mlp.up_proj.bias", m.up_bias_f),
                            ("mlp.down_proj.bias", m.down_bias_d)):
            if value is not None:
                out[pre + name] = np.asarray(value).reshape(-1)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def read_hf_json(model_dir: pathlib.Path) -> dict:
    """The directory's config.json as a dict."""
    path = model_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} has no config.json; pass a Hugging Face model directory, a "
                                ".gguf file or a built-in name")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def load_hf_dir(model_dir: str | os.PathLike, *, dtype=jax.numpy.float32, shardings=None):
    """(config, weights) of an HF model directory; weights placed with `shardings` if given.

    A PBS²P export (`tyr_binary` in config.json) is unpacked to dense weights on the way in."""
    model_dir = pathlib.Path(model_dir)
    hf = read_hf_json(model_dir)
    binary = hf.pop("tyr_binary", None)
    cfg = ModelConfig.from_hf(hf)
    table = open_safetensors(model_dir)
    tensors = {name: (lambda n=name, f=st: f.get(n)) for name, st in table.items()}
    if binary is not None:
        from tyr_jax.binarization.packed import unpacked_tensors

        tensors = unpacked_tensors(tensors, binary, cfg)
    if callable(shardings):
        shardings = shardings(abstract_weights(cfg, dtype))
    return cfg, weights_from_hf(cfg, tensors, dtype=dtype, shardings=shardings)
