"""The `tyr-jax` command line: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time


def _add_eval(sub):
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model",
                       description="Perplexity on a text (non-overlapping windows, first token of each "
                                   "unscored) and/or zero-shot multiple-choice accuracy.")
    p.add_argument("--model", required=True, help="HF directory, .gguf file or built-in name (smollm2-135m)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="a UTF-8 text file to score")
    src.add_argument("--data", help="a built-in corpus: wiki-eval, wiki-calib or news")
    p.add_argument("--seq-len", type=int, default=512, help="window length T (default 512)")
    p.add_argument("--max-tokens", type=int, default=None, help="keep only the first N tokens of the text")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tasks", default=None, help="comma-separated zero-shot tasks, e.g. arc_easy,piqa (or 'all')")
    p.add_argument("--limit", type=int, default=None, help="first K documents of each task")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--json", dest="json_out", default=None, help="write the results to this JSON file")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> dict:
    import jax.numpy as jnp

    from tyr_jax.data import corpora, sampler
    from tyr_jax.evaluation import perplexity as ppl_lib
    from tyr_jax.loading import load_model

    if args.text is None and args.data is None and args.tasks is None:
        raise SystemExit("tyr-jax eval: nothing to do; pass --text FILE or --data NAME, and/or --tasks")
    if args.seq_len < 2:
        raise SystemExit(f"tyr-jax eval: --seq-len must be at least 2, got {args.seq_len}")
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = load_model(args.model, dtype=dtype)
    if model.tokenizer is None:
        raise SystemExit(f"tyr-jax eval: {args.model} has no tokenizer.json; evaluation needs the tokenizer")
    result: dict = {}
    if args.text is not None or args.data is not None:
        text = corpora.load_text(args.text if args.text is not None else args.data)
        tokens = sampler.tokenize(model.tokenizer, text)
        windows = sampler.token_windows(tokens, args.seq_len, args.max_tokens)
        stats = ppl_lib.perplexity(model.weights, model.cfg, windows, batch_size=args.batch_size)
        result.update({k: stats[k] for k in ("ppl", "tokens_scored", "seq_len", "windows")})
        print(f"perplexity {stats['ppl']:.4f} over {stats['tokens_scored']} tokens "
              f"({stats['windows']} windows of {stats['seq_len']})")
    if args.tasks is not None:
        result["zeroshot"] = _zeroshot(model, args.tasks, args.limit, args.batch_size)
    if args.json_out:
        path = pathlib.Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return result


def _zeroshot(model, tasks: str, limit, batch_size) -> dict:
    import jax

    from tyr_jax.evaluation import zeroshot
    from tyr_jax.models import llama

    names = zeroshot.TASKS if tasks == "all" else tuple(t.strip() for t in tasks.split(",") if t.strip())
    # Weights are an argument, not a closed-over constant: constants make XLA compile for minutes.
    logprobs = jax.jit(lambda w, tok, tgt: llama.token_logprobs(w, tok, tgt, model.cfg))
    scores = zeroshot.evaluate(lambda tok, tgt: logprobs(model.weights, tok, tgt), model.tokenizer, names,
                               limit=limit, batch_size=batch_size)
    for name, s in scores.items():
        print(f"{name:>14}: acc {s['acc']:.4f}  acc_norm {s['acc_norm']:.4f}  (n={s['n']})")
    return scores


def _add_supernet(sub):
    p = sub.add_parser("supernet", help="build (or resume) the Týr supernet of a model",
                       description="Prunes every sublayer at E sparsity levels with expectation error "
                                   "accumulation and stores the copies with Orbax under OUT/supernet. "
                                   "Re-running the same command resumes after the last finished block.")
    _add_run_args(p, "supernet.target_sparsity=0.25 mesh.model=2")
    p.set_defaults(func=cmd_supernet)


def _add_run_args(p, example: str):
    p.add_argument("--config", default=None, help="YAML run config (required; see configs/, e.g. configs/smoke.yaml)")
    p.add_argument("--out", default=None, help="output directory (overrides the config's out)")
    p.add_argument("--distributed", action="store_true",
                   help="one process of several (hosts): call jax.distributed.initialize first; the cluster "
                        "(SLURM, Open MPI, Cloud TPU pod) is detected, or give the three options below")
    p.add_argument("--coordinator", default=None, help="with --distributed: host:port of process 0 "
                                                       "(or set JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None, help="with --distributed: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="with --distributed: this process's index")
    p.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")


def _shipped_configs() -> list[str]:
    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    return sorted(f"configs/{p.name}" for p in root.glob("*.yaml"))


def _run_config(args):
    """Starts the distributed runtime if asked (before anything touches a device), then reads the config."""
    from tyr_jax.runconfig import load_run_config

    if args.config is None:
        raise ValueError(f"--config is required: a run is hours on CPU at the full protocol. Shipped configs: "
                         f"{', '.join(_shipped_configs()) or '(none found)'}; configs/smoke.yaml is the quick one "
                         "(a few minutes on 2 CPU cores)")

    if args.distributed:
        from tyr_jax.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.coordinator or args.num_processes is not None or args.process_id is not None:
        raise ValueError("--coordinator, --num-processes and --process-id go with --distributed")
    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    return load_run_config(args.config, overrides)


def cmd_supernet(args):
    from tyr_jax.distributed import is_primary
    from tyr_jax.pipeline import run_supernet

    rc = _run_config(args)
    _, store, plan = run_supernet(rc, progress=is_primary())
    print(f"supernet of {rc.model}: {store.num_blocks()} blocks × {len(plan.attn[0])} levels in {store.root}")


def _add_prune(sub):
    p = sub.add_parser("prune", help="prune a model: calibration, supernet, search, export, evaluation",
                       description="The whole pipeline; re-running the same command resumes it. Writes "
                                   "OUT/model (the smaller model), OUT/summary.json and PNG plots.")
    _add_run_args(p, "method=flap search.generations=10 mesh.data=4")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args):
    from tyr_jax.distributed import is_primary
    from tyr_jax.pipeline import run_prune

    rc = _run_config(args)
    s = run_prune(rc, progress=is_primary())
    p = s["params"]
    if rc.method == "pbs2p":
        bits, e = s["export"]["bits_per_weight"], s["export"]
        print(f"pbs2p ({rc.pbs2p.variant}): {bits['file']:.3f} bits per compressed weight in the file "
              f"({bits['paper_convention']:.2f} as the papers count), {e['file_bytes'] / 2**20:.1f} MiB against "
              f"{e['dense_file_bytes'] / 2**20:.1f} MiB dense; "
              f"perplexity {s['ppl']['dense']:.3f} → {s['ppl']['pruned']:.3f} on {s['ppl']['text']}")
    else:
        print(f"{rc.label}: {p['prunable_pruned'] / p['prunable_dense']:.1%} of the prunable parameters kept; "
              f"perplexity {s['ppl']['dense']:.3f} → {s['ppl']['pruned']:.3f} on {s['ppl']['text']}")
    if s.get("ppl_ood"):
        print(f"out-of-domain perplexity {s['ppl_ood']['dense']:.3f} → {s['ppl_ood']['pruned']:.3f} "
              f"on {s['ppl_ood']['text']}")
    for task, acc in s["zeroshot"]["pruned"].items():
        print(f"{task:>14}: acc_norm {s['zeroshot']['dense'][task]:.4f} → {acc:.4f}")
    export = s.get("export") or {}
    gguf = export.get("gguf")
    print(f"wrote {rc.out}/model, " + (f"{gguf['path']} ({gguf['arch']}, {gguf['type']}), " if gguf else "") +
          f"{rc.out}/summary.json")
    if "trust_remote_code" in export:  # absent on other processes and in older runs
        remote = ", trust_remote_code=True" if export["trust_remote_code"] else ""
        print(f"transformers loads it: AutoModelForCausalLM.from_pretrained('{rc.out}/model'{remote})")


def _add_export(sub):
    p = sub.add_parser("export", help="write a model as a GGUF file that llama.cpp runs",
                       description="Dense and uniformly pruned models become llama.cpp's `llama` "
                                   "architecture, models with per-layer sizes its `deci` architecture. The "
                                   "vocabulary comes from the model: a GGUF file's tokenizer metadata is "
                                   "copied, an HF directory's tokenizer.json is described.")
    p.add_argument("--model", required=True, help="HF directory (e.g. OUT/model of tyr-jax prune), .gguf file or "
                                                  "built-in name")
    p.add_argument("--gguf", required=True, help="the .gguf file to write")
    p.add_argument("--type", default="f32", choices=("f32", "f16", "bf16"),
                   help="type of the matrices (norms and biases stay f32; default f32)")
    p.add_argument("--context-length", type=int, default=None,
                   help="the context length llama.cpp is told (default: the source's, if it names one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --gguf file")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> dict:
    from tyr_jax.export import export_gguf
    from tyr_jax.loading import load_model, resolve_model_path
    from tyr_jax.loading.hf import read_hf_json

    path = resolve_model_path(args.model)
    if path.is_dir() and "tyr_binary" in read_hf_json(path):
        raise ValueError(f"{path} is a PBS²P export: GGUF cannot hold its packed 1-bit weights (keep and sign "
                         "bits with α and μ); export the model it was compressed from instead")
    if pathlib.Path(args.gguf).exists() and not args.overwrite:  # before loading the weights
        raise FileExistsError(f"{args.gguf} already exists; pass --overwrite to replace it")
    model = load_model(args.model)
    report = export_gguf(model.weights, model.cfg, args.gguf, source=args.model, type=args.type,
                         context_length=args.context_length, overwrite=args.overwrite)
    print(f"wrote {report['path']}: llama.cpp architecture {report['arch']}, {report['type']} matrices")
    for line in report["stand_ins"]:
        print(f"  exact stand-in: {line}")
    return report


def _add_ablate(sub):
    p = sub.add_parser("ablate", help="run config variants over a grid of values; one table and one plot",
                       description="Variant i of the grid (the product of every --vary list) runs under "
                                   "OUT/variant_<i>; re-running skips finished variants. Variants without "
                                   "search that differ only in supernet.damp / supernet.expectation build "
                                   "their supernets in one vmapped pass; the rest run one after another. "
                                   "Writes OUT/ablation.csv, OUT/ablation.json and OUT/ablation.png.")
    p.add_argument("--config", default=None, help="YAML run config (see configs/)")
    p.add_argument("--out", default=None, help="output directory (overrides the config's out)")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a config key and its values, e.g. supernet.damp=0.001,0.01,0.1 (repeatable: grid)")
    p.add_argument("overrides", nargs="*", help="key=value overrides shared by every variant, e.g. method=uniform")
    p.set_defaults(func=cmd_ablate)


def cmd_ablate(args):
    from tyr_jax.ablate import run_ablation

    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    table = run_ablation(args.config, overrides, args.vary)
    keys = list(table["vary"])
    print(" | ".join(["variant", *keys, "mode", "ppl", "params", "wall_s"]))
    for r in table["rows"]:
        print(" | ".join([str(r["variant"]), *(str(r[k]) for k in keys), r["mode"], f"{r['ppl']:.4f}",
                          f"{r['params']:,}", f"{r['wall_s']:.1f}"]))
    print(f"wrote {table['out']}/ablation.csv, ablation.json, ablation.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tyr-jax", description="Structural pruning of Llama-family LLMs in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_eval(sub)
    _add_supernet(sub)
    _add_prune(sub)
    _add_ablate(sub)
    _add_export(sub)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"tyr-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
