"""Per-device memory of a Llama-3.1-70B Týr run on a mesh, without allocating (BENCHMARKS.md, 70B memory plan).

Shapes from `jax.eval_shape` and the abstract weight / bank tables, placements from the sharding table,
bytes per device from the shard shapes (`tyr_jax.memory.memory_plan`); the pruner and one search call
are compiled for fake CPU devices to read XLA's buffer assignment (about a minute).

    JAX_PLATFORMS=cpu PYTHONPATH=. python scripts/memory_plan.py --mesh 1,8 --device-gb 141
"""

from __future__ import annotations

import argparse
import json

import jax


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default="1,8", help="data,model")
    parser.add_argument("--device-gb", type=float, default=141.0, help="memory of one device (GB, 1e9 bytes)")
    parser.add_argument("--no-compile", action="store_true", help="shapes only: skip the compiled working sets")
    parser.add_argument("--config", default="configs/llama-3.1-70b.yaml", help="run config whose search settings to plan")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    data, model = map(int, args.mesh.split(","))
    jax.config.update("jax_num_cpu_devices", data * model)

    from tyr_jax.memory import LLAMA31_70B, memory_plan
    from tyr_jax.runconfig import load_run_config
    from tyr_jax.sharding import make_mesh

    search = load_run_config(args.config).search
    plan = memory_plan(LLAMA31_70B, make_mesh(data, model), search=search, compile_steps=not args.no_compile)
    print(f"Llama-3.1-70B, bf16, mesh data={data} × model={model}, devices of {args.device_gb:g} GB")
    print(f"{'':>24} {'per device GB':>14} {'whole GB':>10} {'compile s':>10}")
    for name, v in plan.items():
        total = "" if v["total"] is None else f"{v['total'] / 1e9:.1f}"
        compile_s = f"{v['compile_s']:.1f}" if "compile_s" in v else ""
        print(f"{name:>24} {v['device'] / 1e9:14.2f} {total:>10} {compile_s:>10}")
    for phase in ("supernet", "search"):
        print(f"{phase}: {plan[phase]['device'] / 1e9:.1f} of {args.device_gb:g} GB per device "
              f"({'fits' if plan[phase]['device'] <= args.device_gb * 1e9 else 'does NOT fit'})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"mesh": {"data": data, "model": model}, "device_gb": args.device_gb, "plan": plan}, fh, indent=1)


if __name__ == "__main__":
    main()
