"""Meshes: the config's mesh section, a supernet build and a search generation on several mesh shapes
equal to one device, and the Llama-3.1-70B memory plan (abstract shapes only)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tyr_jax import search
from tyr_jax import supernet as sn
from tyr_jax.memory import LLAMA31_70B, memory_plan
from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig
from tyr_jax.pipeline import build_mesh, place
from tyr_jax.runconfig import load_run_config
from tyr_jax.sharding import make_mesh, stack_layers, weight_shardings

# Every sharded dimension divides 2, 4 and 8: KV groups (4), their o_proj rows (32), MLP channels (64), vocab.
CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=4,
                  intermediate_size=64)
MESHES = [(8, 1), (4, 2), (2, 4)]   # (data, model)
SUPERNET = sn.SupernetConfig(num_levels=5, step=0.25, min_step_channels=8, mlp_round_size=8)
SEARCH = search.SearchConfig(generations=1, offspring=8, stage_candidates=(4, 2), stage_tokens=(16, 64, 128),
                             top_k=16, pool_sequences=16, seq_len=16, token_batch=1, candidate_batch=4)
# Stored weights: the sharded build sums statistics and pruner updates in another order (fp32).
ATOL = RTOL = 1e-5


@functools.cache
def _host_weights():
    return jax.tree.map(np.asarray, llama.init_weights(CFG, key=jax.random.key(0), scale=0.2))


def _weights():
    return jax.tree.map(jnp.asarray, _host_weights())


def _build(root, mesh=None):
    calib = np.random.default_rng(1).integers(0, CFG.vocab_size, (16, 16)).astype(np.int32)
    plan = sn.LevelPlan.centred(CFG, SUPERNET)
    store = sn.SupernetStore(root, sn.fingerprint(CFG, SUPERNET, plan, calib, "tiny", jnp.float32))
    weights = _weights() if mesh is None else place(_weights(), mesh)
    sn.build_supernet(weights, CFG, calib, SUPERNET, plan, store, batch_size=8, progress=False, mesh=mesh)
    return store, plan


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One device: the supernet, its bank and the fitness pool."""
    store, plan = _build(tmp_path_factory.mktemp("one"))
    pool_tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (16, 16)).astype(np.int32)
    bank = search.load_bank(store, CFG, SUPERNET.num_levels, jnp.float32)
    pool = search.FitnessPool(_weights(), CFG, pool_tokens, SEARCH, progress=False)
    return store, plan, bank, pool


def test_stacked_layers_are_placed_by_the_table_and_compute_the_same():
    # The leading layer axis stays whole; the rest of each array is split as the per-layer table says.
    mesh = make_mesh(4, 2)
    per_layer = place(_weights(), mesh)
    stacked = stack_layers(per_layer, mesh)
    assert isinstance(stacked.blocks, llama.Block)
    for got, want in zip(jax.tree.leaves(stacked.blocks), jax.tree.leaves(per_layer.blocks[0]), strict=True):
        assert got.sharding.spec == P(None, *want.sharding.spec)
    assert weight_shardings(stacked, mesh).blocks.mlp.gate_df.spec == P(None, None, "model")
    tokens = np.random.default_rng(5).integers(0, CFG.vocab_size, (8, 12)).astype(np.int32)
    np.testing.assert_allclose(llama.forward(stacked, tokens, CFG), llama.forward(per_layer, tokens, CFG),
                               rtol=1e-5, atol=1e-5)


def test_mesh_section_is_validated_with_clear_errors():
    assert load_run_config(None).mesh.build().shape == {"data": 8, "model": 1}
    assert load_run_config(None, ["mesh.model=2"]).mesh.build().shape == {"data": 4, "model": 2}
    with pytest.raises(ValueError, match="mesh.data must be a positive integer"):
        load_run_config(None, ["mesh.data=0"])
    with pytest.raises(ValueError, match="mesh.model: expected an integer, got True"):
        load_run_config(None, ["mesh.model=true"])
    with pytest.raises(ValueError, match="unknown config key.*mesh.size"):
        load_run_config(None, ["mesh.size=2"])
    with pytest.raises(ValueError, match=r"data=4 × model=4 needs 16 devices, but only 8"):
        load_run_config(None, ["mesh.data=4", "mesh.model=4"]).mesh.build()
    with pytest.raises(ValueError, match="mesh.model=3 does not divide the 8 devices"):
        load_run_config(None, ["mesh.model=3"]).mesh.build()
    with pytest.raises(ValueError, match=r"calibration.batch_size \(4\) must be a multiple .* \(8 devices\)"):
        build_mesh(load_run_config(None, ["calibration.batch_size=4", "calibration.num_sequences=8"]))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_supernet_on_a_mesh_equals_one_device(single, tmp_path, shape):
    store, _, _, _ = single
    sharded, _ = _build(tmp_path / "mesh", make_mesh(*shape))
    for i in range(CFG.num_layers):
        a, b = store.load_block(i), sharded.load_block(i)
        for kind in ("attn", "mlp"):
            for e in range(SUPERNET.num_levels):
                x, y = a[kind][f"level_{e}"], b[kind][f"level_{e}"]
                np.testing.assert_array_equal(x["keep"], y["keep"])
                assert x.keys() == y.keys()
                if "w" in x:
                    np.testing.assert_allclose(x["w"], y["w"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_search_generation_on_a_mesh_equals_one_device(single, shape):
    store, plan, bank, pool = single
    mesh = make_mesh(*shape)
    weights = place(_weights(), mesh)
    mesh_bank = search.load_bank(store, CFG, SUPERNET.num_levels, jnp.float32, mesh)
    mesh_pool = search.FitnessPool(weights, CFG, pool.tokens, SEARCH, mesh=mesh, progress=False)
    # The copies' rows are split over `model` like the projections; the top-k cache over `data` by window.
    assert mesh_bank.down_le.sharding.spec == P(None, None, "model", None)
    assert mesh_pool.idx.sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(mesh_pool.idx), np.asarray(pool.idx))
    parent = np.full((2, CFG.num_layers), SUPERNET.num_levels // 2, np.int32)
    kids = search.mutate(parent, plan, np.random.default_rng(0), SEARCH.offspring, SEARCH.max_flips)
    # Three stage-like shapes; on 8 / 4 / 2 data devices the candidates are split, split and
    # padded, or the windows split.
    stacked, mesh_stacked = search.search_weights(_weights()), search.search_weights(weights, mesh)
    for num, rows in ((8, np.arange(1)), (4, np.arange(3, 7)), (2, np.arange(8))):
        got = search.evaluate(mesh_stacked, mesh_bank, CFG, SEARCH, mesh_pool, parent, kids[:num], rows)
        want = search.evaluate(stacked, bank, CFG, SEARCH, pool, parent, kids[:num], rows)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
        assert got[0] == pytest.approx(want[0], rel=1e-5)
    want = search.generation_step(stacked, bank, CFG, SEARCH, plan, pool, parent, np.random.default_rng(5))
    got = search.generation_step(mesh_stacked, mesh_bank, CFG, SEARCH, plan, mesh_pool, parent,
                                 np.random.default_rng(5))
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == pytest.approx(want[1], rel=1e-5)


def test_llama31_70b_fits_eight_141gb_devices():
    """Weights, one block's Hessians, the bank of 9 copies and the top-k cache per device on a
    (data 1, model 8) mesh, from abstract shapes and the sharding table (BENCHMARKS.md, 70B memory plan)."""
    device = 141e9
    plan = memory_plan(LLAMA31_70B, make_mesh(1, 8))
    assert plan["weights"]["total"] == 2 * LLAMA31_70B.num_params()
    assert plan["bank"]["device"] < 1.001 * plan["bank"]["total"] / 8    # every copy's rows split 8 ways
    assert plan["hessian_mlp"]["device"] * 8 == pytest.approx(plan["hessian_mlp"]["total"], rel=1e-3)
    assert plan["supernet"]["device"] < 0.75 * device and plan["search"]["device"] < 0.75 * device
    # Without the model axis the bank alone is 3× a device: why 70B runs on model=8.
    assert memory_plan(LLAMA31_70B, make_mesh(8, 1))["search"]["device"] > 3 * device
