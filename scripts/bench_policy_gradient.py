"""Policy-gradient step speed on Llama-3.1-8B shapes (random bf16 weights, random tokens), one device.

One step = K masked models on one batch (reference: 8 × 128 tokens) in one compiled call, the estimate,
the SGD update and the budget projection: exactly `policy_gradient.compile_step`, as `tyr-jax prune` runs
it. Reports steps/s for each K (default 2 and 8) and memory: XLA's analysis of the compiled step (arguments,
outputs and temporaries) and the device's `peak_bytes_in_use` so far (runs go in increasing K, so with one
layer count it is each K's peak). With `--layers L1,L2` the model is built with
fewer layers and the time per step extrapolated linearly in L to 32 (embedding and lm_head are the
intercept). `--tiny` runs a toy shape, for a smoke check on CPU. `--compile-only` allocates nothing: it
compiles the step for the layers as a list (unrolled, as before 2026-12-04) and stacked (scanned, as
`tyr-jax prune` runs it) at each layer count, on any device, and reports the seconds.

    PYTHONPATH=.:scripts python scripts/bench_policy_gradient.py --layers 8,16 --json $OUT/pg.json
    PYTHONPATH=.:scripts python scripts/bench_policy_gradient.py --tiny
    PYTHONPATH=.:scripts python scripts/bench_policy_gradient.py --compile-only --layers 4,8,16,32 --samples 2
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_forward import LLAMA31_8B, model_flops, save_results
from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig
from tyr_jax.pruning import policy_gradient as pgm
from tyr_jax.sharding import stack_layers

TINY = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   intermediate_size=128)
REFERENCE = "reference: 15,000 steps (K = 2, 8 × 128 tokens) take 2.7 h for a 13B model on one A100 (1.5 steps/s)"


def time_steps(cfg: ModelConfig, samples: int, batch: int, seq_len: int, steps: int, dtype) -> dict:
    """Seconds per step (median over `steps` after compiling and one warm-up step) of `samples` masks per step."""
    key = jax.random.key(0)
    weights = stack_layers(jax.jit(llama.init_weights, static_argnames=("cfg", "dtype"))(cfg, key=key, dtype=dtype))
    tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0, cfg.vocab_size, jnp.int32)
    pcfg = pgm.PolicyGradientConfig(steps=steps + 1, samples=samples, batch_size=batch, seq_len=seq_len,
                                    init="uniform")
    pg = pgm.policy_gradient(pcfg, pgm.keep_budget(cfg, 0.5))
    state = pg.init(pgm.initial_probs(pcfg, cfg, 0.5), key=key)
    step = pgm.compile_step(pg, cfg)
    start = time.perf_counter()
    analysis = step.lower(state, weights, tokens).compile().memory_analysis()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    state, losses = step(state, weights, tokens)
    jax.block_until_ready(losses)
    first = time.perf_counter() - start
    print(f"K={samples}, {cfg.num_layers} layers: compile {compile_s:.1f} s, first step {first:.2f} s", flush=True)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, losses = step(state, weights, tokens)
        jax.block_until_ready(losses)
        times.append(time.perf_counter() - start)
    stats = jax.devices()[0].memory_stats() or {}  # None on CPU
    del weights, state
    step_s = float(np.median(times))
    return {"layers": cfg.num_layers, "samples": samples, "compile_s": compile_s, "first_step_s": first,
            "step_s": step_s,
            "steps_per_s": 1.0 / step_s, "flop_per_step": model_flops(cfg, batch * samples, seq_len),
            "peak_device_bytes": stats.get("peak_bytes_in_use"),
            "compiled_bytes": None if analysis is None else {
                "arguments": analysis.argument_size_in_bytes, "outputs": analysis.output_size_in_bytes,
                "temporaries": analysis.temp_size_in_bytes, "aliased": analysis.alias_size_in_bytes}}


def compile_seconds(cfg: ModelConfig, samples: int, batch: int, seq_len: int, dtype) -> dict:
    """Seconds to compile the step with abstract weights, the layers as a list and stacked."""
    pcfg = pgm.PolicyGradientConfig(samples=samples, batch_size=batch, seq_len=seq_len, init="uniform")
    pg = pgm.policy_gradient(pcfg, pgm.keep_budget(cfg, 0.5))
    state = pg.init(pgm.initial_probs(pcfg, cfg, 0.5), key=jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
    per_layer = llama.abstract_weights(cfg, dtype)
    stacked = jax.eval_shape(lambda w: dataclasses.replace(w, blocks=llama.stack_blocks(w.blocks)), per_layer)
    out = {"layers": cfg.num_layers, "samples": samples}
    for name, weights in [("per_layer_s", per_layer), ("stacked_s", stacked)]:
        start = time.perf_counter()
        pgm.compile_step(pg, cfg).lower(state, weights, tokens).compile()
        out[name] = time.perf_counter() - start
    print(f"K={samples}, {cfg.num_layers} layers: compile {out['per_layer_s']:.1f} s as a list, "
          f"{out['stacked_s']:.1f} s stacked", flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="2,8", help="K values to time, increasing")
    parser.add_argument("--layers", default=None,
                        help="layer counts (default: all); two extrapolate to the model's (32, or 2 with --tiny)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per K (after a warm-up step)")
    parser.add_argument("--tiny", action="store_true", help="a toy model (CPU smoke check)")
    parser.add_argument("--compile-only", action="store_true", help="compile times only (list vs stacked layers)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    base, dtype = (TINY, jnp.float32) if args.tiny else (LLAMA31_8B, jnp.bfloat16)
    layers = [base.num_layers] if args.layers is None else [int(n) for n in args.layers.split(",")]
    result = {"device": jax.devices()[0].device_kind, "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
              "model": "tiny" if args.tiny else "llama-3.1-8b shapes", "dtype": jnp.dtype(dtype).name,
              "batch": args.batch, "seq_len": args.seq_len, "runs": [], "reference": REFERENCE}
    for k in sorted(int(s) for s in args.samples.split(",")):
        for n in layers:
            cfg = dataclasses.replace(base, num_layers=n)
            if args.compile_only:
                result["runs"].append(compile_seconds(cfg, k, args.batch, args.seq_len, dtype))
                continue
            r = time_steps(cfg, k, args.batch, args.seq_len, args.steps, dtype)
            r["achieved_tflops"] = r["flop_per_step"] / r["step_s"] / 1e12
            result["runs"].append(r)
            peak = "n/a" if r["peak_device_bytes"] is None else f"{r['peak_device_bytes'] / 2**30:.1f} GiB"
            print(f"K={k}, {n} layers: {r['steps_per_s']:.2f} steps/s ({r['step_s'] * 1e3:.1f} ms/step, compile "
                  f"{r['compile_s']:.1f} s), peak device memory {peak}")
        runs = [r for r in result["runs"] if r["samples"] == k]
        if len(runs) >= 2 and not args.compile_only:
            (l1, t1), (l2, t2) = [(r["layers"], r["step_s"]) for r in runs[:2]]
            est = t1 + (t2 - t1) / (l2 - l1) * (base.num_layers - l1)
            result[f"K{k}_step_s_{base.num_layers}_layers"] = est
            result[f"K{k}_hours_per_15000_steps"] = est * 15000 / 3600
            print(f"K={k}, {base.num_layers} layers (extrapolated): {1 / est:.2f} steps/s, "
                  f"{est * 15000 / 3600:.2f} h per 15,000 steps")
    save_results(result, args.json)


if __name__ == "__main__":
    main()
