"""PBS²P compression speed on Llama-3.1-8B shapes (random bf16 weights, random calibration tokens), one device.

Compresses one decoder block (`compress.compress_model` on a 1-layer model: Hessians of the 4 input
groups over `--sequences` × `--seq-len` tokens, the 7 linears in GPTQ order with SPBO at N:M,
propagation, Orbax writes) twice: the first run includes compilation, the second is the steady state.
The whole model is extrapolated as first + (blocks − 1) × steady. Reports achieved FLOP/s over the
device's measured matmul ceilings (bf16, and fp32 at "highest" precision, in which the compressor's
own products run), and the paper's 111 minutes for LLaMA-7B on one GPU as the reference.

    python scripts/bench_pbs2p.py --json $OUT/pbs2p.json
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

from bench_forward import LLAMA31_8B, matmul_ceiling, save_results
from tyr_jax.binarization import compress
from tyr_jax.models import llama


def block_flops(cfg, tokens: int, seq_len: int) -> dict:
    """Matmul FLOPs of compressing one block as `compress._compress_block` does it: the Hessians of the 4
    input groups; the forward work (q/k/v and causal attention twice — for o's inputs and for the MLP's —
    o once, gate/up twice — for down's inputs and for the output — and down once); GPTQ error feedback
    (2·O·I² per stacked group); the factorisations of H (≈ 8/3·I³ per group)."""
    d, f, a = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    groups = [(a + 2 * kv, d), (d, a), (2 * f, d), (d, f)]           # (stacked rows O, inputs I)
    n = tokens
    qkv, core, o, gate_up, down = 2 * n * d * (a + 2 * kv), 2 * n * seq_len * a, 2 * n * a * d, 4 * n * d * f, 2 * n * f * d
    return {"hessians": 2 * n * sum(i * i for _, i in groups),
            "forward": 2 * qkv + 2 * core + o + 2 * gate_up + down,
            "feedback": sum(2 * o_ * i * i for o_, i in groups),
            "factorisation": sum(8 / 3 * i ** 3 for _, i in groups)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--variant", default="pbs2p")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cfg = LLAMA31_8B
    one = dataclasses.replace(cfg, num_layers=1)
    weights = jax.jit(lambda k: llama.init_weights(one, key=k, dtype=jnp.bfloat16))(jax.random.key(0))
    calib = np.asarray(jax.random.randint(jax.random.key(1), (args.sequences, args.seq_len), 0, cfg.vocab_size))
    pcfg = compress.Pbs2pConfig(variant=args.variant, n=args.n, m=args.m, cfs=False)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("first", "steady"):
            store = compress.Pbs2pStore(f"{tmp}/{name}", compress.fingerprint(one, pcfg, calib, "random", jnp.bfloat16))
            timings = {}
            start = time.perf_counter()
            compress.compress_model(weights, one, calib, pcfg, store, batch_size=args.batch, progress=False,
                                    timings=timings)
            runs.append({"wall_s": time.perf_counter() - start, **timings})
            print(f"{name}: {runs[-1]['wall_s']:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in timings.items())})",
                  flush=True)
    bf16 = matmul_ceiling()
    with jax.default_matmul_precision("highest"):
        fp32 = matmul_ceiling(n=4096, dtype=jnp.float32)
    flops = block_flops(cfg, calib.size, args.seq_len)
    steady = runs[1]["wall_s"]
    model_min = (runs[0]["wall_s"] + (cfg.num_layers - 1) * steady) / 60
    results = {"device": jax.devices()[0].device_kind, "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
               "shapes": "Llama-3.1-8B", "tokens": int(calib.size), "pattern": f"{args.n}:{args.m}",
               "variant": args.variant, "runs": runs, "model_blocks": cfg.num_layers,
               "model_min": model_min, "paper_llama7b_min": 111,
               "block_tflop": {k: v / 1e12 for k, v in flops.items()},
               "matmul_ceiling_tflops": {"bf16": bf16, "fp32_highest": fp32},
               "achieved_tflops": sum(flops.values()) / steady / 1e12,
               "achieved_over_bf16_ceiling": sum(flops.values()) / steady / 1e12 / bf16,
               "peak_device_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"),
               "host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    print(f"steady block {steady:.1f} s; whole model ≈ {model_min:.1f} min (paper: 111 min for LLaMA-7B); "
          f"{results['achieved_tflops']:.1f} TFLOP/s achieved against {bf16:.0f} bf16 / {fp32:.0f} fp32 ceilings")
    save_results(results, args.json)


if __name__ == "__main__":
    main()
