"""Every export loads in transformers: dense and uniform ones as the stock class, per-layer and PBS²P packed
ones through the bundled modeling_tyr.py (trust_remote_code); logits equal tyr-jax's within 1e-4 (fp32) and
greedy generate() with transformers' cache equals tyr-jax's greedy decode."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tyr_jax.binarization import packed
from tyr_jax.binarization.linear import BinaryLinear
from tyr_jax.export import NOTE_FILE, REMOTE_CODE_FILE, copy_remote_code, export_model, remote_code_config
from tyr_jax.loading import load_model
from tyr_jax.models import decode, llama
from tyr_jax.models.config import ModelConfig, RopeConfig

TOKENS = np.random.default_rng(0).integers(0, 97, (2, 12)).astype(np.int32)
# Layer 0 keeps one KV group and a third of the MLP, layer 1 loses its attention, layer 2 its MLP.
PER_LAYER = ([[1], [], [0, 1]], [np.arange(0, 48, 3), np.arange(48), np.array([], int)])
UNIFORM = ([[0], [1], [1]], [np.arange(0, 48, 2), np.arange(24), np.arange(24, 48)])


def _tiny(model_type="llama", *, seed=0, **kw) -> tuple[llama.Weights, ModelConfig]:
    """Random weights (biases included) of a tiny dense model; scale 0.2 keeps greedy choices clear."""
    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=48, model_type=model_type, **kw)
    return llama.init_weights(cfg, key=jax.random.key(seed), scale=0.2), cfg


def _prune(weights, cfg, keep):
    kv_keep, mlp_keep = keep
    masks = llama.UnitMasks(
        kv_lk=jnp.asarray([np.isin(np.arange(cfg.num_kv_heads), k) for k in kv_keep], jnp.float32),
        mlp_lf=jnp.asarray([np.isin(np.arange(cfg.intermediate_size), m) for m in mlp_keep], jnp.float32))
    return llama.apply_masks(weights, cfg, masks)


def _transformers(out, *, remote_code: bool):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=remote_code, attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _assert_logits_match(model, weights, cfg, tokens=TOKENS) -> float:
    """transformers' logits against tyr-jax's (fp32, 1e-4); returns the largest difference."""
    with torch.no_grad():
        got = model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
    want = np.asarray(llama.forward(weights, tokens, cfg))
    diff = float(np.abs(got - want).max())
    print(f"max |logit difference| {diff:.2e}")
    assert diff < 1e-4
    return diff


def _assert_greedy_generate_matches(model, weights, cfg, num_new=6):
    prompt = TOKENS[:, :5]
    with torch.no_grad():
        got = model.generate(torch.as_tensor(prompt, dtype=torch.long), max_new_tokens=num_new, do_sample=False)
    want = np.asarray(decode.generate(decode.layout(weights), jnp.asarray(prompt), cfg, num_new))
    np.testing.assert_array_equal(got[:, prompt.shape[1]:].numpy(), want)


def _export(weights, cfg, out, *, remote_code: bool):
    report = export_model(weights, cfg, out)
    assert report["transformers"] and report["trust_remote_code"] == remote_code, report
    hf = json.loads((out / "config.json").read_text())
    assert ((out / REMOTE_CODE_FILE).exists(), (out / NOTE_FILE).exists()) == (remote_code, remote_code)
    if remote_code:
        assert hf["model_type"] == "tyr" and hf["tyr_base_model_type"] == cfg.model_type
        assert hf["auto_map"]["AutoModelForCausalLM"] == "modeling_tyr.TyrForCausalLM"
        assert "trust_remote_code=True" in report["transformers_note"]
        assert (out / NOTE_FILE).read_text().strip() == report["transformers_note"]
    else:
        assert hf["model_type"] == cfg.model_type and "auto_map" not in hf
    reloaded = load_model(out)  # tyr-jax reads its own export back, "tyr" model type included
    np.testing.assert_array_equal(np.asarray(llama.forward(reloaded.weights, TOKENS, reloaded.cfg)),
                                  np.asarray(llama.forward(weights, TOKENS, cfg)))
    return _transformers(out, remote_code=remote_code)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_uniform_pruning_loads_as_the_stock_class_without_remote_code(model_type, tmp_path):
    small, small_cfg = _prune(*_tiny(model_type, qkv_bias=model_type == "qwen2"), UNIFORM)
    model = _export(small, small_cfg, tmp_path / "out", remote_code=False)
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    _assert_logits_match(model, small, small_cfg)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_remote_code_computes_exactly_what_the_stock_class_computes(model_type, tmp_path):
    """The same dense directory through LlamaForCausalLM / Qwen2ForCausalLM and through TyrForCausalLM."""
    weights, cfg = _tiny(model_type, qkv_bias=model_type == "qwen2")
    export_model(weights, cfg, tmp_path / "stock")
    shutil.copytree(tmp_path / "stock", tmp_path / "tyr")
    hf = json.loads((tmp_path / "stock" / "config.json").read_text())
    (tmp_path / "tyr" / "config.json").write_text(json.dumps(remote_code_config(cfg, hf)))
    copy_remote_code(tmp_path / "tyr")
    tokens = torch.as_tensor(TOKENS, dtype=torch.long)
    with torch.no_grad():
        stock = _transformers(tmp_path / "stock", remote_code=False)(tokens).logits
        tyr = _transformers(tmp_path / "tyr", remote_code=True)(tokens).logits
    torch.testing.assert_close(tyr, stock, rtol=0, atol=0)


def test_per_layer_llama_with_removed_sublayers_and_flap_biases(tmp_path):
    """Removed attention in layer 1, removed MLP in layer 2; o_proj and down_proj biases survive removal;
    Llama 3.1 rope scaling (a short original context, so that it matters at 12 tokens)."""
    rope = RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=16)
    small, small_cfg = _prune(*_tiny("llama", o_bias=True, down_bias=True, rope=rope), PER_LAYER)
    model = _export(small, small_cfg, tmp_path / "out", remote_code=True)
    assert type(model).__name__ == "TyrForCausalLM"
    layers = model.model.layers
    assert layers[1].self_attn.q_proj.weight.shape == (0, 32) and layers[2].mlp.up_proj.weight.shape == (0, 32)
    assert layers[0].self_attn.k_proj.weight.shape == (8, 32) and layers[0].mlp.down_proj.weight.shape == (32, 16)
    assert layers[0].self_attn.q_proj.bias is None and layers[1].self_attn.o_proj.bias is not None
    _assert_logits_match(model, small, small_cfg)
    _assert_greedy_generate_matches(model, small, small_cfg)


def test_uniform_qwen2_with_flap_biases_needs_remote_code(tmp_path):
    """Qwen2ForCausalLM has no o_proj / down_proj bias, so even equal layer sizes go through modeling_tyr.py."""
    small, small_cfg = _prune(*_tiny("qwen2", qkv_bias=True, o_bias=True, down_bias=True), UNIFORM)
    model = _export(small, small_cfg, tmp_path / "out", remote_code=True)
    assert model.model.layers[1].mlp.down_proj.bias is not None and model.model.layers[1].mlp.up_proj.bias is None
    _assert_logits_match(model, small, small_cfg)


def test_per_layer_qwen2_with_qkv_biases_and_save_pretrained_round_trip(tmp_path):
    small, small_cfg = _prune(*_tiny("qwen2", qkv_bias=True), PER_LAYER)
    model = _export(small, small_cfg, tmp_path / "out", remote_code=True)
    assert model.model.layers[0].self_attn.q_proj.bias.shape == (4 * 8 // 2,)
    _assert_logits_match(model, small, small_cfg)
    _assert_greedy_generate_matches(model, small, small_cfg)
    # A model saved by transformers (e.g. after fine-tuning) keeps modeling_tyr.py and reads back in both.
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / REMOTE_CODE_FILE).exists()
    saved = load_model(tmp_path / "saved")
    assert saved.cfg == small_cfg
    _assert_logits_match(_transformers(tmp_path / "saved", remote_code=True), saved.weights, saved.cfg)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_per_layer_sliding_window_attention(model_type, tmp_path):
    """A window of 5 over 12 tokens: the mask, and the cache of generate(), must honour it."""
    small, small_cfg = _prune(*_tiny(model_type, sliding_window=5, qkv_bias=model_type == "qwen2"), PER_LAYER)
    model = _export(small, small_cfg, tmp_path / "out", remote_code=True)
    assert model.config.sliding_window == 5
    _assert_logits_match(model, small, small_cfg)
    _assert_greedy_generate_matches(model, small, small_cfg)


def test_mistral_head_counts_need_not_divide_hidden_size(tmp_path):
    """6 query heads of width 8 on a 32-wide model: fine for Mistral and tyr-jax, so for TyrConfig too."""
    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=6, num_kv_heads=3, head_dim=8,
                      intermediate_size=48, model_type="mistral")
    weights = llama.init_weights(cfg, key=jax.random.key(1), scale=0.2)
    small, small_cfg = _prune(weights, cfg, ([[0, 2], [1]], [np.arange(48), np.arange(10)]))
    _assert_logits_match(_export(small, small_cfg, tmp_path / "out", remote_code=True), small, small_cfg)


def _binary(rng, shape, n, m, block_size):
    """A random N:M 1-bit weight (n == m: nothing pruned, no mask)."""
    o, i = shape
    order = np.argsort(rng.random((o, i // m, m)), axis=-1)
    keep = (order < n).reshape(o, i)
    scales = (o, -(-i // block_size))
    return BinaryLinear(keep, rng.random(shape) < 0.5, rng.uniform(0.05, 0.3, scales).astype(np.float16),
                        rng.normal(0, 0.05, scales).astype(np.float16))


def test_pbs2p_packed_export_unpacks_in_transformers(tmp_path):
    """Layer 0 packed 4:8 (with mask), layer 1 8:8 (no mask), layer 2 left dense; q/k/v biases stay dense."""
    weights, cfg = _tiny("qwen2", qkv_bias=True)
    rng, ns, block_size = np.random.default_rng(2), [4, 8, None], 16
    layers = [None if n is None else {proj: packed.pack(_binary(rng, packed.projection_shape(cfg, i, proj), n, 8,
                                                                 block_size)) for proj in packed.PROJECTIONS}
              for i, n in enumerate(ns)]
    meta = {"variant": "pbs2p", "m": 8, "block_size": block_size, "n_per_layer": ns}
    report = packed.export_binary(weights, cfg, layers, meta, tmp_path / "out")
    assert "trust_remote_code=True" in report["transformers_note"]
    assert (tmp_path / "out" / NOTE_FILE).read_text().strip() == report["transformers_note"]
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf["model_type"] == "tyr" and hf["tyr_binary"]["masked"] == [True, False, None]
    unpacked = load_model(tmp_path / "out")  # tyr-jax's dense reading of the packed file is the reference
    model = _transformers(tmp_path / "out", remote_code=True)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "PackedLinear"
    assert type(model.model.layers[2].mlp.down_proj).__name__ == "Linear"
    for i in (0, 1):
        np.testing.assert_array_equal(model.model.layers[i].mlp.down_proj.dense_weight().numpy(),
                                      np.asarray(unpacked.weights.blocks[i].mlp.down_fd).T)
    _assert_logits_match(model, unpacked.weights, unpacked.cfg)
    _assert_greedy_generate_matches(model, unpacked.weights, unpacked.cfg)


def test_remote_code_refuses_a_config_it_cannot_read(tmp_path):
    small, small_cfg = _prune(*_tiny("llama"), PER_LAYER)
    export_model(small, small_cfg, tmp_path / "out")
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    (tmp_path / "out" / "config.json").write_text(json.dumps({**hf, "tyr_base_model_type": "gemma"}))
    with pytest.raises(ValueError, match="tyr_base_model_type is 'gemma'.*export the model again"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)


@pytest.mark.slow
def test_smollm2_per_layer_export_matches_in_transformers(tmp_path):
    """The real SmolLM2-135M (30 layers, 9 query / 3 KV heads, tied embeddings) with per-layer sizes."""
    model = load_model("smollm2-135m")
    cfg = model.cfg
    rng = np.random.default_rng(3)
    kv = [rng.choice(cfg.num_kv_heads, rng.integers(0, cfg.num_kv_heads + 1), replace=False)
          for _ in range(cfg.num_layers)]
    mlp = [rng.choice(cfg.intermediate_size, rng.integers(0, cfg.intermediate_size + 1), replace=False)
           for _ in range(cfg.num_layers)]
    kv[3], mlp[4] = [], []  # at least one removed sublayer of each kind
    small, small_cfg = _prune(model.weights, cfg, (kv, mlp))
    report = export_model(small, small_cfg, tmp_path / "out")
    assert report["trust_remote_code"]
    tokens = rng.integers(0, cfg.vocab_size, (1, 16)).astype(np.int32)
    _assert_logits_match(_transformers(tmp_path / "out", remote_code=True), small, small_cfg, tokens)
