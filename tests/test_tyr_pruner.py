"""The Týr local pruner against an independent NumPy float64 implementation of ALGORITHMS.md §1.1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tyr_jax.pruning import accumulate_stats, get_pruner
from tyr_jax.pruning.base import SublayerStats


def reference(w0, h, unit, removals, damp=0.01, round_size=1, refit="towards_w0"):
    """Plain loops: score, remove the lowest `round_size` units, OBS-update, repeat; refit each level.

    towards_w0 (the reference code): H is damped in place before G = H_d W₀ is computed, so the score and
    the refit see G = H_d W₀; towards_zero: G = H W₀ from the undamped H (both refit with H_d)."""
    d_in = w0.shape[0]
    num_units = d_in // unit
    hd = h + (damp * np.mean(np.diag(h)) + 1e-10) * np.eye(d_in)
    g = (hd if refit == "towards_w0" else h) @ w0
    hinv = np.linalg.inv(hd)
    w = w0.copy()
    alive = np.ones(num_units, bool)
    dead = np.all(np.diag(h).reshape(num_units, unit) == 0, axis=1)
    keeps, weights = {}, {}
    removed = 0
    for target in sorted(set(removals)):
        while removed < target:
            k = min(round_size, target - removed)
            scores = np.full(num_units, np.inf)
            for u in np.flatnonzero(alive):
                c = slice(u * unit, (u + 1) * unit)
                scores[u] = (0.5 * np.sum(w[c] * np.linalg.solve(hinv[c, c], w[c])) + np.sum(w[c] * g[c])
                             if not dead[u] else -np.inf)
            picked = np.argsort(scores, kind="stable")[:k]
            p = np.concatenate([np.arange(u * unit, (u + 1) * unit) for u in picked])
            a_inv = np.linalg.inv(hinv[np.ix_(p, p)])
            w = w - hinv[:, p] @ a_inv @ w[p]
            hinv = hinv - hinv[:, p] @ a_inv @ hinv[p, :]
            w[p] = 0
            hinv[p, :] = 0
            hinv[:, p] = 0
            alive[picked] = False
            removed += k
        kept = np.repeat(alive, unit)
        refit = np.zeros_like(w0)
        if kept.any():
            refit[kept] = np.linalg.solve(hd[np.ix_(kept, kept)], g[kept])
        keeps[target], weights[target] = alive.copy(), refit
    return np.stack([keeps[r] for r in removals]), np.stack([weights[r] for r in removals])


def _problem(d_in=24, d_out=7, tokens=200, seed=0, dead=()):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, d_in)) * rng.uniform(0.2, 2.0, size=d_in) + rng.normal(size=d_in)
    x[:, list(dead)] = 0
    w = rng.normal(size=(d_in, d_out))
    return x, w


@pytest.mark.parametrize("refit", ["towards_w0", "towards_zero"])
@pytest.mark.parametrize("unit, removals, round_size", [
    (1, (0, 3, 6, 12, 24), 1),
    (1, (5, 10, 20), 4),
    (4, (0, 1, 2, 3, 6), 1),
    (6, (4, 2, 2, 0), 1),
])
def test_matches_numpy_float64_reference(unit, removals, round_size, refit):
    x, w = _problem(dead=(3,))
    stats = accumulate_stats(SublayerStats.zeros(x.shape[1]), jnp.asarray(x, jnp.float32))
    prune = jax.jit(get_pruner("tyr"), static_argnames=("unit_size", "removals", "round_size", "refit"))
    out = prune(jnp.asarray(w, jnp.float32), stats, unit_size=unit, removals=removals, round_size=round_size,
                refit=refit)
    h = np.asarray(stats.hessian_ii, np.float64)
    keep_ref, w_ref = reference(w, h, unit, removals, round_size=round_size, refit=refit)
    np.testing.assert_array_equal(np.asarray(out.keep_eu), keep_ref)
    np.testing.assert_allclose(np.asarray(out.w_eio), w_ref, rtol=1e-4, atol=1e-4 * np.abs(w_ref).max())


def test_traced_counts_compile_once_and_give_each_level_of_its_removal_path():
    # The counts are data (one trace for any of them). Level r is reached through the rounds that the
    # other counts ≤ r cut (no round straddles a count), so it equals the last level of a static call on
    # those counts alone, bit for bit; and it matches the float64 reference.
    x, w = _problem(d_in=36, dead=(4,))
    stats = accumulate_stats(SublayerStats.zeros(x.shape[1]), jnp.asarray(x, jnp.float32))
    h = np.asarray(stats.hessian_ii, np.float64)
    traces = []

    def counted(w, stats, removals):
        traces.append(None)
        return get_pruner("tyr")(w, stats, unit_size=1, removals=removals, round_size=4)

    traced = jax.jit(counted)
    static = jax.jit(get_pruner("tyr"), static_argnames=("unit_size", "removals", "round_size"))
    w32 = jnp.asarray(w, jnp.float32)
    for removals in [(0, 3, 6, 12, 24), (24, 10, 10, 1, 36), (5, 9, 13, 17, 21)]:
        got = traced(w32, stats, np.asarray(removals, np.int32))
        for e, r in enumerate(removals):
            path = static(w32, stats, unit_size=1, removals=tuple(sorted({c for c in removals if c <= r})),
                          round_size=4)
            np.testing.assert_array_equal(np.asarray(got.keep_eu[e]), np.asarray(path.keep_eu[-1]))
            np.testing.assert_array_equal(np.asarray(got.w_eio[e]), np.asarray(path.w_eio[-1]))
        keep_ref, w_ref = reference(w, h, 1, removals, round_size=4)
        np.testing.assert_array_equal(np.asarray(got.keep_eu), keep_ref)
        np.testing.assert_allclose(np.asarray(got.w_eio), w_ref, rtol=1e-4, atol=1e-4 * np.abs(w_ref).max())
    assert len(traces) == 1 and traced._cache_size() == 1
    # Traced counts cannot be checked: they are clipped to [0, U].
    clipped = traced(w32, stats, np.asarray([-2, 40], np.int32))
    whole = traced(w32, stats, np.asarray([0, 36], np.int32))
    np.testing.assert_array_equal(np.asarray(clipped.keep_eu), np.asarray(whole.keep_eu))
    np.testing.assert_array_equal(np.asarray(clipped.w_eio), np.asarray(whole.w_eio))


def test_dead_channels_go_first_and_refit_is_least_squares():
    x, w = _problem(dead=(2, 9))
    stats = accumulate_stats(SublayerStats.zeros(x.shape[1]), jnp.asarray(x, jnp.float32))
    out = get_pruner("tyr")(jnp.asarray(w, jnp.float32), stats, unit_size=1, removals=(2, 8))
    keep = np.asarray(out.keep_eu)
    assert not keep[0, 2] and not keep[0, 9] and keep[0].sum() == 22
    # The refit kept rows minimise ‖X W − X_K W_K‖ (up to the 1% damping): compare with lstsq.
    k = keep[1]
    w_ls = np.linalg.lstsq(x[:, k], x @ w, rcond=None)[0]
    err = lambda wk: np.linalg.norm(x @ w - x[:, k] @ wk)  # noqa: E731
    assert err(np.asarray(out.w_eio[1])[k]) <= err(w_ls) * 1.01


def test_the_default_refit_keeps_the_dense_weights_at_0_percent():
    # towards_w0 solves (H_d) W = H_d W₀ when nothing is removed: W₀ back (bit for bit, as the refit solves
    # for the correction to W₀; the test asks fp32 precision).
    x, w = _problem(d_in=32, d_out=9, seed=4)
    stats = accumulate_stats(SublayerStats.zeros(32), jnp.asarray(x, jnp.float32))
    w32 = np.asarray(w, np.float32)
    out = get_pruner("tyr")(jnp.asarray(w32), stats, unit_size=4, removals=(0, 2))
    np.testing.assert_allclose(np.asarray(out.w_eio[0]), w32, rtol=0, atol=1e-5 * np.abs(w32).max())
    shrunk = get_pruner("tyr")(jnp.asarray(w32), stats, unit_size=4, removals=(0,), refit="towards_zero")
    assert np.abs(np.asarray(shrunk.w_eio[0]) - w32).max() > 1e-3 * np.abs(w32).max()
    with pytest.raises(ValueError, match="refit must be one of"):
        get_pruner("tyr")(jnp.asarray(w32), stats, unit_size=4, removals=(0,), refit="ridge")


def test_towards_w0_refit_is_ridge_regression_towards_the_dense_weights():
    # W_K = argmin ‖X_K W_K − X W₀‖² + λ‖W_K − W₀_K‖², λ = damp · mean(diag H) (ALGORITHMS.md §1.1 step 5),
    # solved here in float64 by stacking the penalty under the least-squares rows.
    x, w = _problem(dead=(5,))
    stats = accumulate_stats(SublayerStats.zeros(x.shape[1]), jnp.asarray(x, jnp.float32))
    out = get_pruner("tyr")(jnp.asarray(w, jnp.float32), stats, unit_size=1, removals=(1, 8))
    h = np.asarray(stats.hessian_ii, np.float64)
    lam = 0.01 * np.mean(np.diag(h)) + 1e-10
    for e in range(2):
        k = np.asarray(out.keep_eu[e])
        a = np.concatenate([x[:, k], np.sqrt(lam) * np.eye(k.sum())])
        b = np.concatenate([x @ w, np.sqrt(lam) * w[k]])
        w_ridge = np.linalg.lstsq(a, b, rcond=None)[0]
        np.testing.assert_allclose(np.asarray(out.w_eio[e])[k], w_ridge, rtol=1e-4,
                                   atol=1e-4 * np.abs(w_ridge).max())


def test_refit_towards_zero_shrinks_and_exact_is_least_squares():
    x, w = _problem(dead=(5,))
    stats = accumulate_stats(SublayerStats.zeros(x.shape[1]), jnp.asarray(x, jnp.float32))
    prune = jax.jit(get_pruner("tyr"), static_argnames=("unit_size", "removals", "refit"))
    exact = prune(jnp.asarray(w, jnp.float32), stats, unit_size=1, removals=(1, 8), refit="exact")
    ridge = prune(jnp.asarray(w, jnp.float32), stats, unit_size=1, removals=(1, 8), refit="towards_zero")
    np.testing.assert_array_equal(np.asarray(exact.keep_eu), np.asarray(ridge.keep_eu))  # same selection
    for e in range(2):
        k = np.asarray(exact.keep_eu[e])
        w_ls = np.linalg.lstsq(x[:, k], x @ w, rcond=None)[0]
        np.testing.assert_allclose(np.asarray(exact.w_eio[e])[k], w_ls, rtol=1e-3, atol=1e-3)
        # Ridge shrinks: a smaller solution, and a larger calibration error than least squares.
        assert np.linalg.norm(np.asarray(ridge.w_eio[e])[k]) < np.linalg.norm(w_ls)
        assert np.linalg.norm(x @ w - x[:, k] @ np.asarray(ridge.w_eio[e])[k]) > np.linalg.norm(x @ w - x[:, k] @ w_ls)
    # Only the dead channel removed: exact least squares gives the dense weights back.
    np.testing.assert_allclose(np.delete(np.asarray(exact.w_eio[0]), 5, axis=0), np.delete(w, 5, axis=0),
                               rtol=1e-3, atol=1e-3)


def test_progressive_rounds_beat_one_shot_removal():
    """Re-scoring after each OBS update (round size 1) should not do worse than one round."""
    x, w = _problem(d_in=32, d_out=16, seed=3)
    stats = accumulate_stats(SublayerStats.zeros(32), jnp.asarray(x, jnp.float32))
    err = {}
    for rounds in (1, 16):
        out = get_pruner("tyr")(jnp.asarray(w, jnp.float32), stats, unit_size=1, removals=(16,), round_size=rounds)
        err[rounds] = np.linalg.norm(x @ w - x @ np.asarray(out.w_eio[0]))
    assert err[1] <= err[16] * 1.001
