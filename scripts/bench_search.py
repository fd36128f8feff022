"""Search speed on Llama-3.1-8B shapes: seconds per generation at the default budget, one device.

One generation = 128 offspring on 2,048 tokens, the best 16 on 16,384, the best 4 + parent on 131,072
(1.18M candidate-tokens). Random bf16 weights and random 9-level copies (timing does not depend on the
values); the model is built with `--layers` L₁ and L₂ layers and the time per generation extrapolated
linearly in L to 32 (embedding and lm_head are the intercept).

    PYTHONPATH=.:scripts python scripts/bench_search.py --layers 4,8 --json $OUT/search.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_forward import LLAMA31_8B, matmul_ceiling, model_flops
from tyr_jax import search
from tyr_jax.models import llama
from tyr_jax.supernet import LevelPlan, SupernetConfig


def random_bank(cfg, num_levels, key) -> search.LevelBank:
    l, e, d, f, k = cfg.num_layers, num_levels, cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads
    kgh = k * cfg.q_per_kv * cfg.head_dim
    k1, k2, k3, k4 = jax.random.split(key, 4)
    normal = lambda kk, shape: (0.02 * jax.random.normal(kk, shape, jnp.float32)).astype(jnp.bfloat16)  # noqa: E731
    return search.LevelBank(
        o_le=normal(k1, (l, e, kgh, d)), attn_keep_le=(jax.random.uniform(k3, (l, e, k)) > 0.5).astype(jnp.float32),
        attn_bias_le=jnp.zeros((l, e, d), jnp.bfloat16), down_le=normal(k2, (l, e, f, d)),
        mlp_keep_le=(jax.random.uniform(k4, (l, e, f)) > 0.5).astype(jnp.float32),
        mlp_bias_le=jnp.zeros((l, e, d), jnp.bfloat16))


def time_generation(num_layers: int, scfg: search.SearchConfig, generations: int) -> dict:
    cfg = dataclasses.replace(LLAMA31_8B, num_layers=num_layers)
    key = jax.random.key(0)
    weights = jax.jit(llama.init_weights, static_argnames=("cfg", "dtype"))(cfg, key=key, dtype=jnp.bfloat16)
    bank = jax.jit(random_bank, static_argnums=(0, 1))(cfg, 9, key)
    plan = LevelPlan.centred(cfg, SupernetConfig())
    tokens = np.asarray(jax.random.randint(key, (scfg.pool_sequences, scfg.seq_len), 0, cfg.vocab_size), np.int32)
    start = time.perf_counter()
    pool = search.FitnessPool(weights, cfg, tokens, scfg, progress=False)
    pool_s = time.perf_counter() - start
    parent = np.full((2, num_layers), 4, np.int32)
    times = []
    for gen in range(generations + 1):  # the first generation compiles
        start = time.perf_counter()
        parent, _ = search.generation_step(weights, bank, cfg, scfg, plan, pool, parent, np.random.default_rng(gen))
        times.append(time.perf_counter() - start)
    del bank, weights
    return {"layers": num_layers, "pool_topk_s": pool_s, "first_generation_s": times[0],
            "generation_s": float(np.median(times[1:])), "flop_per_generation": generation_flops(cfg, scfg)}


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
    args = parser.parse_args()
    scfg = search.SearchConfig(top_k=8192, pool_sequences=64, seq_len=2048, token_batch=1,
                               candidate_batch=args.candidate_batch)
    ceiling = matmul_ceiling()
    runs = [time_generation(int(n), scfg, args.generations) for n in args.layers.split(",")]
    (l1, t1), (l2, t2) = [(r["layers"], r["generation_s"]) for r in runs[:2]]
    slope = (t2 - t1) / (l2 - l1)
    est = t1 + slope * (32 - l1)
    flops32 = generation_flops(LLAMA31_8B, scfg)
    result = {"device": jax.devices()[0].device_kind, "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
              "matmul_ceiling_tflops": ceiling, "runs": runs, "generation_s_32_layers": est,
              "flop_floor_s_32_layers": flops32 / (ceiling * 1e12),
              "fraction_of_ceiling": flops32 / est / (ceiling * 1e12),
              "reference_s_per_generation": 190.0}
    for r in runs:
        print(f"{r['layers']} layers: {r['generation_s']:.2f} s/generation (first {r['first_generation_s']:.1f} s)")
    print(f"32 layers (extrapolated): {est:.1f} s/generation; FLOP floor {result['flop_floor_s_32_layers']:.1f} s "
          f"({result['fraction_of_ceiling']:.0%} of the {ceiling:.0f} TFLOP/s ceiling); reference: ~190 s on one MI250")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
