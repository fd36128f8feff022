"""Local pruners: NumPy float64 references for the baselines, and a contract suite over every
registered pruner (dtype kept, exact budget, deterministic, no retrace, removal counts as data,
multi-device mesh, errors)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import tyr_jax.pruning  # noqa: F401  (registers every pruner)
from tyr_jax.pruning.base import PRUNERS, SublayerStats, accumulate_stats, get_pruner
from tyr_jax.sharding import make_mesh

D_IN, D_OUT, N_TOKENS = 24, 12, 64
STATIC = ("unit_size", "removals")


def _problem(seed: int, d_in: int = D_IN, d_out: int = D_OUT, n: int = N_TOKENS):
    """Inputs X [N, d_in] with per-channel scales and nonzero means, and W [d_in, d_out], as fp32
    values (returned as float64 arrays so that the references see exactly the same numbers)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)) * rng.uniform(0.2, 3.0, size=d_in) + rng.normal(size=d_in)
    w = rng.normal(size=(d_in, d_out)) * rng.uniform(0.2, 2.0, size=(d_in, 1))
    return x.astype(np.float32).astype(np.float64), w.astype(np.float32).astype(np.float64)


def _stats(x: np.ndarray) -> SublayerStats:
    return accumulate_stats(SublayerStats.zeros(x.shape[1]), jnp.asarray(x, jnp.float32))


@functools.cache
def _jitted(name: str):
    return jax.jit(get_pruner(name), static_argnames=STATIC)


# ----------------------------------------------------------------------------------------------------
# NumPy float64 references, written from the papers' formulas on X itself (not on H).

def _ref_keep(scores: list[float], removals: tuple[int, ...]) -> np.ndarray:
    order = np.argsort(np.asarray(scores), kind="stable")
    keep = np.ones((len(removals), len(scores)), bool)
    for e, r in enumerate(removals):
        keep[e, order[:r]] = False
    return keep


def _ref_magnitude(x, w, unit_size):
    scores = []
    for u in range(w.shape[0] // unit_size):
        rows = w[u * unit_size:(u + 1) * unit_size]
        scores.append(np.sqrt(np.sum(rows ** 2)))
    return scores


def _ref_wanda_sp(x, w, unit_size):
    scores = []
    for u in range(w.shape[0] // unit_size):
        s = 0.0
        for j in range(u * unit_size, (u + 1) * unit_size):
            s += np.sum(np.abs(w[j])) * np.linalg.norm(x[:, j])
        scores.append(s)
    return scores


def _ref_flap(x, w, unit_size):
    scores = []
    for u in range(w.shape[0] // unit_size):
        s = 0.0
        for j in range(u * unit_size, (u + 1) * unit_size):
            s += np.var(x[:, j]) * np.sum(w[j] ** 2)      # population variance (ddof=0)
        scores.append(s)
    return scores


def _reference(name, x, w, unit_size, removals):
    score_fn = {"magnitude": _ref_magnitude, "wanda_sp": _ref_wanda_sp, "flap": _ref_flap}[name]
    keep = _ref_keep(score_fn(x, w, unit_size), removals)
    w_ref = np.zeros((len(removals),) + w.shape)
    bias = np.zeros((len(removals), w.shape[1])) if name == "flap" else None
    mean = x.mean(axis=0)
    for e in range(len(removals)):
        for u in range(keep.shape[1]):
            rows = slice(u * unit_size, (u + 1) * unit_size)
            if keep[e, u]:
                w_ref[e, rows] = w[rows]
            elif bias is not None:
                bias[e] += mean[rows] @ w[rows]
    return keep, w_ref, bias


@pytest.mark.parametrize("name", ["magnitude", "wanda_sp", "flap"])
@pytest.mark.parametrize("unit_size", [1, 4, 6])
def test_baseline_matches_numpy_reference(name, unit_size):
    num_units = D_IN // unit_size
    removals = (0, 1, num_units // 2, num_units, 2)     # unsorted on purpose, both ends included
    for seed in range(3):
        x, w = _problem(seed)
        got = _jitted(name)(jnp.asarray(w, jnp.float32), _stats(x), unit_size=unit_size, removals=removals)
        keep, w_ref, bias = _reference(name, x, w, unit_size, removals)
        np.testing.assert_array_equal(np.asarray(got.keep_eu), keep)
        np.testing.assert_allclose(np.asarray(got.w_eio), w_ref, rtol=1e-5, atol=0)
        if bias is None:
            assert got.bias_eo is None
        else:
            # Relative to the size of the summed terms: a bias entry may cancel to near 0.
            scale = np.abs(x.mean(axis=0)) @ np.abs(w)
            np.testing.assert_allclose(np.asarray(got.bias_eo), bias, rtol=1e-5, atol=1e-5 * scale.max())


def test_flap_compensates_the_mean_output():
    """With the removed channels replaced by their means, FLAP's bias makes the mean output exact."""
    x, w = _problem(7)
    got = _jitted("flap")(jnp.asarray(w, jnp.float32), _stats(x), unit_size=4, removals=(3,))
    mean_dense = x.mean(axis=0) @ w
    mean_pruned = x.mean(axis=0) @ np.asarray(got.w_eio[0], np.float64) + np.asarray(got.bias_eo[0])
    np.testing.assert_allclose(mean_pruned, mean_dense, rtol=1e-5, atol=1e-5 * np.abs(mean_dense).max())


def test_ties_break_towards_lower_index():
    x, _ = _problem(0)
    w = np.ones((D_IN, D_OUT), np.float32)
    got = _jitted("magnitude")(jnp.asarray(w), _stats(x), unit_size=6, removals=(2,))
    np.testing.assert_array_equal(np.asarray(got.keep_eu[0]), [False, False, True, True])


# ----------------------------------------------------------------------------------------------------
# Contract suite over every registered pruner.

ALL_PRUNERS = sorted(PRUNERS)


def _inputs(seed: int, dtype=jnp.float32):
    x, w = _problem(seed)
    return jnp.asarray(w, jnp.float32).astype(dtype), _stats(x)


def test_registry_has_the_baselines():
    assert {"magnitude", "wanda_sp", "flap"} <= set(PRUNERS)
    with pytest.raises(ValueError, match="unknown pruner"):
        get_pruner("no-such-pruner")


# Shared by the contract tests so that their single-device calls hit one compiled executable.
CONTRACT_KWARGS = dict(unit_size=2, removals=(0, 3, 7, 12))


@pytest.mark.parametrize("name", ALL_PRUNERS)
@pytest.mark.parametrize("unit_size,dtype", [(2, jnp.float32), (1, jnp.bfloat16)], ids=["u2-fp32", "u1-bf16"])
def test_contract_dtype_and_exact_budget(name, unit_size, dtype):
    num_units = D_IN // unit_size
    removals = (CONTRACT_KWARGS["removals"] if unit_size == CONTRACT_KWARGS["unit_size"]
                else (0, 1, num_units // 2, num_units))
    w, stats = _inputs(1, dtype)
    got = _jitted(name)(w, stats, unit_size=unit_size, removals=removals)
    assert got.keep_eu.dtype == jnp.bool_ and got.keep_eu.shape == (len(removals), num_units)
    assert got.w_eio.dtype == dtype and got.w_eio.shape == (len(removals), D_IN, D_OUT)
    if got.bias_eo is not None:
        assert got.bias_eo.dtype == dtype and got.bias_eo.shape == (len(removals), D_OUT)
    keep = np.asarray(got.keep_eu)
    np.testing.assert_array_equal(keep.sum(axis=1), [num_units - r for r in removals])
    rows_nonzero = np.any(np.asarray(got.w_eio.astype(jnp.float32)) != 0, axis=2)   # [E, I]
    np.testing.assert_array_equal(rows_nonzero, np.repeat(keep, unit_size, axis=1))


@pytest.mark.parametrize("name", ALL_PRUNERS)
def test_contract_deterministic_and_no_retrace(name):
    """A second, separately traced and compiled jit gives bit-identical results, and is traced once
    for several calls with new values of the same shapes."""
    traces = []

    def counted(w, stats):
        traces.append(None)
        return get_pruner(name)(w, stats, **CONTRACT_KWARGS)

    fn = jax.jit(counted)
    for seed in (3, 4, 5):
        inputs = _inputs(seed)
        got = fn(*inputs)
        want = _jitted(name)(*inputs, **CONTRACT_KWARGS)
        chex.assert_trees_all_equal(got, want)
    assert len(traces) == 1
    assert fn._cache_size() == 1


@pytest.mark.parametrize("name", ALL_PRUNERS)
def test_contract_removal_counts_are_data(name):
    """Removal counts as a traced int32 vector: traced and compiled once for any counts (unsorted,
    repeated, 0 and every unit), and each level's kept set and weights bit-identical to that count asked
    for alone, static (FLAP's bias up to the summation order of a matmul over E rows instead of one)."""
    traces = []

    def counted(w, stats, removals):
        traces.append(None)
        return get_pruner(name)(w, stats, unit_size=2, removals=removals)

    fn = jax.jit(counted)
    w, stats = _inputs(8)
    for removals in [(0, 3, 7, 12), (12, 5, 5, 1), (2, 4, 6, 8)]:
        got = fn(w, stats, np.asarray(removals, np.int32))
        for e, r in enumerate(removals):
            alone = _jitted(name)(w, stats, unit_size=2, removals=(r,))
            np.testing.assert_array_equal(np.asarray(got.keep_eu[e]), np.asarray(alone.keep_eu[0]))
            np.testing.assert_array_equal(np.asarray(got.w_eio[e]), np.asarray(alone.w_eio[0]))
            assert (got.bias_eo is None) == (alone.bias_eo is None)
            if got.bias_eo is not None:
                scale = float(jnp.abs(alone.bias_eo).max())
                np.testing.assert_allclose(np.asarray(got.bias_eo[e]), np.asarray(alone.bias_eo[0]), rtol=1e-6,
                                           atol=1e-6 * scale)
    assert len(traces) == 1
    assert fn._cache_size() == 1


@pytest.mark.parametrize("name", ALL_PRUNERS)
def test_contract_runs_on_mesh(name):
    """Inputs sharded over a (data=4, model=2) mesh: W rows over `model` (as o_proj/down_proj are in
    the model) and columns over `data`, H split the other way round; same result as on one device."""
    mesh = make_mesh(data=4, model=2)
    assert mesh.devices.size == 8
    w, stats = _inputs(6)
    single = _jitted(name)(w, stats, **CONTRACT_KWARGS)
    w_sharded = jax.device_put(w, NamedSharding(mesh, P("model", "data")))
    stats_sharded = SublayerStats(jax.device_put(stats.hessian_ii, NamedSharding(mesh, P("data", "model"))),
                                  jax.device_put(stats.sum_i, NamedSharding(mesh, P("model"))),
                                  jax.device_put(stats.count, NamedSharding(mesh, P())))
    sharded = _jitted(name)(w_sharded, stats_sharded, **CONTRACT_KWARGS)
    assert len(sharded.w_eio.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded.keep_eu), np.asarray(single.keep_eu))
    scale = float(jnp.abs(single.w_eio).max())
    np.testing.assert_allclose(np.asarray(sharded.w_eio), np.asarray(single.w_eio),
                               rtol=1e-5, atol=1e-5 * scale)
    assert (sharded.bias_eo is None) == (single.bias_eo is None)
    if single.bias_eo is not None:
        scale = float(jnp.abs(single.bias_eo).max())
        np.testing.assert_allclose(np.asarray(sharded.bias_eo), np.asarray(single.bias_eo),
                                   rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", ALL_PRUNERS)
@pytest.mark.parametrize("unit_size,removals", [(4, (7,)), (4, (0, -1)), (4, ()), (1, (25,)), (5, (1,))],
                         ids=["above", "negative", "empty", "above-channels", "unit-not-dividing"])
def test_contract_rejects_bad_arguments(name, unit_size, removals):
    w, stats = _inputs(0)
    with pytest.raises(ValueError):
        _jitted(name)(w, stats, unit_size=unit_size, removals=removals)
    with pytest.raises(ValueError):
        get_pruner(name)(w, stats, unit_size=unit_size, removals=removals)
