"""KV-cache decoding computes what the full forward pass computes, for dense and pruned models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tyr_jax.models import decode, llama
from tyr_jax.models.config import ModelConfig

CFG = ModelConfig(vocab_size=53, hidden_size=24, num_layers=3, num_heads=6, num_kv_heads=3, head_dim=4,
                  intermediate_size=40, sliding_window=6)


def _pruned():
    weights = llama.init_weights(CFG, key=jax.random.key(0), scale=0.3)
    masks = llama.UnitMasks(kv_lk=jnp.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]], jnp.float32),
                            mlp_lf=jnp.ones((3, 40), jnp.float32).at[1].set(0).at[2, :30].set(0))
    return llama.apply_masks(weights, CFG, masks)


@pytest.mark.parametrize("pruned", [False, True])
def test_cached_decoding_equals_full_forward(pruned):
    weights, cfg = _pruned() if pruned else (llama.init_weights(CFG, key=jax.random.key(0), scale=0.3), CFG)
    tokens = np.random.default_rng(0).integers(0, 53, (2, 12)).astype(np.int32)
    full = np.asarray(llama.forward(weights, tokens, cfg))
    weights = decode.layout(weights)
    # MLP widths rounded up to the layout's multiple with zero channels (40, removed, 10 kept here)
    assert [layer.down_fd.shape[0] for layer in weights.blocks] == ([128, 0, 128] if pruned else [128] * 3)
    cache = decode.init_cache(weights, 2, 12, cfg)
    logits, cache = decode.prefill(weights, cache, tokens[:, :5], cfg)
    np.testing.assert_allclose(np.asarray(logits), full[:, 4], atol=1e-5)
    step = jax.jit(decode.decode_step, static_argnames="cfg")
    for pos in range(5, 12):
        logits, cache = step(weights, cache, jnp.asarray(tokens[:, pos]), pos, cfg=cfg)
        np.testing.assert_allclose(np.asarray(logits), full[:, pos], atol=1e-5)


def test_greedy_generation_is_consistent_with_the_forward_pass():
    weights, cfg = _pruned()
    prompt = np.random.default_rng(1).integers(0, 53, (2, 4)).astype(np.int32)
    new = np.asarray(decode.generate(decode.layout(weights), prompt, cfg=cfg, num_new=5))
    seq = np.concatenate([prompt, new], axis=1)
    want = np.argmax(np.asarray(llama.forward(weights, seq, cfg))[:, 3:-1], axis=-1)
    np.testing.assert_array_equal(new, want)


def test_fused_cached_attention_cuts_the_cache_at_each_position(monkeypatch):
    """`attention="cudnn"` hands cuDNN the whole cache and the key lengths position + 1 (GQA heads flat).
    cuDNN needs a GPU, so the same call runs here through JAX's own implementation of that function: the
    step's logits must equal the full forward pass's. A sliding window keeps the einsum form."""
    plain = jax.nn.dot_product_attention
    calls = []

    def xla_instead(*args, implementation=None, **kwargs):
        calls.append(implementation)
        return plain(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", xla_instead)
    cfg = dataclasses.replace(CFG, sliding_window=None)
    weights = llama.init_weights(cfg, key=jax.random.key(0), scale=0.3)
    tokens = np.random.default_rng(0).integers(0, 53, (2, 12)).astype(np.int32)
    full = np.asarray(llama.forward(weights, tokens, cfg))
    weights = decode.layout(weights)
    cache = decode.init_cache(weights, 2, 12, cfg)
    _, cache = decode.prefill(weights, cache, tokens[:, :5], cfg)
    for pos in range(5, 12):
        logits, cache = decode.decode_step(weights, cache, jnp.asarray(tokens[:, pos]), pos, cfg, "cudnn")
        np.testing.assert_allclose(np.asarray(logits), full[:, pos], atol=1e-5)
    assert calls.count("cudnn") == 7 * cfg.num_layers
    calls.clear()
    decode.decode_step(weights, cache, jnp.asarray(tokens[:, 5]), 5, CFG, "cudnn")   # CFG: a window of 6
    assert "cudnn" not in calls
