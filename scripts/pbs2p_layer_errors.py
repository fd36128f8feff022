"""Per-layer output error of PBS²P and its baselines on one decoder block of a real model.

Every linear of block `--block` sees the same calibration inputs (the dense model's activations), so
the variants compare on equal terms; the error is ‖X W − X Ŵ‖² / ‖X W‖² (`linear.output_error`).
Tests the paper's claim that stepwise pruning with binarization (SPBO) ends at or below binarization
alone at 6:8, and below the one-shot N:M mask at every pattern.

    python scripts/pbs2p_layer_errors.py --block 10 --json runs/pbs2p_layer_errors.json
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import numpy as np

from tyr_jax.binarization import compress, linear
from tyr_jax.loading import load_model
from tyr_jax.models import llama
from tyr_jax.pipeline import calibration_tokens
from tyr_jax.pruning import SublayerStats
from tyr_jax.runconfig import CalibrationConfig

ROWS = (("binarize", {"variant": "binarize"}), ("nm_then_binarize", {"variant": "nm_then_binarize"}),
        ("pbs2p, SPBO saliency", {"variant": "pbs2p", "spbo_metric": "saliency"}),
        ("pbs2p, SPBO error, 1 step", {"variant": "pbs2p", "spbo_metric": "error", "spbo_steps": 1}),
        ("pbs2p, SPBO error", {"variant": "pbs2p", "spbo_metric": "error"}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--block", type=int, default=10)
    p.add_argument("--patterns", default="6:8,5:8,4:8")
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model = load_model(args.model)
    cfg = model.cfg
    calib = calibration_tokens(model.tokenizer, CalibrationConfig(num_sequences=args.sequences, seq_len=args.seq_len,
                                                                  batch_size=8))
    rope = llama.rope_tables(cfg, llama.default_positions(calib[:8]))
    xs = [llama.embed(model.weights, calib[i:i + 8]) for i in range(0, len(calib), 8)]
    for blk in model.weights.blocks[: args.block]:
        xs = [llama.block(blk, x, cfg, rope) for x in xs]
    blk = model.weights.blocks[args.block]
    mid = [x + llama.attention(blk.attn, x, cfg, rope) for x in xs]
    hessians = {}
    for where, names in compress.INPUT_GROUPS:
        stats = SublayerStats.zeros(compress.block_linears(blk)[names[0]].shape[1])
        for x in (mid if where in ("gate_up", "down") else xs):
            stats = compress.input_stats(blk, x, stats, rope, cfg, where)
        hessians.update({n: stats.hessian_ii for n in names})
    table = []
    for pattern in args.patterns.split(","):
        n, m = map(int, pattern.split(":"))
        for row, kw in ROWS:
            if kw["variant"] == "binarize" and table:   # no pruning: the same at every pattern
                continue
            errs = {}
            for name, w in compress.block_linears(blk).items():
                lin = linear.compress_linear(w, hessians[name], n=n, m=m, **kw)
                errs[name.split(".")[1]] = float(linear.output_error(w, lin.dense(128), hessians[name]))
            table.append({"pattern": pattern, "variant": row, **errs, "mean": float(np.mean(list(errs.values())))})
            print(f"{pattern} {row:>28}: " + " ".join(f"{k} {v:.4f}" for k, v in errs.items()) +
                  f" | mean {table[-1]['mean']:.4f}", flush=True)
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps({"model": args.model, "block": args.block,
                                                       "tokens": int(calib.size), "rows": table}, indent=1))


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    main()
