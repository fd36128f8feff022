"""Test set-up: CPU only, 8 fake devices for mesh tests, strict dtype promotion, fp32 matmuls."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture
def tiny_hf_dir(tmp_path):
    """A tiny random Llama as an HF directory with its own byte-level BPE tokenizer, and a text file."""
    import tokenizers
    import transformers

    text = " ".join(f"The river {w} flows past the old mill near town number {i}." for i, w in
                    enumerate(["Avon", "Thames", "Severn", "Trent", "Wye"] * 40))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    model_dir = tmp_path / "model"
    hf_cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=24, intermediate_size=40,
                                      num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                                      head_dim=4)
    transformers.AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(model_dir)
    tok.save(str(model_dir / "tokenizer.json"))
    return model_dir, corpus
