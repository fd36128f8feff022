"""The NNX decoder: the same logits as the pure functions, stacked layers scanned (program size independent
of depth), per-layer pruned models as lists, and a pruned model trains with optax."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tyr_jax.export import export_model
from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig
from tyr_jax.models.nnx_decoder import Decoder

CFG = ModelConfig(vocab_size=53, hidden_size=24, num_layers=3, num_heads=6, num_kv_heads=3, head_dim=4,
                  intermediate_size=40, qkv_bias=True)
TOKENS = np.random.default_rng(0).integers(0, 53, (2, 12)).astype(np.int32)


def _weights(cfg=CFG):
    return llama.init_weights(cfg, key=jax.random.key(0), scale=0.3)


def _pruned():
    """Per-layer sizes, with a removed attention (layer 1) and a removed MLP (layer 2)."""
    masks = llama.UnitMasks(kv_lk=jnp.array([[1, 0, 1], [0, 0, 0], [0, 1, 1]], jnp.float32),
                            mlp_lf=jnp.ones((3, 40), jnp.float32).at[0, :25].set(0).at[2].set(0))
    return llama.apply_masks(_weights(), CFG, masks)


def test_dense_model_is_stacked_and_equals_the_pure_forward():
    weights = _weights()
    model = Decoder(weights, CFG)
    assert model.stacked
    np.testing.assert_allclose(model(TOKENS), llama.forward(weights, TOKENS, CFG), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal(model.weights(), weights)
    masks = llama.UnitMasks(kv_lk=jnp.array([[1, 0, 1], [1, 1, 1], [0, 1, 0]], jnp.float32),
                            mlp_lf=jnp.ones((3, 40), jnp.float32).at[1, 5:].set(0))
    np.testing.assert_allclose(model(TOKENS, masks=masks), llama.forward(weights, TOKENS, CFG, masks=masks),
                               rtol=1e-5, atol=1e-5)


def test_stacked_program_does_not_grow_with_depth():
    def num_equations(num_layers):
        cfg = dataclasses.replace(CFG, num_layers=num_layers)
        model = Decoder(_weights(cfg), cfg)
        graph, state = nnx.split(model)
        return len(jax.make_jaxpr(lambda s: nnx.merge(graph, s)(TOKENS))(state).eqns)

    assert num_equations(2) == num_equations(12)


def test_per_layer_pruned_model_is_a_list_of_blocks():
    weights, cfg = _pruned()
    model = Decoder(weights, cfg)
    assert not model.stacked
    np.testing.assert_allclose(model(TOKENS), llama.forward(weights, TOKENS, cfg), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"layers \[1, 2\] differ in size from layer 0"):
        Decoder(weights, cfg, stack=True)


def test_a_pruned_export_loads_and_trains_with_optax(tmp_path):
    weights, cfg = _pruned()
    export_model(weights, cfg, tmp_path / "model")
    model = Decoder.from_pretrained(tmp_path / "model")
    chex.assert_trees_all_equal(model.weights(), weights)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, tokens):
        def loss_fn(model):
            logp = jax.nn.log_softmax(model(tokens[:, :-1]))
            return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    with jax.numpy_dtype_promotion("standard"):   # optax's step count mixes int32 and float (conftest is strict)
        losses = [float(step(model, optimizer, TOKENS)) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses
    assert jax.tree.map(jnp.shape, model.weights()) == jax.tree.map(jnp.shape, weights)   # still the pruned sizes
