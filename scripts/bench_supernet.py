"""Supernet speed on Llama-3.1-8B or -70B shapes (random bf16 weights, random calibration tokens), one device.

Times (a) all levels of one `down_proj` and (b) one `o_proj` with the Týr pruner, from Hessians of the
given size, and (c) one whole block of `build_supernet` (Hessians over `--tokens` calibration tokens, 9
levels of attention and MLP, expectation propagation, Orbax writes), extrapolated to the whole model's
blocks. With fewer than 4M tokens, the token-proportional work (statistics, propagation) is extrapolated
linearly to 4M; the pruners and the Orbax writes do not depend on the token count. (An estimate: the
host's share, waiting for the copies and writing them, overlaps the device's propagation since 2026-12-04,
so below 4M tokens the split is approximate; at 4M the block's time is measured as it is.)

    python scripts/bench_supernet.py --tokens 4194304 --json $OUT/supernet.json
    python scripts/bench_supernet.py --shapes 70b --tokens 2097152 --mlp-round-sizes "" --json $OUT/supernet70b.json

(The 70B command measures 2M tokens: for 4M on one 141 GB device the CPU memory plan, an upper bound,
left too little room. Its measured peak on an H200, 65.9 GB at 2M tokens, puts 4M at about 100 GB.)
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_forward import LLAMA31_8B, created_sharded, matmul_ceiling, save_results
from tyr_jax.memory import LLAMA31_70B
from tyr_jax.models import llama
from tyr_jax.pruning import SublayerStats, get_pruner
from tyr_jax.supernet import LevelPlan, SupernetConfig, SupernetStore, build_supernet, fingerprint

SHAPES = {"8b": LLAMA31_8B, "70b": LLAMA31_70B}


def time_pruner(d_in, d_out, unit, removals, round_size, *, key):
    """Seconds for all levels of one projection (median of 3 after a compile run)."""
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (4 * d_in, d_in), jnp.bfloat16)
    h = jnp.einsum("ni,nj->ij", x, x, preferred_element_type=jnp.float32)
    stats = SublayerStats(h, jnp.zeros((d_in,), jnp.float32), jnp.float32(x.shape[0]))
    w = (0.02 * jax.random.normal(kw, (d_in, d_out), jnp.float32)).astype(jnp.bfloat16)
    prune = jax.jit(get_pruner("tyr"), static_argnames=("unit_size", "round_size"))   # the counts are data
    counts = np.asarray(removals, np.int32)
    run = lambda: jax.block_until_ready(prune(w, stats, unit_size=unit, removals=counts, round_size=round_size))  # noqa: E731
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"seconds": float(np.median(times)), "first_call_s": first, "round_size": round_size,
            "rounds": int(np.ceil(max(removals) / round_size))}


def time_block(cfg, scfg, tokens: int, seq_len: int, batch: int, mesh=None) -> dict:
    """One block of `build_supernet` on `tokens` random calibration tokens (random bf16 weights of
    `cfg`'s shapes, created on `mesh`): seconds of a compiled run ({total,prune,save}_s) and of the first."""
    one = dataclasses.replace(cfg, num_layers=1)
    weights = created_sharded(lambda k: llama.init_weights(one, key=k, dtype=jnp.bfloat16),
                              llama.abstract_weights(one, jnp.bfloat16), mesh)(jax.random.key(0))
    calib = np.asarray(jax.random.randint(jax.random.key(1), (tokens // seq_len, seq_len), 0, cfg.vocab_size))
    plan = LevelPlan.centred(one, scfg)
    with tempfile.TemporaryDirectory() as tmp:
        store = SupernetStore(tmp, fingerprint(one, scfg, plan, calib, "random", jnp.bfloat16))
        start = time.perf_counter()
        build_supernet(weights, one, calib, scfg, plan, store, batch_size=batch, progress=False, mesh=mesh)
        first = time.perf_counter() - start
        # Second build of the same block in a fresh store: compiled, so this is the steady-state time.
        timings = {"first_call_s": first}
        build_supernet(weights, one, calib, scfg, plan, SupernetStore(tmp + "/again", store.fingerprint),
                       batch_size=batch, progress=False, mesh=mesh, timings=timings)
    return timings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="8b", help="Llama-3.1 model shapes")
    parser.add_argument("--tokens", type=int, default=1 << 20, help="calibration tokens for the block run")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mlp-round-sizes", default="16,896",
                        help="channels per round to time for down_proj alone (\"\": none)")
    parser.add_argument("--block-mlp-round-size", type=int, default=16)
    parser.add_argument("--skip-block", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    cfg = SHAPES[args.shapes]
    results = {"shapes": args.shapes, "device": jax.devices()[0].device_kind, "date": time.strftime("%Y-%m-%d"),
               "jax": jax.__version__, "matmul_ceiling_tflops": matmul_ceiling()}
    scfg = SupernetConfig(mlp_round_size=args.block_mlp_round_size)
    plan = LevelPlan.centred(cfg, scfg)
    d, f = cfg.hidden_size, cfg.intermediate_size
    key = jax.random.key(0)
    for rs in [int(r) for r in args.mlp_round_sizes.split(",") if r]:
        results[f"down_proj_round{rs}"] = r = time_pruner(f, d, 1, plan.mlp[0], rs, key=key)
        print(f"down_proj 9 levels, {rs} channels/round ({r['rounds']} rounds): {r['seconds']:.2f} s")
    g_h = cfg.q_per_kv * cfg.head_dim
    results["o_proj"] = r = time_pruner(cfg.num_kv_heads * g_h, d, g_h, plan.attn[0], 1, key=key)
    print(f"o_proj 9 levels, 1 KV group/round: {r['seconds']:.2f} s")

    if not args.skip_block:
        timings = time_block(cfg, scfg, args.tokens, args.seq_len, args.batch)
        first = timings["first_call_s"]
        block_s, prune_s, save_s = timings["total_s"], timings["prune_s"], timings["save_s"]
        token_s = block_s - prune_s - save_s  # statistics and propagation: linear in tokens
        per_block_4m = prune_s + save_s + token_s * (4 * 2 ** 20) / args.tokens
        # Floor at 4M tokens: two passes (statistics, then propagation) through the block's matmuls + the
        # Hessian products, all in bf16 on the matrix units.
        n = 4 * 2 ** 20
        block_params = cfg.layer_params(0)
        attn_flops = 2 * 2 * cfg.num_heads * cfg.head_dim * args.seq_len * n  # causal, per pass
        floor = (2 * (2 * block_params * n + attn_flops) + 2 * n * ((cfg.num_heads * cfg.head_dim) ** 2 + f ** 2))
        floor_s = floor / (results["matmul_ceiling_tflops"] * 1e12)
        results["block"] = {"tokens": args.tokens, "first_call_s": first, "seconds": block_s,
                            "pruners_s": prune_s, "orbax_save_s": save_s, "token_bound_s": token_s,
                            "per_block_at_4M_tokens_s": per_block_4m,
                            "model_blocks": cfg.num_layers,
                            "model_at_4M_tokens_min": cfg.num_layers * per_block_4m / 60,
                            "floor_per_block_at_4M_s": floor_s}
        print(f"one block on {args.tokens} tokens: {block_s:.1f} s (pruners {prune_s:.1f} s); at 4M tokens "
              f"{per_block_4m:.1f} s/block, {cfg.num_layers * per_block_4m / 60:.1f} min for "
              f"{cfg.num_layers} blocks; "
              f"FLOP floor {floor_s:.1f} s/block")
    stats = jax.devices()[0].memory_stats() or {}
    results["peak_device_bytes"] = stats.get("peak_bytes_in_use")
    results["host_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    save_results(results, args.json)


if __name__ == "__main__":
    main()
