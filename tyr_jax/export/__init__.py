"""Getting a model out of tyr-jax: Hugging Face directories (`hf`), with transformers remote code where the
layers differ in size (`remote_code/modeling_tyr.py`)."""

from tyr_jax.export.hf import (NOTE_FILE, REMOTE_CODE_FILE, copy_remote_code, export_model, prepare_model_dir,
                               remote_code_config, save_safetensors, transformers_blockers)

__all__ = ["NOTE_FILE", "REMOTE_CODE_FILE", "copy_remote_code", "export_model", "prepare_model_dir",
           "remote_code_config", "save_safetensors", "transformers_blockers"]
