"""The sparsity sweep's record: finished runs → a CSV kept in the repo → a table and a figure.

Run directories do not outlive the machine they ran on, so each finished run's numbers are merged into
one CSV (`docs/results/smollm2-sweep.csv`), keyed by (method, variant, target). The markdown table and the
perplexity-against-sparsity figure are drawn from that CSV alone, so rows measured in different sessions
land in one place.

    python scripts/compare_methods.py --out runs/sweep ... (the runs; BENCHMARKS.md has the command)
    python scripts/sweep_figure.py --runs runs/sweep --date 2026-12-03 --device "one H200"
    python scripts/sweep_figure.py        (table and figure from the CSV as it is)
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import statistics

from tyr_jax.plots import plot_sweep

FIELDS = ["method", "variant", "target", "prunable_kept", "ppl", "ppl_ood", "wall_s", "date", "device"]
NAMES = {"dense": "dense", "tyr": "Týr searched", "uniform": "Týr-local", "policy_gradient": "policy gradient", "flap": "FLAP",
         "wanda_sp": "Wanda-sp", "magnitude": "magnitude"}


def row_of(run_dir: pathlib.Path, date: str, device: str) -> dict:
    """One finished run's row. The variant is what the run's name adds beyond its method and target
    (compare_methods names runs `<config>-<method>[-key=value...]`), e.g. `search.seed=1`."""
    s = json.loads((run_dir / "summary.json").read_text())
    extra = [p for p in run_dir.name.split("-") if "=" in p and not p.startswith("supernet.target_sparsity=")]
    p = s["params"]
    return {"method": s["method"], "variant": ",".join(extra), "target": s["target_sparsity"],
            "prunable_kept": round(p["prunable_pruned"] / p["prunable_dense"], 6),
            "ppl": round(s["ppl"]["pruned"], 3), "ppl_ood": round(s["ppl_ood"]["pruned"], 3) if s.get("ppl_ood") else "",
            "wall_s": round(s["wall_time_s"]), "date": date, "device": device}


def dense_row(run_dir: pathlib.Path, date: str, device: str) -> dict:
    """The dense model's row (target 0), from any run's summary: every run scores the same text."""
    s = json.loads((run_dir / "summary.json").read_text())
    return {"method": "dense", "variant": "", "target": 0.0, "prunable_kept": 1.0, "ppl": round(s["ppl"]["dense"], 3),
            "ppl_ood": round(s["ppl_ood"]["dense"], 3) if s.get("ppl_ood") else "", "wall_s": "", "date": date,
            "device": device}


def read_rows(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    number = {"target": float, "prunable_kept": float, "ppl": float, "ppl_ood": float,
              "wall_s": lambda v: round(float(v))}
    return [{k: (number[k](v) if k in number and v else v) for k, v in r.items()} for r in rows]


def merge(rows: list[dict], new: list[dict]) -> list[dict]:
    """`new` rows replace rows of the same (method, variant, target)."""
    key = lambda r: (r["method"], r["variant"], float(r["target"]))  # noqa: E731
    merged = {key(r): r for r in rows} | {key(r): r for r in new}
    return sorted(merged.values(), key=lambda r: (r["method"], r["variant"], float(r["target"])))


def table(rows: list[dict]) -> str:
    """Held-out | out-of-domain perplexity per method and target; seeds (variant `search.seed=N`, with the
    seed-0 run) as mean ± std."""
    targets = sorted({float(r["target"]) for r in rows})
    groups: dict = {}
    for r in rows:
        variant = "" if r["variant"].startswith("search.seed=") else r["variant"]
        groups.setdefault((r["method"], variant), {}).setdefault(float(r["target"]), []).append(r)
    lines = ["| method | " + " | ".join(f"{t:.1%}" for t in targets) + " |", "|---" * (len(targets) + 1) + "|"]
    order = lambda item: (list(NAMES).index(item[0][0]) if item[0][0] in NAMES else len(NAMES), item[0])  # noqa: E731
    for (method, variant), by_target in sorted(groups.items(), key=order):
        cells = []
        for t in targets:
            runs = by_target.get(t, [])
            if not runs:
                cells.append("—")
                continue
            ppl, ood = [r["ppl"] for r in runs], [r["ppl_ood"] for r in runs if r["ppl_ood"] != ""]
            cell = f"{ppl[0]:,.2f}" if len(ppl) == 1 else \
                f"{statistics.mean(ppl):,.2f} ± {statistics.stdev(ppl):.2f} ({len(ppl)} seeds)"
            cells.append(cell + (f" / {statistics.mean(ood):,.2f}" if ood else ""))
        name = NAMES.get(method, method) + (f" ({variant})" if variant else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\ncells: held-out Wikipedia perplexity / out-of-domain (news) perplexity\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=pathlib.Path, help="a compare_methods --out directory to merge in")
    parser.add_argument("--date", default="", help="when the merged runs were measured")
    parser.add_argument("--device", default="", help="where the merged runs were measured")
    parser.add_argument("--csv", type=pathlib.Path, default=pathlib.Path("docs/results/smollm2-sweep.csv"))
    parser.add_argument("--png", type=pathlib.Path, default=pathlib.Path("docs/figures/smollm2-sweep.png"))
    args = parser.parse_args()
    rows = read_rows(args.csv)
    if args.runs:
        finished = sorted(p.parent for p in args.runs.glob("*/summary.json"))
        if not finished:
            raise SystemExit(f"no finished run (*/summary.json) under {args.runs}")
        new = [row_of(d, args.date, args.device) for d in finished]
        rows = merge(rows, new + [dense_row(finished[0], args.date, args.device)])
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    if not rows:
        raise SystemExit(f"{args.csv} holds no rows: merge runs in with --runs DIR")
    print(table(rows))
    plot_sweep([r | {"name": NAMES.get(r["method"], r["method"])} for r in rows], args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
