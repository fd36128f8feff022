"""`tyr-jax ablate`: run-config variants over a grid of values, one table and one plot.

`--vary key=v1,v2,...` (repeatable; the grid is the product of the lists) takes the same dotted keys
as `key=value` overrides. Variant i runs under `OUT/variant_<i>/` and saves its result there, so a
re-run skips finished variants. What a variant yields:

  * a method without search (`uniform`, `flap`, `wanda_sp`, `magnitude`, or `tyr` with
    `search.iterations=0`): the held-out perplexity of the model made of every sublayer's centre copy
    (the target sparsity everywhere), as `scripts/ablate_uniform.py` measures it;
  * `method: tyr` with search: Týr's coarse-to-fine supernets and searches (`coarse_to_fine`, as
    `tyr-jax prune` runs them, in the same directories), the searched model's perplexity;
  * `policy_gradient` and `pbs2p`: the whole `tyr-jax prune` pipeline, its model's perplexity.

How variants run (the table's `mode` column says which):

  * vmap — variants without search whose configs differ only in `VMAP_KEYS` build their supernets in
    one pass of `supernet.build_supernets` (the build every run uses, with V = 1): the activations
    carry a leading variant axis, and each block's statistics, pruner call and propagation are one
    compiled call vmapped over the variants. `supernet.damp` is a traced number inside the Týr pruner;
    `supernet.expectation` only chooses which output projection (the Eq. 5 average or the dense one) a
    variant hands on, i.e. data. The activations, and so the statistics of every later sublayer, are
    per variant — the copies of variant v depend on its own earlier copies through Eq. 5 — so each
    store holds exactly what building that variant alone would write (same fingerprint; up to fp32
    rounding of batched matmuls).
  * sequential — everything else, one variant after another: round sizes and `num_levels` change the
    pruner's program and the copies' shapes, steps the level plan (whose removal counts, data to the
    pruner, the variants of one build share), `search.top_k` is a `lax.top_k` size,
    `search.seed` drives a host-side evolutionary loop, and a search follows its own supernets.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import pathlib
import time

import numpy as np

from tyr_jax import plots, supernet as sn
from tyr_jax.loading import load_model
from tyr_jax.coarse_to_fine import coarse_to_fine
from tyr_jax.data import corpora, sampler
from tyr_jax.evaluation.perplexity import perplexity
from tyr_jax.pipeline import (build_mesh, calibration_windows, eval_windows, evaluate_levels, model_dtype, place,
                              pool_tokens, run_prune, run_supernet)
from tyr_jax.results import load_keyed, save_keyed
from tyr_jax.runconfig import RunConfig, load_run_config, parse_value, result_key, to_dict

# Config keys whose variants share one vmapped supernet build (`supernet.build_supernets`).
VMAP_KEYS = tuple(f"supernet.{name}" for name in sn.VARIANT_FIELDS)


@dataclasses.dataclass(frozen=True)
class Variant:
    index: int
    values: dict          # varied key → value, in --vary order
    overrides: tuple      # the variant's `key=value` strings, applied after the base overrides
    rc: RunConfig

    @property
    def out(self) -> pathlib.Path:
        return pathlib.Path(self.rc.out)


def _split_top_level(raw: str) -> list[str]:
    """Splits on commas outside brackets, so a list value such as [4,2] stays one value."""
    parts, depth, cur = [], 0, []
    for ch in raw:
        depth += (ch in "[{(") - (ch in "]})")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def parse_vary(spec: str) -> tuple[str, list]:
    """'supernet.damp=1e-3,0.01' → ('supernet.damp', [0.001, 0.01]); values are YAML (lists in brackets)."""
    key, sep, raw = spec.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--vary {spec!r} is not key=v1,v2,... (e.g. --vary supernet.damp=0.001,0.01,0.1)")
    parts = _split_top_level(raw)
    if any(not v for v in parts):
        raise ValueError(f"--vary {spec!r} has an empty value; give key=v1,v2,...")
    values = [parse_value(v) for v in parts]
    if key == "out":
        raise ValueError("--vary out=...: the ablation sets each variant's out to OUT/variant_<i>; vary "
                         "something else")
    return key, values


def make_variants(config: str | None, overrides: list[str], vary: list[str]) -> tuple[RunConfig, list[Variant]]:
    """The base config (its `out` is the ablation's directory) and every grid point, all validated."""
    base = load_run_config(config, overrides)
    if not vary:
        raise ValueError("nothing to vary: give at least one --vary key=v1,v2,...")
    specs = [parse_vary(s) for s in vary]
    keys = [k for k, _ in specs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"--vary repeats a key: {', '.join(k for k in keys if keys.count(k) > 1)}")
    for key, values in specs:  # name the offending --vary before any variant runs
        try:
            load_run_config(config, list(overrides) + [f"{key}={json.dumps(values[0])}"])
        except ValueError as e:
            raise ValueError(f"--vary {key}: {e}") from None
    out = pathlib.Path(base.out)
    variants = []
    for i, combo in enumerate(itertools.product(*(v for _, v in specs))):
        assigned = tuple(f"{k}={json.dumps(v)}" for k, v in zip(keys, combo))   # JSON values are YAML
        try:
            rc = load_run_config(config, list(overrides) + list(assigned) + [f"out={out / f'variant_{i}'}"])
        except ValueError as e:
            raise ValueError(f"variant {', '.join(assigned)}: {e}") from None
        variants.append(Variant(i, dict(zip(keys, combo)), assigned, rc))
    return base, variants


def _vmap_key(rc: RunConfig) -> str | None:
    """What a variant must share with others to join their vmapped build (None: it runs alone)."""
    if not rc.centre_copies:
        return None
    tree = to_dict(rc)
    tree.pop("out")
    for key in VMAP_KEYS:
        section, name = key.split(".")
        tree[section].pop(name)
    return json.dumps(tree, sort_keys=True)


def vmap_groups(variants: list[Variant]) -> list[list[Variant]]:
    """Variants grouped for one vmapped build each; singletons (and every search) run sequentially."""
    groups: dict = {}
    for v in variants:
        key = _vmap_key(v.rc)
        groups.setdefault(key if key is not None else f"alone-{v.index}", []).append(v)
    return list(groups.values())


# -- running the grid ------------------------------------------------------------------------------------


class _Shared:
    """Models, calibration and evaluation windows loaded once and shared by the variants that agree on them."""
    def __init__(self):
        self._cache: dict = {}

    def _get(self, key, make):
        key = json.dumps(key, sort_keys=True)
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def model(self, rc: RunConfig):
        def make():
            model = load_model(rc.model, dtype=model_dtype(rc))
            if model.tokenizer is None:
                raise ValueError(f"{rc.model} has no tokenizer; calibration and evaluation text cannot be tokenized")
            return model

        return self._get(["model", rc.model, rc.dtype], make)

    def stream(self, rc: RunConfig) -> np.ndarray:
        """The calibration corpus, tokenized."""
        return self._get(["stream", rc.model, rc.calibration.corpus],
                         lambda: sampler.tokenize(self.model(rc).tokenizer, corpora.load_text(rc.calibration.corpus)))

    def calib(self, rc: RunConfig) -> np.ndarray:
        return self._get(["calib", rc.model, to_dict(rc.calibration)],
                         lambda: calibration_windows(self.stream(rc), rc.calibration))

    def windows(self, rc: RunConfig) -> np.ndarray:
        return self._get(["eval", rc.model, to_dict(rc.eval)], lambda: eval_windows(self.model(rc).tokenizer, rc))


def _result_path(v: Variant) -> pathlib.Path:
    return v.out / "ablation_result.json"


def _load_result(v: Variant) -> dict | None:
    """The saved result of a variant, if it was computed with this very config."""
    return load_keyed(_result_path(v), result_key(to_dict(v.rc)))


def _save_result(v: Variant, value: dict) -> None:
    save_keyed(_result_path(v), result_key(to_dict(v.rc)), value)


def _centre_eval(v: Variant, shared: _Shared, store: sn.SupernetStore, progress: bool) -> dict:
    """Perplexity and parameters of the model that takes every sublayer's centre copy."""
    model = shared.model(v.rc)
    centre = [v.rc.supernet.num_levels // 2] * model.cfg.num_layers
    res = evaluate_levels(model, store, centre, centre, shared.windows(v.rc), batch_size=v.rc.eval.batch_size,
                          progress=progress)
    return {"ppl": res["ppl"], "params": res["params"]}


def _run_group(group: list[Variant], shared: _Shared, progress: bool) -> None:
    """Builds the supernets of a group of ≥ 2 variants in one vmapped pass, then evaluates each."""
    rc0 = group[0].rc
    model, calib = shared.model(rc0), shared.calib(rc0)
    dtype = model.weights.embed_vd.dtype
    plan = sn.LevelPlan.centred(model.cfg, rc0.supernet)
    stores = []
    for v in group:
        v.out.mkdir(parents=True, exist_ok=True)
        (v.out / "run_config.json").write_text(json.dumps(to_dict(v.rc), indent=1))
        stores.append(sn.SupernetStore(v.out / "supernet", sn.fingerprint(model.cfg, v.rc.supernet, plan, calib,
                                                                          v.rc.model, dtype)))
    start = time.perf_counter()
    sn.build_supernets(model.weights, model.cfg, calib, [v.rc.supernet for v in group], plan, stores,
                       batch_size=rc0.calibration.batch_size, progress=progress)
    build_share = (time.perf_counter() - start) / len(group)
    for v, store in zip(group, stores):
        start = time.perf_counter()
        metrics = _centre_eval(v, shared, store, progress)
        _save_result(v, {"mode": "vmap", **metrics, "wall_s": build_share + time.perf_counter() - start})


def _searched_eval(v: Variant, shared: _Shared, progress: bool) -> dict:
    """Perplexity and parameters of the model Týr's coarse-to-fine search picks, on the variant's mesh
    (its supernets and searches under the variant's directory, laid out and resumable as `tyr-jax prune`'s)."""
    rc, mesh = v.rc, build_mesh(v.rc)
    model = shared.model(rc)
    v.out.mkdir(parents=True, exist_ok=True)
    (v.out / "run_config.json").write_text(json.dumps(to_dict(rc), indent=1))
    weights, cfg, _ = coarse_to_fine(place(model.weights, mesh), model.cfg, shared.calib(rc), rc.supernet, rc.search,
                                     v.out, model_name=rc.model, pool_tokens=pool_tokens(rc, shared.stream(rc)),
                                     batch_size=rc.calibration.batch_size, mesh=mesh, progress=progress)
    stats = perplexity(weights, cfg, shared.windows(rc), batch_size=rc.eval.batch_size, progress=progress)
    return {"ppl": stats["ppl"], "params": cfg.num_params()}


def _run_alone(v: Variant, shared: _Shared, progress: bool) -> None:
    start = time.perf_counter()
    if v.rc.centre_copies:
        _, store, _ = run_supernet(v.rc, shared.model(v.rc), calib=shared.calib(v.rc), progress=progress)
        metrics = _centre_eval(v, shared, store, progress)
    elif v.rc.searches:
        metrics = _searched_eval(v, shared, progress)
    else:
        summary = run_prune(v.rc, progress=progress)
        metrics = {"ppl": summary["ppl"]["pruned"], "params": summary["params"]["pruned"]}
    _save_result(v, {"mode": "sequential", **metrics, "wall_s": time.perf_counter() - start})


def run_ablation(config: str | None, overrides: list[str], vary: list[str], *, progress: bool = True) -> dict:
    """Runs (or resumes) every variant of the grid; writes OUT/ablation.csv, .json and .png.

    Returns {"out", "vary": {key: values}, "rows": [{"variant", <keys>, "mode", "ppl", "params", "wall_s", "out"}]}.
    `wall_s` of a vmap row is its share of the group's build plus its own evaluation."""

    base, variants = make_variants(config, overrides, vary)
    out = pathlib.Path(base.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = list(variants[0].values)
    shared = _Shared()
    for group in vmap_groups(variants):
        pending = [v for v in group if _load_result(v) is None]
        if len(pending) > 1:
            print(f"variants {', '.join(str(v.index) for v in pending)}: one vmapped supernet build")
            _run_group(pending, shared, progress)
        elif pending:
            print(f"variant {pending[0].index} ({', '.join(pending[0].overrides)}): sequential")
            _run_alone(pending[0], shared, progress)
    rows = [{"variant": v.index, **v.values, **_load_result(v), "out": v.out.name} for v in variants]
    table = {"out": str(out), "config": config, "overrides": list(overrides),
             "vary": {k: [json.loads(x) for x in dict.fromkeys(json.dumps(v.values[k]) for v in variants)]
                      for k in keys},
             "vmap_keys": list(VMAP_KEYS), "rows": rows}
    (out / "ablation.json").write_text(json.dumps(table, indent=1))
    with open(out / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: json.dumps(r[k]) if isinstance(r[k], (bool, list)) else r[k] for k in r} for r in rows)
    plots.plot_ablation(rows, keys, out / "ablation.png", f"{base.method} on {pathlib.Path(base.model).name}")
    return table
