"""Export of dense and pruned models: tyr-jax reloads give equal logits; transformers' stock classes load what
they can express, the rest loads with trust_remote_code (tests/test_export_transformers.py)."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from tyr_jax.export import NOTE_FILE, export_model, remote_code_config, save_safetensors, transformers_blockers
from tyr_jax.loading import load_model
from tyr_jax.loading.hf import SafetensorsFile, load_hf_dir, weights_to_hf
from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, head_dim=8,
            max_position_embeddings=128, rms_norm_eps=1e-5, num_attention_heads=4, num_key_value_heads=2)
HF_VARIANTS = {
    "llama": (transformers.LlamaConfig, dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama_tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen2_sliding": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=5,
                                                     max_window_layers=0)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=5)),
}
TOKENS = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 12)).astype(np.int32)
UNIFORM = ([[0], [1], [1]], [np.arange(0, 48, 2), np.arange(24), np.arange(24, 48)])
HETEROGENEOUS = ([[0, 1], [1], [0]], [np.arange(48), np.arange(20), np.arange(7, 40)])
REMOVED = ([[1], [], [0, 1]], [np.array([0, 5, 7, 40]), np.arange(48), np.array([], int)])


def _hf_dense(tmp_path, name, seed=0):
    """A tiny random transformers model (random biases and norms), saved and loaded with tyr-jax."""
    cls, extra = HF_VARIANTS[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cls(**{**TINY, **extra}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / f"{name}-dense")
    return load_hf_dir(tmp_path / f"{name}-dense")


def _pruned(tmp_path, name, keep):
    cfg, weights = _hf_dense(tmp_path, name)
    return _prune(weights, cfg, keep)


def _prune(weights, cfg, keep):
    kv_keep, mlp_keep = keep
    masks = llama.UnitMasks(
        kv_lk=jnp.asarray(np.stack([np.isin(np.arange(cfg.num_kv_heads), k) for k in kv_keep]), jnp.float32),
        mlp_lf=jnp.asarray(np.stack([np.isin(np.arange(cfg.intermediate_size), m) for m in mlp_keep]),
                           jnp.float32))
    return llama.apply_masks(weights, cfg, masks)


def _with_flap_biases(weights, seed=1, layers=None):
    """FLAP-style compensation: o_proj and down_proj biases only (on `layers`, default all)."""
    rng = np.random.default_rng(seed)
    blocks = []
    for i, b in enumerate(weights.blocks):
        if layers is None or i in layers:
            d = b.attn.norm_d.shape[0]
            b = llama.Block(
                attn=dataclasses.replace(b.attn, o_bias_d=jnp.asarray(0.1 * rng.standard_normal(d), jnp.float32)),
                mlp=dataclasses.replace(b.mlp, down_bias_d=jnp.asarray(0.1 * rng.standard_normal(d), jnp.float32)))
        blocks.append(b)
    return dataclasses.replace(weights, blocks=blocks)


def _logits(weights, cfg):
    return np.asarray(llama.forward(weights, TOKENS, cfg))


def _assert_tyr_reload_equal(out, weights, cfg):
    model = load_model(out)
    np.testing.assert_array_equal(_logits(model.weights, model.cfg), _logits(weights, cfg))
    return model


def _transformers_logits(out):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        return model.eval()(torch.as_tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen2_sliding", "mistral"])
def test_dense_model_exports_as_a_plain_hf_checkpoint(name, tmp_path):
    cfg, weights = _hf_dense(tmp_path, name)
    report = export_model(weights, cfg, tmp_path / "out")
    assert report["tyr_jax"] and report["transformers"] and not report["trust_remote_code"], report
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert not any(k.startswith("tyr_") for k in hf) and not (tmp_path / "out" / NOTE_FILE).exists()
    model = _assert_tyr_reload_equal(tmp_path / "out", weights, cfg)
    assert model.cfg == cfg
    np.testing.assert_allclose(_transformers_logits(tmp_path / "out"), _logits(weights, cfg), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_uniform_pruning_exports_as_a_smaller_dense_model(name, tmp_path):
    small, small_cfg = _pruned(tmp_path, name, UNIFORM)
    report = export_model(small, small_cfg, tmp_path / "out")
    assert not report["trust_remote_code"], report
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (hf["num_key_value_heads"], hf["num_attention_heads"], hf["intermediate_size"]) == (1, 2, 24)
    model = _assert_tyr_reload_equal(tmp_path / "out", small, small_cfg)
    assert model.cfg.num_params() == small_cfg.num_params()
    np.testing.assert_allclose(_transformers_logits(tmp_path / "out"), _logits(small, small_cfg), atol=1e-4,
                               rtol=0)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_heterogeneous_pruning_loads_in_tyr_jax_and_says_why_transformers_needs_remote_code(name, tmp_path):
    small, small_cfg = _pruned(tmp_path, name, HETEROGENEOUS)
    report = export_model(small, small_cfg, tmp_path / "out")
    assert report["trust_remote_code"]
    assert "different numbers of KV groups (2, 1, 1)" in report["transformers_note"]
    assert "different numbers of MLP channels (48, 20, 33)" in report["transformers_note"]
    assert (tmp_path / "out" / NOTE_FILE).read_text().strip() == report["transformers_note"]
    model = _assert_tyr_reload_equal(tmp_path / "out", small, small_cfg)
    assert model.cfg == small_cfg
    chex.assert_trees_all_equal(model.weights, small)
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # the stock classes are not used
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=False)


def test_removed_sublayers_are_named_in_the_note(tmp_path):
    small, small_cfg = _pruned(tmp_path, "llama", REMOVED)
    report = export_model(small, small_cfg, tmp_path / "out")
    assert report["trust_remote_code"]
    note = report["transformers_note"]
    assert "layer 1 has no attention heads" in note and "layer 2 has no MLP channels" in note
    assert "cannot remove a sublayer" in note
    _assert_tyr_reload_equal(tmp_path / "out", small, small_cfg)


@pytest.mark.parametrize("keep", [HETEROGENEOUS, REMOVED], ids=["heterogeneous", "removed"])
def test_flap_o_and_down_biases_reload_exactly(keep, tmp_path):
    cfg, weights = _hf_dense(tmp_path, "llama")
    small, small_cfg = _prune(weights, cfg, keep)
    small = _with_flap_biases(small)
    small_cfg = dataclasses.replace(small_cfg, o_bias=True)  # as supernet.assemble leaves it
    report = export_model(small, small_cfg, tmp_path / "out")
    assert report["trust_remote_code"]
    model = _assert_tyr_reload_equal(tmp_path / "out", small, small_cfg)
    assert (model.cfg.qkv_bias, model.cfg.o_bias, model.cfg.mlp_bias, model.cfg.down_bias) == (
        False, True, False, True)
    blk = model.weights.blocks[0]
    assert blk.attn.q_bias_kgh is None and blk.mlp.gate_bias_f is None and blk.mlp.down_bias_d is not None
    assert jax.tree.structure(model.weights) == jax.tree.structure(small)
    chex.assert_trees_all_equal(model.weights, small)


def test_flap_biases_on_uniform_llama_load_in_transformers_with_zero_biases(tmp_path):
    cfg, weights = _hf_dense(tmp_path, "llama")
    small, small_cfg = _prune(weights, cfg, UNIFORM)
    small = _with_flap_biases(small, layers={0, 2})  # layer 1 gets zero biases
    report = export_model(small, small_cfg, tmp_path / "out")
    assert not report["trust_remote_code"], report
    assert "q_proj, k_proj, v_proj, gate_proj, up_proj are stored as zeros" in report["transformers_note"]
    model = _assert_tyr_reload_equal(tmp_path / "out", small, small_cfg)
    assert model.cfg.bias_projections() == ["o_proj", "down_proj"]  # the zeros are not loaded
    assert not np.any(np.asarray(model.weights.blocks[1].attn.o_bias_d))
    np.testing.assert_allclose(_transformers_logits(tmp_path / "out"), _logits(small, small_cfg), atol=1e-4,
                               rtol=0)


def test_flap_biases_on_qwen2_need_remote_code(tmp_path):
    small, small_cfg = _pruned(tmp_path, "qwen2", UNIFORM)
    small = _with_flap_biases(small)
    report = export_model(small, small_cfg, tmp_path / "out")
    assert report["trust_remote_code"]
    assert "Qwen2ForCausalLM has no bias on o_proj, down_proj" in report["transformers_note"]
    model = _assert_tyr_reload_equal(tmp_path / "out", small, small_cfg)
    assert model.cfg.bias_projections() == ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


@pytest.mark.parametrize("keep", [UNIFORM, HETEROGENEOUS], ids=["uniform", "heterogeneous"])
def test_bf16_weights_export_and_reload_bit_exact(keep, tmp_path):
    cfg, weights = _hf_dense(tmp_path, "llama")
    small, small_cfg = _prune(jax.tree.map(lambda x: x.astype(jnp.bfloat16), weights), cfg, keep)
    report = export_model(small, small_cfg, tmp_path / "out")
    assert report["trust_remote_code"] == (keep is HETEROGENEOUS)
    st = SafetensorsFile(tmp_path / "out" / "model.safetensors")
    assert {v["dtype"] for v in st.header.values()} == {"BF16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    model = load_model(tmp_path / "out", dtype=jnp.bfloat16)  # same bits, same shapes: the same function
    assert model.cfg.num_params() == small_cfg.num_params()
    assert jax.tree.structure(model.weights) == jax.tree.structure(small)
    for a, b in zip(jax.tree.leaves(model.weights), jax.tree.leaves(small), strict=True):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))
    # transformers reads the same bf16 bits, with its stock class or with the remote code
    state = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", trust_remote_code=report["trust_remote_code"]).state_dict()
    for name, value in weights_to_hf(model.weights, model.cfg).items():
        assert state[name].dtype == torch.bfloat16, name
        np.testing.assert_array_equal(state[name].float().numpy(), value.astype(np.float32), err_msg=name)


def test_safetensors_writer_matches_the_reference_reader(tmp_path):
    from safetensors.numpy import load_file

    tensors = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.zeros((0, 4), np.float32),
               "c": np.array([1, -2], np.int64)}
    save_safetensors(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == v.dtype and back[k].shape == v.shape


def test_tokenizer_and_cli_eval_on_the_export(tmp_path, capsys):
    from tyr_jax.cli import main
    from tyr_jax.data import sampler
    from tyr_jax.evaluation.perplexity import perplexity

    words = [f"w{i}" for i in range(TINY["vocab_size"] - 1)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])},
                                                           unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    small, small_cfg = _pruned(tmp_path, "llama", REMOVED)
    export_model(small, small_cfg, tmp_path / "out", tokenizer=tok)
    text = " ".join(words[i % len(words)] for i in range(0, 300, 7))
    (tmp_path / "text.txt").write_text(text)
    result = main(["eval", "--model", str(tmp_path / "out"), "--text", str(tmp_path / "text.txt"), "--seq-len", "8",
                   "--json", str(tmp_path / "eval.json")])
    assert result in (0, None)
    got = json.loads((tmp_path / "eval.json").read_text())
    windows = sampler.token_windows(sampler.tokenize(tok, text), 8, None)
    want = perplexity(small, small_cfg, windows, batch_size=8)
    assert got["tokens_scored"] == want["tokens_scored"] > 0
    np.testing.assert_allclose(got["ppl"], want["ppl"], rtol=1e-5)


def test_existing_model_directory_is_not_overwritten_silently(tmp_path):
    cfg, weights = _hf_dense(tmp_path, "llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_model(weights, cfg, tmp_path / "out")
    export_model(weights, cfg, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "keep.txt", "model.safetensors"]
    _assert_tyr_reload_equal(tmp_path / "out", weights, cfg)


def test_mismatched_config_is_refused(tmp_path):
    cfg, weights = _hf_dense(tmp_path, "llama")
    small, _ = _prune(weights, cfg, HETEROGENEOUS)
    with pytest.raises(ValueError, match="do not match the config"):
        export_model(small, cfg, tmp_path / "out")


@pytest.mark.parametrize("biases", [dict(o_bias=True), dict(o_bias=True, down_bias=True),
                                    dict(qkv_bias=True, mlp_bias=True, o_bias=True), dict(down_bias=True)])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_bias_flags_round_trip_through_config_json(model_type, biases):
    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=48, model_type=model_type, **biases)
    assert ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_remote_code_config_maps_back_to_the_base_type(model_type):
    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=48, model_type=model_type, o_bias=True).with_layer_sizes([2, 0, 1], [48, 10, 0])
    hf = json.loads(json.dumps(remote_code_config(cfg, cfg.to_hf())))
    assert hf["model_type"] == "tyr" and ModelConfig.from_hf(hf) == cfg
    del hf["tyr_base_model_type"]
    with pytest.raises(ValueError, match="no tyr_base_model_type.*export the model again"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("names", [["q_proj"], ["gate_proj", "up_proj"], ["o_proj", "lm_head"]])
def test_unsupported_bias_sets_are_clear_errors(names):
    hf = ModelConfig(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=48).to_hf()
    with pytest.raises(ValueError, match="tyr_biases"):
        ModelConfig.from_hf({**hf, "tyr_biases": names})


def test_transformers_still_builds_llama_layers_from_global_sizes():
    """Pins the fact the export relies on; if this fails, transformers learned per-layer Llama shapes and
    export could write `per_layer_config` instead of shipping modeling_tyr.py."""
    from transformers.integrations.heterogeneity import AmbiguousGlobalPerLayerAttributeError

    cfg = transformers.LlamaConfig(**{**TINY, "num_hidden_layers": 2},
                                   per_layer_config={"1": {"num_key_value_heads": 1}})
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError):
        transformers.AutoModelForCausalLM.from_config(cfg)
    cfg = transformers.LlamaConfig(**{**TINY, "num_hidden_layers": 2}, per_layer_config={"1": {"skip": ["mlp"]}})
    layer = transformers.AutoModelForCausalLM.from_config(cfg).model.layers[1]
    assert layer.mlp.down_proj.weight.shape == (32, 48)  # `skip` is not read by the model


def test_llama_head_counts_that_do_not_divide_hidden_size_need_remote_code():
    kw = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=6, num_kv_heads=3, head_dim=8,
              intermediate_size=48)
    (reason,) = transformers_blockers(ModelConfig(**kw))
    assert "hidden_size (32) to be a multiple of num_attention_heads (6)" in reason
    assert not transformers_blockers(ModelConfig(**kw, model_type="mistral"))
    assert not transformers_blockers(ModelConfig(**kw).with_layer_sizes([2, 2], [48, 48]))  # 4 heads
    with pytest.raises(Exception, match="not a multiple"):  # the reason is right
        transformers.LlamaConfig(vocab_size=97, hidden_size=32, num_attention_heads=6, num_key_value_heads=3,
                                 head_dim=8)
