"""A GGUF of SmolLM2-135M with given per-layer sizes, for llama.cpp speed only.

Keeps the first `tyr_kv_groups[l]` KV groups and `tyr_mlp_widths[l]` MLP channels of each layer of the dense
model (a run's `model/config.json`, or docs/results/smollm2-tyr-50-sizes.json): the shapes of a searched
model without its channel choice or refit, which llama.cpp's speed does not depend on. Its outputs are
not that model's.

    PYTHONPATH=. python scripts/gguf_with_sizes.py docs/results/smollm2-tyr-50-sizes.json OUT.gguf
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp

from tyr_jax.export.gguf import export_gguf
from tyr_jax.loading import load_model
from tyr_jax.models import llama


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", help="JSON with tyr_kv_groups and tyr_mlp_widths (one entry per layer)")
    parser.add_argument("out", help="the .gguf to write")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--type", default="f16", choices=("f32", "f16", "bf16"))
    args = parser.parse_args()
    sizes = json.load(open(args.sizes))
    loaded = load_model(args.model)
    cfg = loaded.cfg
    kv, mlp = sizes["tyr_kv_groups"], sizes["tyr_mlp_widths"]
    if len(kv) != cfg.num_layers or len(mlp) != cfg.num_layers:
        raise SystemExit(f"{args.sizes}: {len(kv)} / {len(mlp)} layer sizes for a {cfg.num_layers}-layer model")
    masks = llama.UnitMasks(
        kv_lk=(jnp.arange(cfg.num_kv_heads)[None] < jnp.asarray(kv)[:, None]).astype(jnp.float32),
        mlp_lf=(jnp.arange(cfg.intermediate_size)[None] < jnp.asarray(mlp)[:, None]).astype(jnp.float32))
    weights, pruned_cfg = llama.apply_masks(loaded.weights, cfg, masks)
    export_gguf(weights, pruned_cfg, args.out, source=args.model, type=args.type, overwrite=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
