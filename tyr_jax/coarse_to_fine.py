"""Týr's coarse-to-fine iterations (ALGORITHMS.md §1.4): a supernet of the dense model around the
current per-sublayer sparsities, a search over it, then the levels re-centred on the searched choice with
the step halved, a new supernet, a new search — T times. Without a search: one supernet, and every
sublayer's centre copy.

Iteration t keeps its supernet under OUT/iteration_<t>/supernet and its search state under
OUT/iteration_<t>/search, both resumable (a killed run replays the stored blocks and resumes the search
at its last generation); a directory holding work of other settings is refused.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from tyr_jax import search
from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig
from tyr_jax.sharding import stack_layers
from tyr_jax.supernet import LevelPlan, SupernetConfig, SupernetStore, assemble, build_supernet, fingerprint


def iteration_store(weights: llama.Weights, cfg: ModelConfig, calib: np.ndarray, scfg: SupernetConfig,
                    model_name: str, out: pathlib.Path, t: int = 0, centres=(None, None)):
    """The supernet store of iteration `t` (Δ halved t times, levels around `centres`: per-layer removal
    fractions of attention and MLP, default the target), claimed: one built with other settings is refused
    here. Returns (store, its SupernetConfig, its plan)."""
    scfg_t = dataclasses.replace(scfg, step=search.step_for_iteration(scfg.step, t))
    plan = LevelPlan.centred(cfg, scfg_t, *centres)
    store = SupernetStore(pathlib.Path(out) / f"iteration_{t}" / "supernet",
                          fingerprint(cfg, scfg_t, plan, calib, model_name, weights.embed_vd.dtype))
    return store, scfg_t, plan


def coarse_to_fine(weights: llama.Weights, cfg: ModelConfig, calib: np.ndarray, scfg: SupernetConfig,
                   search_cfg: search.SearchConfig | None, out: pathlib.Path, *, model_name: str,
                   pool_tokens: np.ndarray | None = None, batch_size: int = 8, mesh=None, progress: bool = True):
    """Týr on a dense model (ALGORITHMS.md §1.2-1.4): `search_cfg.iterations` rounds of supernet + search,
    or, with `search_cfg` None, one supernet and its centre copies.

    Args:
      weights, cfg: the dense model (weights placed on `mesh`, when given).
      calib: calibration windows [N, T] of the supernets (batches of `batch_size`).
      scfg: the supernet of the first iteration; later ones halve its step (`search.step_for_iteration`).
      search_cfg: the search, or None for centre copies.
      out: the run directory (OUT/iteration_<t>/{supernet,search}).
      model_name: recorded in the supernets' fingerprints.
      pool_tokens: the fitness pool's windows (needed with a search).
    Returns:
      (the pruned weights, their config, the parent's fitness per generation of each iteration).
    """
    if search_cfg is not None and pool_tokens is None:
        raise ValueError("a search needs the fitness pool's tokens (pool_tokens)")
    out = pathlib.Path(out)
    dtype, num_levels = weights.embed_vd.dtype, scfg.num_levels
    centres, history, pool = (None, None), [], None
    iterations = 1 if search_cfg is None else search_cfg.iterations
    for t in range(iterations):
        store, scfg_t, plan = iteration_store(weights, cfg, calib, scfg, model_name, out, t, centres)
        print(f"iteration {t + 1}/{iterations}: supernet with Δ = {scfg_t.step:.4%}")
        build_supernet(weights, cfg, calib, scfg_t, plan, store, batch_size=batch_size, progress=progress, mesh=mesh)
        best = np.full((2, cfg.num_layers), num_levels // 2, np.int32)
        if search_cfg is not None:
            if pool is None:   # the dense model's top-k, scanning a stacked copy of its layers (freed after)
                pool = search.FitnessPool(stack_layers(weights, mesh), cfg, pool_tokens, search_cfg, mesh=mesh,
                                          progress=progress)
            bank, stacked = search.load_bank(store, cfg, num_levels, dtype, mesh), search.search_weights(weights, mesh)
            best, hist = search.run_search(stacked, cfg, plan, bank, pool, search_cfg,
                                           out / f"iteration_{t}" / "search", iteration=t, progress=progress)
            del bank, stacked
            history.append([float(h) for h in hist])
            centres = search.removal_fractions(plan, best, cfg)
    pruned, pruned_cfg = assemble(weights, cfg, store, list(best[0]), list(best[1]))
    return pruned, pruned_cfg, history
