"""Inference speed of physically pruned Llama-3.1-8B-shaped models against the dense one, one device.

Pruned models have a search-like, non-uniform distribution: the sparsity of layer l ramps linearly
from s/2 (first layer) to 3s/2 (last), rounded to whole KV groups and to the finest MLP level step of a
default coarse-to-fine search (Δ = 12.5%/8 of the channels: 224 of 14336, the only widths its last
iteration can pick), so the average is the target s. Times: prefill of a prompt (time to first token)
and greedy per-token decoding with a KV cache, random bf16 weights. Decoding is a stream of reads: each
token reads every weight but the embedding table (one row) and each layer's whole key/value cache, so
bytes per token over time per token is set against the device's read bandwidth measured in the same run.
`--profile DIR` also traces one generation per model and prints where the device time goes: per kernel,
its time, its number of calls and the compiled HLO instruction it runs (its shapes).

    PYTHONPATH=.:scripts python scripts/bench_pruned_inference.py --json $OUT/inference.json
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_forward import LLAMA31_8B, device_time_by_kernel, hbm_read_bandwidth, timed
from tyr_jax import search
from tyr_jax.models import decode, llama
from tyr_jax.pipeline import prunable_params
from tyr_jax.supernet import SupernetConfig


def ramp_sizes(cfg, sparsity: float):
    """Per-layer KV groups and MLP widths for a linear sparsity ramp averaging `sparsity`, MLP widths on
    the level grid of the last iteration of a default search."""
    scfg = SupernetConfig()
    finest = search.step_for_iteration(scfg.step, search.SearchConfig().iterations - 1)
    grid = max(scfg.min_step_channels, int(np.floor(finest * cfg.intermediate_size + 0.5)))
    ramp = sparsity * (0.5 + np.linspace(0.0, 1.0, cfg.num_layers))
    kv = np.clip(np.round(cfg.num_kv_heads * (1 - ramp)), 0, cfg.num_kv_heads).astype(int)
    mlp = np.clip(grid * np.round(cfg.intermediate_size * (1 - ramp) / grid), 0, cfg.intermediate_size).astype(int)
    return kv, mlp


def decode_bytes_per_token(weights: llama.Weights, cache_len: int) -> int:
    """Bytes one decoding step reads: all weights but the embedding table (an untied one is read as one
    row) and, per layer, the key and value caches of `cache_len` positions (decode.py attends over all)."""
    total = sum(x.nbytes for x in jax.tree.leaves(weights))
    if weights.lm_head_dv is not None:
        total -= weights.embed_vd.nbytes
    kv = sum(2 * cache_len * b.attn.k_dkh[0].size * b.attn.k_dkh.dtype.itemsize for b in weights.blocks)
    return total + kv


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0,0.25,0.5")
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", default=None, help="trace one generation per model into this folder")
    parser.add_argument("--attention", default=None, choices=("xla", "cudnn"),
                        help="decoding's attention over the cache (decode.generate's `attention`; default: "
                             "cuDNN on GPU)")
    args = parser.parse_args()
    prompt = jax.random.randint(jax.random.key(1), (args.batch, args.prompt), 0, LLAMA31_8B.vocab_size, jnp.int32)
    bandwidth = hbm_read_bandwidth()
    print(f"device read bandwidth {bandwidth:.0f} GB/s", flush=True)
    rows = []
    for s in map(float, args.sparsities.split(",")):
        cfg = LLAMA31_8B if s == 0 else LLAMA31_8B.with_layer_sizes(*ramp_sizes(LLAMA31_8B, s))
        weights = jax.jit(llama.init_weights, static_argnames=("cfg", "dtype"))(cfg, key=jax.random.key(0),
                                                                                dtype=jnp.bfloat16)

        read = decode_bytes_per_token(weights, args.prompt + args.new_tokens)  # the model's own bytes, unpadded
        prunable, params = prunable_params(weights), int(sum(x.size for x in jax.tree.leaves(weights)))
        weights = jax.jit(decode.layout)(weights)  # once, as a server would on loading the model

        @functools.partial(jax.jit, compiler_options=decode.COMPILER_OPTIONS)
        def ttft(w, p):
            cache = decode.init_cache(w, p.shape[0], p.shape[1], cfg)
            return decode.prefill(w, cache, p, cfg)[0]

        gen = functools.partial(decode.generate, cfg=cfg, num_new=args.new_tokens, attention=args.attention)
        prefill_s = float(np.median(timed(ttft, weights, prompt, repeats=5)))
        print(f"sparsity {s:.2f}: prefill {prefill_s * 1e3:.1f} ms", flush=True)
        gen_s = float(np.median(timed(gen, weights, prompt, repeats=3)))
        per_token = (gen_s - prefill_s) / args.new_tokens
        rows.append({"sparsity": s, "prunable_params": prunable, "params": params,
                     "prefill_s": prefill_s, "decode_s_per_token": per_token, "decode_bytes_per_token": read,
                     "decode_bandwidth_fraction": read / per_token / 1e9 / bandwidth})
        print(f"sparsity {s:.2f}: prefill {prefill_s * 1e3:.1f} ms, decode {per_token * 1e3:.2f} ms/token, "
              f"{read / 1e9:.2f} GB/token = {rows[-1]['decode_bandwidth_fraction']:.0%} of read bandwidth")
        if args.profile:
            trace_dir = f"{args.profile}/sparsity-{s}"
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                jax.block_until_ready(gen(weights, prompt))
            hlo = gen.func.lower(weights, prompt, **gen.keywords).compile().as_text()
            rows[-1]["profile"] = device_time_by_kernel(trace_dir, hlo)
            print(json.dumps(rows[-1]["profile"], indent=1), flush=True)
        del weights
    dense = rows[0]
    for r in rows:
        r["prunable_fraction_kept"] = r["prunable_params"] / dense["prunable_params"]
        r["prefill_speedup"] = dense["prefill_s"] / r["prefill_s"]
        r["decode_speedup"] = dense["decode_s_per_token"] / r["decode_s_per_token"]
    result = {"device": jax.devices()[0].device_kind, "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
              "read_bandwidth_gb_s": bandwidth, "attention": args.attention or llama.default_attention(jnp.bfloat16),
              "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new_tokens, "rows": rows}
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
