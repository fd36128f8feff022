"""Getting a model out of tyr-jax: Hugging Face directories (`hf`)."""

from tyr_jax.export.hf import NOTE_FILE, export_model, prepare_model_dir, save_safetensors, transformers_blockers

__all__ = ["NOTE_FILE", "export_model", "prepare_model_dir", "save_safetensors", "transformers_blockers"]
