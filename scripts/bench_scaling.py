"""Scaling over local devices: one supernet block and one search generation on Llama-3.1-8B shapes.

For every mesh of `--meshes` (data,model pairs over the first data·model local devices) it times one
compiled supernet block (`bench_supernet.time_block`: Hessians on `--tokens` calibration tokens, both
Týr pruners, expectation propagation, Orbax writes) and one search generation
(`bench_search.time_generation`: 128 offspring on 2,048 tokens → 16 on 16,384 → 4 + parent on 131,072,
with `--layers` layers), and reports each mesh's speed-up over the first. Random bf16 weights and
copies, created already sharded. On a machine with 2 GPUs:

    PYTHONPATH=.:scripts python scripts/bench_scaling.py --meshes 1,1 2,1 --json scaling.json

Smoke check on CPU with tiny shapes and 2 fake devices (about a minute):

    JAX_PLATFORMS=cpu PYTHONPATH=.:scripts python scripts/bench_scaling.py --tiny --cpu-devices 2 --meshes 1,1 2,1
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from bench_forward import LLAMA31_8B
from tyr_jax.models.config import ModelConfig
from tyr_jax.search import SearchConfig
from tyr_jax.supernet import SupernetConfig

TINY = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8,
                   intermediate_size=256)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meshes", nargs="+", default=None,
                        help="data,model pairs, the first the baseline (default: 1,1 and all devices on data)")
    parser.add_argument("--tokens", type=int, default=1 << 22, help="calibration tokens of the supernet block")
    parser.add_argument("--layers", type=int, default=8, help="layers of the model the search generation runs")
    parser.add_argument("--generations", type=int, default=2, help="timed generations (after a compiling one)")
    parser.add_argument("--candidate-batch", type=int, default=8, help="candidates vmapped together per device")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke check that runs on CPU")
    parser.add_argument("--cpu-devices", type=int, default=None, help="fake CPU devices (for the smoke check)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)

    from bench_search import time_generation
    from bench_supernet import time_block
    from tyr_jax.sharding import make_mesh

    if args.tiny:
        cfg, tokens, seq_len, batch = TINY, 16 * 64, 64, 4
        scfg = SupernetConfig(min_step_channels=8, mlp_round_size=16)
        search_cfg = SearchConfig(offspring=8, stage_candidates=(4, 2), stage_tokens=(64, 256, 512), top_k=32,
                                  pool_sequences=8, seq_len=64, token_batch=1, candidate_batch=4)
    else:
        cfg, tokens, seq_len, batch = LLAMA31_8B, args.tokens, 2048, 8
        scfg = SupernetConfig()
        search_cfg = SearchConfig(top_k=8192, pool_sequences=64, seq_len=2048, token_batch=1,
                                  candidate_batch=args.candidate_batch)
    meshes = [tuple(map(int, m.split(","))) for m in (args.meshes or ["1,1", f"{jax.device_count()},1"])]
    runs = []
    for data, model in meshes:
        mesh = make_mesh(data, model)
        block = time_block(cfg, scfg, tokens, seq_len, batch, mesh)
        gen = time_generation(args.layers if not args.tiny else cfg.num_layers, search_cfg, args.generations,
                              mesh, base=cfg)
        runs.append({"mesh": {"data": data, "model": model}, "supernet_block_s": block["total_s"],
                     "supernet_pruners_s": block["prune_s"], "supernet_orbax_s": block["save_s"],
                     "search_generation_s": gen["generation_s"], "search_pool_topk_s": gen["pool_topk_s"]})
    for r in runs:
        r["speedup_supernet"] = runs[0]["supernet_block_s"] / r["supernet_block_s"]
        r["speedup_search"] = runs[0]["search_generation_s"] / r["search_generation_s"]
        print(f"mesh data={r['mesh']['data']} model={r['mesh']['model']}: supernet block "
              f"{r['supernet_block_s']:.2f} s ({r['speedup_supernet']:.2f}×; pruners {r['supernet_pruners_s']:.2f} s), "
              f"search generation {r['search_generation_s']:.2f} s ({r['speedup_search']:.2f}×)")
    result = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "date": time.strftime("%Y-%m-%d"),
              "jax": jax.__version__, "shapes": "tiny" if args.tiny else "llama-3.1-8b", "tokens": tokens,
              "search_layers": args.layers if not args.tiny else cfg.num_layers, "runs": runs}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
