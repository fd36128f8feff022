"""Logits of our Flax-free pure-JAX decoder against transformers' PyTorch models, fp32, within 1e-4."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tyr_jax.loading.hf import load_hf_dir, weights_from_hf, weights_to_hf
from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig
from tyr_jax.sharding import make_mesh, weight_shardings, batch_sharding

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, head_dim=8,
            max_position_embeddings=128, rms_norm_eps=1e-5)

VARIANTS = {
    "llama_mha": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa_llama3_rope": (transformers.LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "llama_mqa_linear_rope": (transformers.LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama_tied_smollm": (transformers.LlamaConfig, dict(
        hidden_size=36, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
        rope_theta=100000.0)),
    "llama_biases": (transformers.LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "qwen2_qkv_bias": (transformers.Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2)),
    "mistral_sliding": (transformers.MistralConfig, dict(num_attention_heads=4, num_key_value_heads=2,
                                                          sliding_window=5)),
}


def _hf_model(name, seed=0):
    cls, extra = VARIANTS[name]
    cfg = cls(**{**TINY, **extra})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random biases and norms so that every parameter matters
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def _tokens(batch=2, length=12, vocab=TINY["vocab_size"], seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_transformers(name, tmp_path):
    model = _hf_model(name)
    model.save_pretrained(tmp_path)
    cfg, weights = load_hf_dir(tmp_path)
    tokens = _tokens()
    ours = jax.jit(llama.forward, static_argnums=2)(weights, tokens, cfg)
    np.testing.assert_allclose(np.asarray(ours), _hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_config_roundtrip_and_state_dict_roundtrip(tmp_path):
    model = _hf_model("qwen2_qkv_bias")
    model.save_pretrained(tmp_path)
    cfg, weights = load_hf_dir(tmp_path)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    state = weights_to_hf(weights, cfg)
    ref = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(state) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(state[k], ref[k], err_msg=k)


def _zero_units(model, cfg, kv_keep, mlp_keep):
    """Zeroes the o_proj inputs of dropped KV groups and down_proj inputs of dropped channels."""
    g, h = cfg.q_per_kv, cfg.head_dim
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            col = np.zeros(cfg.num_heads * h, bool)
            for k in kv_keep[i]:
                col[k * g * h:(k + 1) * g * h] = True
            layer.self_attn.o_proj.weight[:, torch.as_tensor(~col)] = 0
            drop = np.setdiff1d(np.arange(cfg.intermediate_size), mlp_keep[i])
            layer.mlp.down_proj.weight[:, torch.as_tensor(drop, dtype=torch.long)] = 0


@pytest.mark.parametrize("name", ["llama_gqa_llama3_rope", "qwen2_qkv_bias"])
def test_heterogeneous_pruned_shapes_match_zeroed_reference(name, tmp_path):
    """Physically sliced layers (incl. a removed attention and a removed MLP) equal zeroed units."""
    model = _hf_model(name)
    model.save_pretrained(tmp_path)
    cfg, weights = load_hf_dir(tmp_path)
    kv_keep = [np.array([1]), np.array([], int), np.array([0, 1])]
    mlp_keep = [np.array([0, 5, 7, 40]), np.arange(48), np.array([], int)]
    masks = llama.UnitMasks(
        kv_lk=jnp.asarray(np.stack([np.isin(np.arange(2), k) for k in kv_keep]), jnp.float32),
        mlp_lf=jnp.asarray(np.stack([np.isin(np.arange(48), m) for m in mlp_keep]), jnp.float32))
    small, small_cfg = llama.apply_masks(weights, cfg, masks)
    assert small_cfg.kv_groups == (1, 0, 2) and small_cfg.mlp_widths == (4, 48, 0)
    assert small_cfg.num_params() == sum(x.size for x in jax.tree.leaves(small)) 
    _zero_units(model, cfg, kv_keep, mlp_keep)
    tokens = _tokens()
    ref = _hf_logits(model, tokens)
    np.testing.assert_allclose(np.asarray(llama.forward(small, tokens, small_cfg)), ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(llama.forward(weights, tokens, cfg, masks=masks)), ref,
                               atol=1e-4, rtol=0)


def test_pruned_model_saves_and_reloads(tmp_path):
    model = _hf_model("llama_gqa_llama3_rope")
    model.save_pretrained(tmp_path / "dense")
    cfg, weights = load_hf_dir(tmp_path / "dense")
    masks = llama.UnitMasks(kv_lk=jnp.array([[1, 0], [0, 0], [1, 1]], jnp.float32),
                            mlp_lf=jnp.ones((3, 48), jnp.float32).at[0, :20].set(0))
    small, small_cfg = llama.apply_masks(weights, cfg, masks)
    state = weights_to_hf(small, small_cfg)
    tensors = {k: (lambda v=v: v) for k, v in state.items()}
    again = weights_from_hf(ModelConfig.from_hf(small_cfg.to_hf()), tensors)
    chex.assert_trees_all_equal(small, again)


def test_param_count_matches_transformers():
    for name in VARIANTS:
        model = _hf_model(name)
        cfg = ModelConfig.from_hf(model.config.to_dict())
        assert cfg.num_params() == sum(p.numel() for p in model.parameters()), name


def test_bf16_forward_is_close_to_fp32(tmp_path):
    model = _hf_model("llama_gqa_llama3_rope")
    model.save_pretrained(tmp_path)
    cfg, w32 = load_hf_dir(tmp_path)
    _, w16 = load_hf_dir(tmp_path, dtype=jnp.bfloat16)
    tokens = _tokens()
    l32, l16 = llama.forward(w32, tokens, cfg), llama.forward(w16, tokens, cfg)
    assert l16.dtype == jnp.float32
    assert float(jnp.linalg.norm(l16 - l32) / jnp.linalg.norm(l32)) < 2e-2


def test_sharded_forward_equals_single_device(tmp_path):
    model = _hf_model("llama_tied_smollm")
    model.save_pretrained(tmp_path)
    mesh = make_mesh(data=4, model=2)
    cfg, weights = load_hf_dir(tmp_path, shardings=lambda abstract: weight_shardings(abstract, mesh))
    q = weights.blocks[0].attn.q_dkgh
    assert q.sharding.spec[1] == "model" and len(q.sharding.device_set) == 8
    tokens = jax.device_put(_tokens(batch=8), batch_sharding(mesh))
    sharded = jax.jit(llama.forward, static_argnums=2)(weights, tokens, cfg)
    single = llama.forward(jax.device_put(weights, jax.devices()[0]), np.asarray(tokens), cfg)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=0)


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gpt2"), "not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(some_new_knob=3), "some_new_knob"),
])
def test_unsupported_config_is_a_clear_error(change, message):
    hf = transformers.LlamaConfig(**TINY, num_attention_heads=4).to_dict()
    hf.update(change)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(hf)


def test_bad_checkpoints_are_clear_errors(tmp_path):
    model = _hf_model("llama_mha")
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_dir(tmp_path / "nowhere")
    st = tmp_path / "model.safetensors"
    data = st.read_bytes()
    # Mismatched shapes: the config says a wider MLP than the weights have.
    cfg_path = tmp_path / "config.json"
    original = cfg_path.read_text()
    cfg_path.write_text(original.replace('"intermediate_size": 48', '"intermediate_size": 64'))
    with pytest.raises(ValueError, match="do not match"):
        load_hf_dir(tmp_path)
    cfg_path.write_text(original)
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_hf_dir(tmp_path)


def test_sharded_checkpoint_with_index_loads(tmp_path):
    model = _hf_model("qwen2_qkv_bias")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 1
    cfg, weights = load_hf_dir(tmp_path)
    tokens = _tokens()
    np.testing.assert_allclose(np.asarray(llama.forward(weights, tokens, cfg)), _hf_logits(model, tokens),
                               atol=1e-4, rtol=0)
