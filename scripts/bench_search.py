"""Search speed on Llama-3.1-8B shapes: seconds per generation at the default budget, one device.

One generation = 128 offspring on 2,048 tokens, the best 16 on 16,384, the best 4 + parent on 131,072
(1.18M candidate-tokens if every candidate ran in full: the FLOP floor reported; sharing the parent's
prefix does less work, so the time can be below it). Random bf16 weights and random 9-level copies
(timing does not depend on the values); the model is built with `--layers` L₁ and L₂ layers and the
time per generation extrapolated linearly in L to 32 (embedding and lm_head are the intercept), or with
`--layers 32` and measured (the bank of 32 layers' copies, ~44 GB, fits a 141 GB device).
`--profile DIR` also traces one more generation at the first depth and prints where its device time
goes (per kernel: time, calls, the compiled HLO of the three stages' fitness calls).
`--compile-only` allocates nothing: it compiles a first-stage fitness call (`candidates_kl`) from abstract
shapes at each depth and reports the seconds (any device, CPU included).

    PYTHONPATH=.:scripts python scripts/bench_search.py --layers 4,8 --json $OUT/search.json
    PYTHONPATH=.:scripts python scripts/bench_search.py --compile-only --layers 4,8,16,32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_forward import LLAMA31_8B, created_sharded, device_time_by_kernel, matmul_ceiling, model_flops
from tyr_jax import search
from tyr_jax.models import llama
from tyr_jax.supernet import LevelPlan, SupernetConfig


def random_bank(cfg, num_levels, key) -> search.LevelBank:
    """Random bf16 copies and keep masks in the bank's shapes (`search.abstract_bank`)."""
    shapes = search.abstract_bank(cfg, num_levels, jnp.bfloat16)
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(key, len(leaves))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]

    def make(leaf, k, path):
        if "keep" in path:
            return (jax.random.uniform(k, leaf.shape) > 0.5).astype(leaf.dtype)
        if "bias" in path:
            return jnp.zeros(leaf.shape, leaf.dtype)
        return (0.02 * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype)

    return jax.tree.unflatten(treedef, [make(*a) for a in zip(leaves, keys, paths)])


def time_generation(num_layers: int, scfg: search.SearchConfig, generations: int, mesh=None,
                    base=LLAMA31_8B, profile: str | None = None) -> dict:
    """Seconds per generation (median after a compiling one) with `num_layers` layers of `base`; with
    `profile`, one more generation traced into that folder and summarised per kernel."""
    cfg = dataclasses.replace(base, num_layers=num_layers)
    key = jax.random.key(0)
    def stacked(k):   # the search scans stacked layers (sharding.stack_layers), created that way here
        w = llama.init_weights(cfg, key=k, dtype=jnp.bfloat16)
        return dataclasses.replace(w, blocks=llama.stack_blocks(w.blocks))

    weights = created_sharded(stacked, jax.eval_shape(stacked, key), mesh)(key)
    bank = created_sharded(lambda k: random_bank(cfg, 9, k), search.abstract_bank(cfg, 9, jnp.bfloat16), mesh)(key)
    plan = LevelPlan.centred(cfg, SupernetConfig())
    tokens = np.asarray(jax.random.randint(key, (scfg.pool_sequences, scfg.seq_len), 0, cfg.vocab_size), np.int32)
    start = time.perf_counter()
    pool = search.FitnessPool(weights, cfg, tokens, scfg, mesh=mesh, progress=False)
    jax.block_until_ready(pool.idx)
    pool_s = time.perf_counter() - start
    print(f"{num_layers} layers: fitness pool (dense top-k) {pool_s:.1f} s", flush=True)
    parent = np.full((2, num_layers), 4, np.int32)
    times = []
    for gen in range(generations + 1):  # the first generation compiles
        start = time.perf_counter()
        parent, _ = search.generation_step(weights, bank, cfg, scfg, plan, pool, parent, np.random.default_rng(gen))
        times.append(time.perf_counter() - start)
        print(f"  generation {gen}{' (compiles)' if gen == 0 else ''}: {times[-1]:.1f} s", flush=True)
    kernels = None
    if profile:
        with jax.profiler.trace(profile):
            search.generation_step(weights, bank, cfg, scfg, plan, pool, parent, np.random.default_rng(generations + 1))
        kernels = device_time_by_kernel(profile, "\n".join(fitness_hlo(weights, bank, cfg, scfg, pool)))
        print(json.dumps(kernels, indent=1), flush=True)
    del bank, weights
    stats = jax.devices()[0].memory_stats() or {}  # None on CPU
    return {"layers": num_layers, "pool_topk_s": pool_s, "first_generation_s": times[0],
            "generation_s": float(np.median(times[1:])), "flop_per_generation": generation_flops(cfg, scfg),
            "peak_device_bytes": stats.get("peak_bytes_in_use"),
            "host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "profile": kernels}


def lower_fitness_call(weights, bank, idx, logp, cfg, scfg: search.SearchConfig, call: search.CallLayout):
    """`search.candidates_kl` lowered for one call layout, as `search.evaluate` makes its calls (one device;
    the parents, candidates, tokens and rows as abstract shapes; the weights, bank and the pool's top-k
    cache `idx`, `logp` concrete or abstract)."""
    s, levels = jax.ShapeDtypeStruct, (2, cfg.num_layers)
    args = (weights, bank, s(levels, jnp.int32), s((call.padded, *levels), jnp.int32),
            s((call.windows, scfg.seq_len), jnp.int32), idx, logp, s((call.windows,), jnp.int32))
    return search.candidates_kl.lower(*args, cfg, call.group, None, call.over, scfg.logit_chunk)


def fitness_hlo(weights, bank, cfg, scfg: search.SearchConfig, pool: search.FitnessPool) -> list[str]:
    """The compiled HLO text of each stage's `candidates_kl` call."""
    return [lower_fitness_call(weights, bank, pool.idx, pool.logp, cfg, scfg, call).compile().as_text()
            for call in search.stage_layouts(scfg, 1)]


def compile_seconds(num_layers: int, scfg: search.SearchConfig, base=LLAMA31_8B) -> dict:
    """Seconds to lower and to compile the first stage's `candidates_kl` call on `num_layers` layers of `base`."""
    cfg = dataclasses.replace(base, num_layers=num_layers)
    weights = jax.eval_shape(search.search_weights, llama.abstract_weights(cfg, jnp.bfloat16))
    cache = (scfg.pool_sequences, scfg.seq_len - 1, scfg.top_k)
    start = time.perf_counter()
    lowered = lower_fitness_call(weights, search.abstract_bank(cfg, 9, jnp.bfloat16),
                                 jax.ShapeDtypeStruct(cache, jnp.int32), jax.ShapeDtypeStruct(cache, jnp.float32),
                                 cfg, scfg, search.stage_layouts(scfg, 1)[0])
    lowered_at = time.perf_counter()
    lowered.compile()
    return {"layers": num_layers, "lower_s": lowered_at - start, "compile_s": time.perf_counter() - lowered_at}


def generation_flops(cfg, scfg) -> float:
    n1, n2, n3 = scfg.stage_tokens
    c2, c3 = scfg.stage_candidates
    per_seq = model_flops(cfg, 1, scfg.seq_len)
    return per_seq * (scfg.offspring * n1 + c2 * n2 + (c3 + 1) * n3) / scfg.seq_len


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,8")
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--candidate-batch", type=int, default=8)
    parser.add_argument("--json", default=None)
    parser.add_argument("--compile-only", action="store_true", help="compile time of a fitness call per depth")
    parser.add_argument("--profile", default=None, help="trace one more generation (first depth) into this folder")
    args = parser.parse_args()
    scfg = search.SearchConfig(top_k=8192, pool_sequences=64, seq_len=2048, token_batch=1,
                               candidate_batch=args.candidate_batch)
    layers = [int(n) for n in args.layers.split(",")]
    if args.compile_only:
        for n in layers:
            r = compile_seconds(n, scfg)
            print(f"{n} layers: lowered in {r['lower_s']:.1f} s, compiled in {r['compile_s']:.1f} s "
                  f"({jax.devices()[0].device_kind})", flush=True)
        return
    if len(layers) == 1 and layers != [32]:
        raise SystemExit("--layers: give 32 (measured) or two counts to extrapolate from, e.g. 4,8")
    ceiling = matmul_ceiling()
    runs = [time_generation(n, scfg, args.generations, profile=args.profile if i == 0 else None)
            for i, n in enumerate(layers)]
    if len(runs) == 1:
        est = runs[0]["generation_s"]
    else:
        (l1, t1), (l2, t2) = [(r["layers"], r["generation_s"]) for r in runs[:2]]
        est = t1 + (t2 - t1) / (l2 - l1) * (32 - l1)
    floor = generation_flops(LLAMA31_8B, scfg) / (ceiling * 1e12)
    result = {"device": jax.devices()[0].device_kind, "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
              "matmul_ceiling_tflops": ceiling, "runs": runs, "generation_s_32_layers": est,
              "full_evaluation_flop_floor_s_32_layers": floor, "floor_over_measured": floor / est,
              "reference_s_per_generation": 190.0}
    for r in runs:
        print(f"{r['layers']} layers: {r['generation_s']:.2f} s/generation (first {r['first_generation_s']:.1f} s)")
    how = "measured" if len(runs) == 1 else "extrapolated"
    print(f"32 layers ({how}): {est:.1f} s/generation; running every candidate in full needs {floor:.1f} s at the "
          f"{ceiling:.0f} TFLOP/s ceiling ({floor / est:.2f}× this time); reference: ~190 s on one MI250")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
