"""Forward throughput of a Llama-3.1-8B-shaped model with random bf16 weights on one accelerator.

Reports tokens/s and achieved TFLOP/s over the bf16 matmul ceiling measured in the same run.
Model FLOPs count the matmuls (2·params·tokens, lm_head included, embedding lookup excluded) plus
causal attention (2·2·L·B·N·H·T²/2: only the lower triangle is useful work).

    python scripts/bench_forward.py --batch 8 --seq-len 2048 --json $OUT/forward.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig, RopeConfig
from tyr_jax.sharding import weight_shardings

LLAMA31_8B = ModelConfig(
    vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
    intermediate_size=14336, rms_norm_eps=1e-5, rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0,
    low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192))


def created_sharded(fn, abstract, mesh):
    """jit(fn) whose outputs are created already placed by the sharding table (no mesh: default device)."""
    if mesh is None:
        return jax.jit(fn)
    return jax.jit(fn, out_shardings=weight_shardings(abstract, mesh))


def save_results(results: dict, path: str | None) -> None:
    """Prints a benchmark's results as JSON and writes them to `path` (the `--json` option) if given."""
    print(json.dumps(results, indent=1))
    if path:
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1)


def timed(fn, *args, repeats: int) -> list[float]:
    """Wall seconds per call, after one warm-up call (which includes compilation)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def matmul_ceiling(n: int = 8192, repeats: int = 5, chain: int = 20, dtype=jnp.bfloat16) -> float:
    """Measured TFLOP/s of n×n×n products on random data (bf16; or fp32 at the precision in force):
    `chain` dependent products per jitted call, so dispatch and clock ramp-up stay out of the number."""
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    scale = jnp.asarray(1.0 / np.sqrt(n), dtype)  # keeps the chained product's magnitude steady

    @jax.jit
    def chained(a, b):
        return jax.lax.fori_loop(0, chain, lambda _, acc: (acc @ b) * scale, a)

    return 2 * n ** 3 * chain / float(np.median(timed(chained, a, b, repeats=repeats))) / 1e12


def hbm_read_bandwidth(gib: float = 4.0, repeats: int = 5, chain: int = 10) -> float:
    """Measured device-memory read bandwidth in GB/s: `chain` sums of a `gib`-GiB bf16 array per jitted call
    (a read-only stream, as batch-1 decoding's weight reads are)."""
    x = jnp.ones((int(gib * 2 ** 30) // 2,), jnp.bfloat16)

    @jax.jit
    def summed(x):
        return jax.lax.fori_loop(0, chain, lambda i, acc: acc + jnp.sum(x * i.astype(x.dtype), dtype=jnp.float32),
                                 jnp.float32(0))

    return x.nbytes * chain / float(np.median(timed(summed, x, repeats=repeats))) / 1e9


def device_time_by_kernel(trace_dir: str, hlo_text: str, top: int = 40) -> dict:
    """Device time of a `jax.profiler` trace (its trace-viewer JSON) summed per kernel name: the total, the
    number of kernels run, the top ones with their number of calls, the line of the compiled HLO that
    made them (kernel names are HLO instruction names with '.' and '-' as '_'; library kernels such as
    cuBLAS's have their own names) and one event's trace arguments (which name the HLO op where the
    profiler records it), and the same sums by kind: the name without its instance number
    (`gemm_fusion_dot_611` → `gemm_fusion_dot`), which gathers the many differently shaped kernels of a
    model whose layers differ in size."""
    path = max(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True), key=os.path.getmtime)
    events = json.load(gzip.open(path))["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, n in names.items() if "GPU" in n or "TPU" in n}
    busy, calls, example = collections.Counter(), collections.Counter(), {}
    for e in events:
        if e.get("ph") == "X" and e["pid"] in device:
            busy[e["name"]] += e["dur"]
            calls[e["name"]] += 1
            example.setdefault(e["name"], e.get("args", {}))
    hlo = {re.sub(r"[.-]", "_", m.group(1)): m.group(0)[:240]
           for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.-]+) = .*$", hlo_text, re.MULTILINE)}
    kind_us, kind_calls = collections.Counter(), collections.Counter()
    for k, us in busy.items():
        kind = re.sub(r"_\d+$", "", k)
        kind_us[kind] += us
        kind_calls[kind] += calls[k]
    return {"device_busy_us": sum(busy.values()), "kernels_run": sum(calls.values()),
            "top": [{"kernel": k, "us": us, "calls": calls[k], "hlo": hlo.get(k, ""), "args": example[k]}
                    for k, us in busy.most_common(top)],
            "by_kind": [{"kind": k, "us": us, "calls": kind_calls[k]} for k, us in kind_us.most_common(top)]}


def model_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    # The embedding lookup is no matmul; a tied embedding is still used once, as the lm_head.
    matmul_params = cfg.num_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    tokens = batch * seq_len
    attention = 2 * cfg.num_layers * batch * cfg.num_heads * cfg.head_dim * seq_len ** 2  # causal half of 4·…
    return 2 * matmul_params * tokens + attention


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--implementations", default="xla,cudnn")
    parser.add_argument("--matmul-size", type=int, default=8192, help="n of the n×n×n ceiling product")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    cfg = LLAMA31_8B if args.layers is None else dataclasses.replace(LLAMA31_8B, num_layers=args.layers)
    ceiling = matmul_ceiling(args.matmul_size)
    weights = jax.jit(llama.init_weights, static_argnames=("cfg", "dtype"))(
        cfg, key=jax.random.key(0), dtype=jnp.bfloat16)
    tokens = jax.random.randint(jax.random.key(2), (args.batch, args.seq_len), 0, cfg.vocab_size, jnp.int32)
    flops = model_flops(cfg, args.batch, args.seq_len)
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
               "batch": args.batch, "seq_len": args.seq_len, "layers": cfg.num_layers, "params": cfg.num_params(),
               "model_tflop": flops / 1e12, "matmul_ceiling_tflops": ceiling, "runs": {}}
    for impl in args.implementations.split(","):
        fwd = jax.jit(lambda w, t, impl=impl: llama.forward(w, t, cfg, implementation=impl))
        start = time.perf_counter()
        try:
            jax.block_until_ready(fwd(weights, tokens))
        except Exception as e:  # cudnn attention is unavailable on some devices / versions
            results["runs"][impl] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        compile_s = time.perf_counter() - start
        sec = float(np.median(timed(fwd, weights, tokens, repeats=args.repeats)))
        tflops = flops / sec / 1e12
        results["runs"][impl] = {"seconds": sec, "first_call_s": compile_s,
                                 "tokens_per_s": args.batch * args.seq_len / sec,
                                 "tflops": tflops, "fraction_of_ceiling": tflops / ceiling}
        print(f"{impl:>6}: {sec * 1e3:8.1f} ms  {args.batch * args.seq_len / sec:10.0f} tok/s  "
              f"{tflops:6.1f} TFLOP/s = {tflops / ceiling:.1%} of the {ceiling:.0f} TFLOP/s matmul ceiling")
    stats = jax.devices()[0].memory_stats() or {}
    results["peak_device_bytes"] = stats.get("peak_bytes_in_use")
    results["host"] = platform.node()
    save_results(results, args.json)


if __name__ == "__main__":
    main()
