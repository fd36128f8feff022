"""Uniform-sparsity ablation on a real model: every sublayer takes the centre copy of its supernet.

Compares, at the same per-sublayer sparsity and on the same calibration and evaluation tokens:
Týr-local with expectation error accumulation (16 channels per MLP round, the paper's granularity, or
16 rounds in all, the reference code's), Týr-local with dense propagation, Wanda-sp, FLAP and magnitude
(as published: dense statistics, one level) and the same three fed the expectation stream ("+EA").
Writes a JSON table and prints a Markdown one.

    python scripts/ablate_uniform.py --model smollm2-135m --sparsities 0.25,0.5 --out runs/ablation
Pre-tokenized `--calib-tokens` / `--eval-tokens` (.npy) let it run where the corpora are not installed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import numpy as np

from tyr_jax.evaluation.perplexity import perplexity
from tyr_jax.loading import load_model
from tyr_jax.pipeline import calibration_tokens, evaluate_levels, run_supernet
from tyr_jax.runconfig import CalibrationConfig, load_run_config
from tyr_jax.data import corpora, sampler

VARIANTS = {  # name → (method, supernet overrides); "mlp_rounds" becomes a round size for the MLP width
    "tyr": ("uniform", {}),
    "tyr-16-rounds": ("uniform", {"mlp_rounds": 16}),
    "tyr-dense-propagation": ("uniform", {"expectation": False}),
    "wanda_sp": ("wanda_sp", {}),
    "flap": ("flap", {}),
    "magnitude": ("magnitude", {}),
    # The baselines above as published (dense statistics, one level); "+EA": fed Týr's expectation stream.
    "wanda_sp+EA": ("wanda_sp", {"baseline_stream": "expectation"}),
    "flap+EA": ("flap", {"baseline_stream": "expectation"}),
    "magnitude+EA": ("magnitude", {"baseline_stream": "expectation"}),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsities", default="0.25,0.5")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--num-sequences", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--calib-tokens", default=None, help=".npy [N, T] calibration windows (else sampled from wiki-calib)")
    p.add_argument("--eval-tokens", default=None, help=".npy [W, T] evaluation windows (else all of wiki-eval)")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    out = pathlib.Path(args.out)
    model = load_model(args.model)
    ccfg = CalibrationConfig(num_sequences=args.num_sequences, seq_len=args.seq_len)
    calib = np.load(args.calib_tokens) if args.calib_tokens else calibration_tokens(model.tokenizer, ccfg)
    windows = (np.load(args.eval_tokens) if args.eval_tokens else
               sampler.token_windows(sampler.tokenize(model.tokenizer, corpora.load_text("wiki-eval")), args.eval_seq_len))
    dense = perplexity(model.weights, model.cfg, windows, progress=False)
    rows = [{"variant": "dense", "sparsity": 0.0, "ppl": dense["ppl"], "params": model.cfg.num_params()}]
    print(f"dense: ppl {dense['ppl']:.3f} on {dense['tokens_scored']} tokens; calibration {calib.shape}")
    for sparsity in map(float, args.sparsities.split(",")):
        for name in args.variants.split(","):
            method, variant = VARIANTS[name][0], dict(VARIANTS[name][1])
            if "mlp_rounds" in variant:  # the reference code's schedule: a fixed number of rounds
                variant["mlp_round_size"] = -(-model.cfg.intermediate_size // variant.pop("mlp_rounds"))
            overrides = [f"method={method}"] + [f"supernet.{k}={v}" for k, v in variant.items()]
            overrides += [f"supernet.target_sparsity={sparsity}", f"model={args.model}",
                          f"out={out / f'{name}-{sparsity}'}", f"calibration.num_sequences={len(calib)}",
                          f"calibration.seq_len={calib.shape[1]}"]
            rc = load_run_config(None, overrides)
            start = time.perf_counter()
            _, store, plan = run_supernet(rc, model, calib=calib, progress=False)
            build_s = time.perf_counter() - start
            centre = rc.supernet.num_levels // 2
            levels = [centre] * model.cfg.num_layers
            res = evaluate_levels(model, store, levels, levels, windows, progress=False)
            rows.append({"variant": name, "sparsity": sparsity, "ppl": res["ppl"], "params": res["params"],
                         "build_s": build_s})
            print(f"{sparsity:.2f} {name:>22}: ppl {res['ppl']:9.3f}  params {res['params']:,}  build {build_s:.0f} s")
    result = {"model": args.model, "device": jax.devices()[0].device_kind, "date": time.strftime("%Y-%m-%d"),
              "calibration_shape": list(calib.shape), "eval_tokens_scored": dense["tokens_scored"],
              "eval_seq_len": int(windows.shape[1]), "rows": rows}
    print("\n| sparsity | variant | ppl | params |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['sparsity']:.0%} | {r['variant']} | {r['ppl']:.2f} | {r['params']:,} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
