"""Getting a model out of tyr-jax: Hugging Face directories (`hf`), with transformers remote code where the
layers differ in size (`remote_code/modeling_tyr.py`), and GGUF files for llama.cpp (`gguf`)."""

from tyr_jax.export.gguf import GGUF_TYPES, check_gguf_export, export_gguf, gguf_blockers, tokenizer_fields
from tyr_jax.export.hf import (NOTE_FILE, REMOTE_CODE_FILE, copy_remote_code, export_model, prepare_model_dir,
                               remote_code_config, save_safetensors, transformers_blockers)

__all__ = ["GGUF_TYPES", "NOTE_FILE", "REMOTE_CODE_FILE", "check_gguf_export", "copy_remote_code", "export_gguf",
           "export_model", "gguf_blockers", "prepare_model_dir", "remote_code_config", "save_safetensors",
           "tokenizer_fields", "transformers_blockers"]
