"""Getting a model out of tyr-jax: Hugging Face directories (`hf`) and GGUF files for llama.cpp (`gguf`)."""

from tyr_jax.export.gguf import GGUF_TYPES, check_gguf_export, export_gguf, gguf_blockers, tokenizer_fields
from tyr_jax.export.hf import NOTE_FILE, export_model, prepare_model_dir, save_safetensors, transformers_blockers

__all__ = ["GGUF_TYPES", "NOTE_FILE", "check_gguf_export", "export_gguf", "export_model", "gguf_blockers", "prepare_model_dir",
           "save_safetensors", "tokenizer_fields", "transformers_blockers"]
