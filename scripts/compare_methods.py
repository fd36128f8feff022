"""Runs `tyr-jax prune` for several (config, method) pairs side by side and tabulates their summaries.

A comparison is the same command with one line changed (`method=`), so every run gets the same
calibration text, budget and evaluation. Runs go to OUT/<config stem>-<method>, at most `--jobs` at a
time (on one GPU: memory grows per process as needed instead of being preallocated). They share one
dense evaluation: the first finished `dense_eval.json` (a run writes it part by part: perplexity, then
each task) is copied into the run directories that have none yet; each run still checks its key (model,
dtype, eval settings) and recomputes a mismatched one. A run directory that already holds `summary.json`
is skipped; an unfinished one resumes, its evaluation too (`pruned_eval.json`).

    python scripts/compare_methods.py --out runs/compare --jobs 4 --set search.generations=12 \\
        configs/smollm2-50.yaml:tyr configs/smollm2-50.yaml:flap configs/smollm2-pg-50.yaml
    python scripts/compare_methods.py --out runs/pbs2p configs/smollm2-pbs2p.yaml+pbs2p.variant=binarize \\
        configs/smollm2-pbs2p.yaml configs/smollm2-pbs2p.yaml+pbs2p.n=5+pbs2p.variant=nm_then_binarize
    python scripts/compare_methods.py --out runs/compare        (no runs: the table of what is there)

Writes OUT/table.md (held-out and out-of-domain perplexity, zero-shot acc_norm per task and their mean, wall
time; for PBS²P runs the bits per compressed weight of the packed file instead of the prunable parameters
kept). FLAP, Wanda-sp and magnitude run as published (dense statistics, one level); `CONFIG:flap+EA` runs
the variant fed Týr's expectation stream, under its own name.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

from tyr_jax.results import evaluation_finished
from tyr_jax.runconfig import load_run_config


def plan_runs(specs: list[str], out: pathlib.Path, overrides: list[str]) -> list[dict]:
    """`config[:method][+EA][+key=value...]` → {name, dir, command}; the method defaults to the config's own.
    `flap+EA` (also `wanda_sp+EA`, `magnitude+EA`) is that baseline fed Týr's expectation stream
    (supernet.baseline_stream); the `+key=value` overrides (this run's only) name the run too."""
    runs = []
    for spec in specs:
        spec, *own = spec.split("+")
        ea = [o for o in own if o == "EA"]
        own = [o for o in own if o != "EA"]
        config, _, method = spec.partition(":")
        extra = ([f"method={method}"] if method else []) + (["supernet.baseline_stream=expectation"] if ea else [])
        extra += own
        rc = load_run_config(config, extra + overrides)   # validates the config and the overrides now
        name = "-".join([pathlib.Path(config).stem, rc.label, *own])
        run_dir = out / name
        runs.append({"name": name, "dir": run_dir,
                     "command": [sys.executable, "-m", "tyr_jax.cli", "prune", "--config", config,
                                 *extra, *overrides, f"out={run_dir}"]})
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise SystemExit(f"two runs would share a directory: {names}")
    return runs


def share_dense_eval(runs: list[dict]) -> None:
    """Copies the first finished dense evaluation into run directories that have none."""
    done = [r["dir"] / "dense_eval.json" for r in runs if evaluation_finished(r["dir"] / "dense_eval.json")]
    if not done:
        return
    for r in runs:
        target = r["dir"] / "dense_eval.json"
        if not target.exists():
            r["dir"].mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".copy")
            shutil.copyfile(done[0], tmp)
            tmp.replace(target)


def run_all(runs: list[dict], jobs: int) -> list[str]:
    """Runs the commands, `jobs` at a time, logging each to OUT/<name>.log; returns the failed names."""
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    pending = [r for r in runs if not (r["dir"] / "summary.json").exists()]
    for r in runs:
        if r not in pending:
            print(f"{r['name']}: summary.json exists, skipped (delete {r['dir']} to run it again)")
    active, failed, start = {}, [], time.perf_counter()
    while pending or active:
        while pending and len(active) < jobs:
            r = pending.pop(0)
            r["dir"].parent.mkdir(parents=True, exist_ok=True)
            log = open(r["dir"].parent / f"{r['name']}.log", "a")
            active[r["name"]] = (r, subprocess.Popen(r["command"], stdout=log, stderr=subprocess.STDOUT, env=env),
                                 log, time.perf_counter())
            print(f"[{time.perf_counter() - start:6.0f} s] started {r['name']}", flush=True)
        time.sleep(2)
        for name, (r, proc, log, began) in list(active.items()):
            if proc.poll() is not None:
                log.close()
                del active[name]
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}; see {name}.log)"
                if proc.returncode:
                    failed.append(name)
                print(f"[{time.perf_counter() - start:6.0f} s] {name}: {status} after {time.perf_counter() - began:.0f} s",
                      flush=True)
        share_dense_eval(runs)
    return failed


def _target(s: dict) -> str:
    """The run's budget: the fraction of parameters removed, or PBS²P's kept N of M (mean over blocks)."""
    if "pbs2p" not in s:
        return f"{s['target_sparsity']:.0%}"
    ns = [n for n in s["pbs2p"]["n_per_layer"] if n is not None]
    return f"{sum(ns) / len(ns):g}:{s['pbs2p']['m']}"


def table(out: pathlib.Path) -> str:
    """Markdown table of every OUT/*/summary.json: a dense row per target, then one row per run (PBS²P
    runs form a group of their own)."""
    summaries = sorted((json.loads(p.read_text()) | {"name": p.parent.name} for p in out.glob("*/summary.json")),
                       key=lambda s: ("pbs2p" in s, s["target_sparsity"], s["name"]))
    if not summaries:
        return "(no finished runs)"
    tasks = sorted({t for s in summaries for t in s["zeroshot"]["pruned"]})
    ood = next((s["ppl_ood"] for s in summaries if s.get("ppl_ood")), None)
    head = ["run", "target", "prunable kept", "held-out ppl", *([f"ood ppl ({ood['text']})"] if ood else []), *tasks,
            *(["avg"] if tasks else []), "wall"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name, target, kept, ppl, ood_ppl, scores, wall):
        accs = [scores.get(t) for t in tasks]
        avg = [f"{sum(accs) / len(accs):.3f}" if None not in accs else ""] if tasks else []
        ood_cell = (["" if ood_ppl is None else f"{ood_ppl:,.2f}"] if ood else [])
        cells = [name, target, kept, f"{ppl:,.2f}", *ood_cell, *("" if a is None else f"{a:.3f}" for a in accs),
                 *avg, wall]
        lines.append("| " + " | ".join(cells) + " |")

    def ood_of(s, which):   # runs from before eval.ood_corpus, or with it null, have none
        return s["ppl_ood"][which] if s.get("ppl_ood") else None

    groups: dict = {}
    for s in summaries:
        groups.setdefault("pbs2p" if "pbs2p" in s else s["target_sparsity"], []).append(s)
    for group in groups.values():
        d = group[0]
        row("dense", "0%", f"{d['params']['prunable_dense']:,}", d["ppl"]["dense"], ood_of(d, "dense"),
            d["zeroshot"]["dense"], "")
        for s in group:
            p = s["params"]
            kept = (f"{s['export']['bits_per_weight']['file']:.2f} bits/w" if "pbs2p" in s else
                    f"{p['prunable_pruned'] / p['prunable_dense']:.2%}")
            row(s["name"], _target(s), kept, s["ppl"]["pruned"], ood_of(s, "pruned"), s["zeroshot"]["pruned"],
                f"{s['wall_time_s']:.0f} s")
    text = summaries[0]["ppl"]   # every run scores the same evaluation text
    note = f"\n\nperplexity: {text['text']}, windows of {text['seq_len']}, {text['tokens_scored']:,} tokens scored"
    if ood:
        note += f"; out of domain: {ood['text']}, {ood['tokens_scored']:,} tokens scored"
    return "\n".join(lines) + note + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="config[:method], e.g. configs/smollm2-50.yaml:flap")
    parser.add_argument("--out", required=True, help="parent directory of the run directories")
    parser.add_argument("--jobs", type=int, default=4, help="runs at a time")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every run (repeatable), e.g. --set search.generations=12")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    try:
        runs = plan_runs(args.runs, out, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"compare_methods: {e}") from None
    failed = run_all(runs, args.jobs) if runs else []
    md = table(out)
    if out.exists():
        (out / "table.md").write_text(md)
    print(md)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
