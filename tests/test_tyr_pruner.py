"""The Týr local pruner against an independent NumPy float64 implementation of ALGORITHMS.md §1.1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tyr_jax.pruning import accumulate_stats, get_pruner
from tyr_jax.pruning.base import SublayerStats


def reference(w0, h, unit, removals, damp=0.01, round_size=1):
    """Plain loops: score, remove the lowest `round_size` units, OBS-update, repeat; refit each level."""
    d_in = w0.shape[0]
    num_units = d_in // unit
    g = h @ w0
    hd = h + (damp * np.mean(np.diag(h)) + 1e-10) * np.eye(d_in)
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


@pytest.mark.parametrize("unit, removals, round_size", [
    (1, (0, 3, 6, 12, 24), 1),
    (1, (5, 10, 20), 4),
    (4, (0, 1, 2, 3, 6), 1),
    (6, (4, 2, 2, 0), 1),
])
def test_matches_numpy_float64_reference(unit, removals, round_size):
    x, w = _problem(dead=(3,))
    stats = accumulate_stats(SublayerStats.zeros(x.shape[1]), jnp.asarray(x, jnp.float32))
    prune = jax.jit(get_pruner("tyr"), static_argnames=("unit_size", "removals", "round_size"))
    out = prune(jnp.asarray(w, jnp.float32), stats, unit_size=unit, removals=removals, round_size=round_size)
    h = np.asarray(stats.hessian_ii, np.float64)
    keep_ref, w_ref = reference(w, h, unit, removals, round_size=round_size)
    np.testing.assert_array_equal(np.asarray(out.keep_eu), keep_ref)
    np.testing.assert_allclose(np.asarray(out.w_eio), w_ref, rtol=1e-4, atol=1e-4 * np.abs(w_ref).max())


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


def test_refit_is_ridge_by_default_and_exact_least_squares_when_asked():
    x, w = _problem(dead=(5,))
    stats = accumulate_stats(SublayerStats.zeros(x.shape[1]), jnp.asarray(x, jnp.float32))
    prune = jax.jit(get_pruner("tyr"), static_argnames=("unit_size", "removals", "refit_damped"))
    exact = prune(jnp.asarray(w, jnp.float32), stats, unit_size=1, removals=(1, 8), refit_damped=False)
    ridge = prune(jnp.asarray(w, jnp.float32), stats, unit_size=1, removals=(1, 8))
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
