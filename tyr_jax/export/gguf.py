"""Export: a (pruned) model → one GGUF file that stock llama.cpp runs (and quantizes).

Every layer the same, non-zero size (dense or uniformly pruned) goes out as llama.cpp's `llama`
architecture; per-layer sizes go out as its `deci` architecture (`src/models/deci.cpp`), whose
`deci.attention.head_count`, `deci.attention.head_count_kv` and `deci.feed_forward_length` are per-layer
arrays, 0 meaning a removed sublayer. Qwen2 and Mistral are written as `llama` / `deci` too: both loaders
read optional q/k/v, o and MLP biases, a `rope_freqs` tensor (Llama 3.1 rope scaling) and tie the output
to `token_embd` when `output.weight` is absent. Rows of q/k are stored in llama.cpp's rotary order
(`loading.gguf.permute_rows`, the inverse of what the reader undoes).

What deci cannot say directly gets an exact stand-in (checked in llama.cpp 11434's deci graph):
  - a removed attention on layer 0: llama.cpp takes the head size from layer 0's head count, so the layer
    keeps one KV group whose o_proj is zero;
  - a removed MLP after a kept attention, or on the last layer: deci's `n_ff == 0` path skips the rest of
    the layer (it would drop that attention's output, and the last layer's output-row selection), so the
    MLP keeps one channel whose gate, up and down are zero;
  - a removed sublayer whose output bias is non-zero (deci ignores biases of removed sublayers): the same
    one-unit stand-ins, contributing exactly that bias.
A sliding-window model is refused (deci and llama attend over the whole context).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import gguf
import numpy as np
import tokenizers

from tyr_jax.export.hf import _check_shapes
from tyr_jax.loading.gguf import gguf_pre_tokenizer, permute_rows, read_gguf_fields
from tyr_jax.loading.hf import read_hf_json, weights_to_hf
from tyr_jax.models.config import ModelConfig
from tyr_jax.models.llama import Weights, rope_frequencies

__all__ = ["GGUF_TYPES", "check_gguf_export", "export_gguf", "gguf_blockers", "tokenizer_fields"]

# --type → (tensor type of the matrices, general.file_type). Norms, biases and rope factors stay F32.
GGUF_TYPES = {"f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
              "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
              "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16)}
_TENSOR_NAMES = {  # HF name (after `model.layers.{i}.`) → GGUF name (after `blk.{i}.`)
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"self_attn.{p}_proj.{k}": f"attn_{g}.{k}" for p, g in (("q", "q"), ("k", "k"), ("v", "v"),
                                                             ("o", "output")) for k in ("weight", "bias")},
    **{f"mlp.{p}_proj.{k}": f"ffn_{p}.{k}" for p in ("gate", "up", "down") for k in ("weight", "bias")},
}
# Text whose pre-tokenization tells llama.cpp's pre-tokenizer names apart (digits, contractions,
# whitespace runs, newlines, non-Latin letters, a combining accent for NFC).
_PROBE = ("Hello world's 12345 6 dogs; I'M ok, don't\n\n  two  spaces\tand\ttabs\r\n ÄÖü e\u0301 你好 "
          "$%^&*() 3.14159 ...!!! ' '  end ")
_PRE_NAMES = ("smollm", "gpt-2", "llama-bpe", "qwen2")


@dataclasses.dataclass(frozen=True)
class _LayerSizes:
    """What one layer is written as: head counts and MLP width as llama.cpp reads them, and why."""

    heads: int
    kv_heads: int
    mlp_width: int
    attn_stand_in: bool = False
    mlp_stand_in: bool = False


def export_gguf(weights: Weights, cfg: ModelConfig, path: str | os.PathLike, *,
                source: str | os.PathLike | tokenizers.Tokenizer, type: str = "f32",
                context_length: int | None = None, overwrite: bool = False, name: str | None = None) -> dict:
    """Writes the model as one GGUF file for llama.cpp (`llama` arch, or `deci` for per-layer sizes).

    Args:
      weights, cfg: the model (e.g. from `llama.apply_masks`, `supernet.assemble` or `load_model`).
      path: the `.gguf` file; an existing file is refused unless `overwrite`. Written atomically.
      source: where the vocabulary comes from: the GGUF file (or built-in name) the model was pruned from,
        whose `tokenizer.*` metadata is copied; an HF directory with `tokenizer.json`; or a
        `tokenizers.Tokenizer` (byte-level BPE with a pre-tokenizer llama.cpp names).
      type: `f32`, `f16` or `bf16` for the matrices (norms and biases stay f32, as llama.cpp keeps them).
      context_length: `{arch}.context_length`; default: the source's (GGUF metadata or config.json's
        `max_position_embeddings`).
      name: `general.name`, default the file's stem.

    Returns:
      {"path", "arch", "type", "stand_ins": [what was written as an exact zero stand-in, per layer]}.
    """
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    fields, context_length = check_gguf_export(cfg, source, type=type, context_length=context_length)
    _check_shapes(weights, cfg)

    layers = _layer_sizes(weights, cfg)
    uniform = len({(s.heads, s.kv_heads, s.mlp_width) for s in layers}) == 1 and layers[0].kv_heads > 0 \
        and layers[0].mlp_width > 0
    arch = "llama" if uniform else "deci"
    tensors = _gguf_tensors(weights, cfg, layers)

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:  # written under another name and renamed: a killed export leaves no half file at `path`
        writer = gguf.GGUFWriter(partial, arch)
        _add_hparams(writer, cfg, layers, uniform, context_length, type, name or path.stem)
        for key, value, vtype, sub_type in fields:
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        matrix_type = GGUF_TYPES[type][0]
        for tensor_name, w in tensors.items():
            qtype = matrix_type if w.ndim == 2 else gguf.GGMLQuantizationType.F32
            writer.add_tensor(tensor_name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    stand_ins = ([f"layer {i}: attention removed, written as 1 KV group with zero weights"
                  for i, s in enumerate(layers) if s.attn_stand_in] +
                 [f"layer {i}: MLP removed, written as 1 channel with zero weights"
                  for i, s in enumerate(layers) if s.mlp_stand_in])
    return {"path": str(path), "arch": arch, "type": type, "stand_ins": stand_ins}


def check_gguf_export(cfg: ModelConfig, source, *, type: str = "f32",
                      context_length: int | None = None) -> tuple[list[tuple], int]:
    """Everything `export_gguf` needs besides the weights, checked before any work (e.g. at the start of
    `tyr-jax prune`): returns (tokenizer fields, context length) or raises a ValueError saying what to fix."""
    if type not in GGUF_TYPES:
        raise ValueError(f"GGUF type {type!r} is not supported; choose one of {', '.join(GGUF_TYPES)} "
                         "(quantize further with llama.cpp's llama-quantize)")
    if blockers := gguf_blockers(cfg):
        raise ValueError("llama.cpp cannot run this model as exported: " + "; ".join(blockers))
    fields = tokenizer_fields(source, cfg)
    context_length = context_length or _source_context_length(source)
    if not context_length:
        raise ValueError("the context length is unknown (the source names none); pass context_length=N "
                         "(CLI: --context-length N), e.g. the original model's max_position_embeddings")
    return fields, int(context_length)


def gguf_blockers(cfg: ModelConfig) -> list[str]:
    """Settings of `cfg` that llama.cpp's llama / deci architectures cannot run exactly (empty: none)."""
    reasons = []
    if cfg.sliding_window is not None:
        reasons.append(f"sliding_window={cfg.sliding_window}: llama.cpp's llama and deci architectures attend "
                       "over the whole context, so the logits would differ beyond the window")
    if cfg.rope.rope_type not in ("default", "linear", "llama3"):
        reasons.append(f"rope_type {cfg.rope.rope_type!r} has no llama.cpp llama/deci equivalent")
    return reasons


def tokenizer_fields(source: str | os.PathLike | tokenizers.Tokenizer,
                     cfg: ModelConfig) -> list[tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """The `tokenizer.*` GGUF metadata for `cfg`'s vocabulary: `(key, value, type, array item type)`.

    A GGUF source's fields are copied as they are; an HF directory or a `tokenizers.Tokenizer` is
    described from its vocabulary, merges and added tokens.
    """
    if isinstance(source, tokenizers.Tokenizer):
        return _fields_from_tokenizer(source, cfg)
    from tyr_jax.loading import resolve_model_path

    path = resolve_model_path(source)
    if path.is_dir():
        tok_path = path / "tokenizer.json"
        if not tok_path.exists():
            raise ValueError(f"{path} has no tokenizer.json, and llama.cpp needs the vocabulary; add it or "
                             "export from the GGUF file the model came from")
        return _fields_from_tokenizer(tokenizers.Tokenizer.from_file(str(tok_path)), cfg)
    fields = []
    for key, field in read_gguf_fields(path).items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        fields.append((key, field.contents(), vtype, sub_type))
    tokens = next((v for k, v, *_ in fields if k == "tokenizer.ggml.tokens"), None)
    if tokens is None or len(tokens) != cfg.vocab_size:
        raise ValueError(f"{path} has {0 if tokens is None else len(tokens)} tokens, the model's embedding "
                         f"{cfg.vocab_size} rows; export from the GGUF file the model was pruned from")
    return fields


def _fields_from_tokenizer(tok: tokenizers.Tokenizer, cfg: ModelConfig) -> list[tuple]:
    """GGUF `gpt2` (byte-level BPE) tokenizer metadata describing a `tokenizers.Tokenizer`."""
    model = json.loads(tok.to_str())["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"tokenizer model {model.get('type')!r} is not byte-level BPE; the GGUF export "
                         "writes llama.cpp's 'gpt2' tokenizer only (export from a GGUF source instead)")
    pre = _pre_tokenizer_name(tok)
    tokens = [f"[PAD{i}]" for i in range(cfg.vocab_size)]
    kinds = [gguf.TokenType.UNUSED] * cfg.vocab_size
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if i >= cfg.vocab_size:
            raise ValueError(f"tokenizer id {i} ({token!r}) lies beyond the model's {cfg.vocab_size} "
                             "embedding rows; the tokenizer does not belong to this model")
        tokens[i], kinds[i] = token, gguf.TokenType.NORMAL
    for i, added in tok.get_added_tokens_decoder().items():
        kinds[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise ValueError("tokenizer has no BPE merges, which llama.cpp's gpt2 tokenizer requires")
    S, U, B, A = (gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.BOOL,
                  gguf.GGUFValueType.ARRAY)
    fields = [("tokenizer.ggml.model", "gpt2", S, None), ("tokenizer.ggml.pre", pre, S, None),
              ("tokenizer.ggml.tokens", tokens, A, S),
              ("tokenizer.ggml.token_type", [int(k) for k in kinds], A, gguf.GGUFValueType.INT32),
              ("tokenizer.ggml.merges", merges, A, S)]
    bos = cfg.bos_token_id
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    if bos is not None:
        fields.append(("tokenizer.ggml.bos_token_id", bos, U, None))
        adds_bos = tok.encode("a", add_special_tokens=True).ids[:1] == [bos]
        fields.append(("tokenizer.ggml.add_bos_token", adds_bos, B, None))
    if eos is not None:
        fields.append(("tokenizer.ggml.eos_token_id", eos, U, None))
    return fields


def _pre_tokenizer_name(tok: tokenizers.Tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization, found by splitting a probe text both ways."""
    def splits(normalizer, pre_tokenizer):
        text = _PROBE if normalizer is None else normalizer.normalize_str(_PROBE)
        return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]

    if tok.pre_tokenizer is not None:
        ours = splits(tok.normalizer, tok.pre_tokenizer)
        for name in _PRE_NAMES:
            pre_tokenizer, normalizer, _ = gguf_pre_tokenizer(name)
            if splits(normalizer, pre_tokenizer) == ours:
                return name
    raise ValueError("the tokenizer's pre-tokenizer matches none that llama.cpp names among "
                     f"{', '.join(_PRE_NAMES)}; export from a GGUF source of the model instead")


def _source_context_length(source) -> int | None:
    """`{arch}.context_length` of a GGUF source, `max_position_embeddings` of an HF one."""
    if isinstance(source, tokenizers.Tokenizer):
        return None
    from tyr_jax.loading import resolve_model_path

    path = resolve_model_path(source)
    if path.is_dir():
        return read_hf_json(path).get("max_position_embeddings")
    fields = read_gguf_fields(path)
    arch = fields["general.architecture"].contents()
    field = fields.get(f"{arch}.context_length")
    return None if field is None else int(field.contents())


def _layer_sizes(weights: Weights, cfg: ModelConfig) -> list[_LayerSizes]:
    """Each layer's head counts and MLP width as written, with the exact stand-ins deci needs."""
    g, last = cfg.q_per_kv, len(weights.blocks) - 1
    sizes = []
    for i, blk in enumerate(weights.blocks):
        kv, width = blk.attn.k_dkh.shape[1], blk.mlp.down_fd.shape[0]
        attn_stand_in = kv == 0 and (i == 0 or _nonzero(blk.attn.o_bias_d))
        kv = kv or int(attn_stand_in)
        mlp_stand_in = width == 0 and (kv > 0 or i == last or _nonzero(blk.mlp.down_bias_d))
        sizes.append(_LayerSizes(heads=kv * g, kv_heads=kv, mlp_width=width or int(mlp_stand_in),
                                 attn_stand_in=attn_stand_in, mlp_stand_in=mlp_stand_in))
    return sizes


def _nonzero(bias) -> bool:
    return bias is not None and bool(np.any(np.asarray(bias)))


def _add_hparams(writer: gguf.GGUFWriter, cfg: ModelConfig, layers: Sequence[_LayerSizes], uniform: bool,
                 context_length: int, type: str, name: str) -> None:
    def per_layer(field: str):
        values = [getattr(s, field) for s in layers]
        return values[0] if uniform else values

    writer.add_name(name)
    writer.add_file_type(GGUF_TYPES[type][1])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(int(context_length))
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(per_layer("mlp_width"))
    writer.add_head_count(per_layer("heads"))
    writer.add_head_count_kv(per_layer("kv_heads"))
    writer.add_key_length(cfg.head_dim)  # explicit: hidden / heads is not the head size once pruned
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope.theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.rope.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope.factor)


def _gguf_tensors(weights: Weights, cfg: ModelConfig, layers: Sequence[_LayerSizes]) -> dict[str, np.ndarray]:
    """float32 tensors under GGUF names, in GGUF order (q/k rows permuted, zero stand-ins filled in)."""
    hf = weights_to_hf(weights, cfg)
    out = {"token_embd.weight": hf.pop("model.embed_tokens.weight")}
    if cfg.rope.rope_type == "llama3":
        # llama.cpp divides each rope frequency by its factor: the ratio of plain to scaled frequencies.
        plain = rope_frequencies(dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, rope_type="default")))
        out["rope_freqs.weight"] = np.asarray(plain / rope_frequencies(cfg), np.float32)
    d, h = cfg.hidden_size, cfg.head_dim
    for i, sizes in enumerate(layers):
        pre = f"model.layers.{i}."
        layer = {name[len(pre):]: w for name, w in hf.items() if name.startswith(pre)}
        if sizes.attn_stand_in:
            layer.update({"self_attn.q_proj.weight": np.zeros((sizes.heads * h, d), np.float32),
                          "self_attn.k_proj.weight": np.zeros((h, d), np.float32),
                          "self_attn.v_proj.weight": np.zeros((h, d), np.float32),
                          "self_attn.o_proj.weight": np.zeros((d, sizes.heads * h), np.float32)})
            for p, n in (("q", sizes.heads * h), ("k", h), ("v", h)):
                if f"self_attn.{p}_proj.bias" in layer:
                    layer[f"self_attn.{p}_proj.bias"] = np.zeros((n,), np.float32)
        if sizes.mlp_stand_in:
            layer.update({"mlp.gate_proj.weight": np.zeros((1, d), np.float32),
                          "mlp.up_proj.weight": np.zeros((1, d), np.float32),
                          "mlp.down_proj.weight": np.zeros((d, 1), np.float32)})
            for p in ("gate", "up"):
                if f"mlp.{p}_proj.bias" in layer:
                    layer[f"mlp.{p}_proj.bias"] = np.zeros((1,), np.float32)
        for hf_name, w in layer.items():
            is_mlp = hf_name.startswith(("mlp.", "post_attention_layernorm."))
            if (sizes.mlp_width if is_mlp else sizes.kv_heads) == 0:
                continue  # a removed sublayer: deci reads none of its tensors (norm included)
            if hf_name.startswith(("self_attn.q_proj.", "self_attn.k_proj.")):
                w = permute_rows(w, sizes.heads if hf_name.startswith("self_attn.q") else sizes.kv_heads)
            out[f"blk.{i}.{_TENSOR_NAMES[hf_name]}"] = w
    out["output_norm.weight"] = hf.pop("model.norm.weight")
    if "lm_head.weight" in hf:
        out["output.weight"] = hf.pop("lm_head.weight")
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}
