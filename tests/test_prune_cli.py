"""`tyr-jax prune` end to end on a tiny model: every stage runs, the export reloads, a re-run resumes."""

import json
import pathlib

import numpy as np

from tyr_jax.cli import main
from tyr_jax.loading import load_model
from tyr_jax.models import llama


def test_prune_runs_exports_and_resumes(tiny_hf_dir, tmp_path):
    model_dir, corpus = tiny_hf_dir
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"""
model: {model_dir}
method: tyr
calibration: {{corpus: {corpus}, num_sequences: 4, seq_len: 32, batch_size: 2}}
supernet: {{target_sparsity: 0.5, min_step_channels: 4, mlp_round_size: 4}}
search: {{iterations: 2, generations: 2, offspring: 6, stage_candidates: [4, 2], stage_tokens: [64, 64, 128],
          top_k: 16, pool_sequences: 8, seq_len: 32, token_batch: 2, candidate_batch: 3}}
eval: {{corpus: {corpus}, seq_len: 32, batch_size: 2}}
mesh: {{data: 2, model: 2}}
""")
    out = tmp_path / "run"
    assert main(["prune", "--config", str(cfg_file), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"method", "model", "target_sparsity", "params", "ppl", "zeroshot", "per_layer",
                            "wall_time_s"}
    p = summary["params"]
    # 50% of 2 layers × 3 KV groups is 3 groups; of 2 × 40 channels, 40: the budget is exact.
    assert sum(r["kv_groups_kept"] for r in summary["per_layer"]) == 3
    assert sum(r["mlp_channels_kept"] for r in summary["per_layer"]) == 40
    assert p["prunable_pruned"] == p["prunable_dense"] // 2
    assert len(summary["search_history"]) == 2 and all(len(h) == 2 for h in summary["search_history"])
    assert (out / "per_layer.png").stat().st_size and (out / "fitness.png").stat().st_size
    exported = load_model(out / "model")
    assert exported.cfg.kv_groups == tuple(r["kv_groups_kept"] for r in summary["per_layer"])
    tokens = np.random.default_rng(0).integers(0, exported.cfg.vocab_size, (1, 16)).astype(np.int32)
    assert np.isfinite(np.asarray(llama.forward(exported.weights, tokens, exported.cfg))).all()
    # A re-run finds every supernet block and search generation done and gives the same model.
    before = (out / "iteration_1" / "supernet" / "block_000").stat().st_mtime_ns
    assert main(["prune", "--config", str(cfg_file), "--out", str(out)]) == 0
    assert (out / "iteration_1" / "supernet" / "block_000").stat().st_mtime_ns == before
    assert json.loads((out / "summary.json").read_text())["per_layer"] == summary["per_layer"]


def test_cached_result_is_reused_when_the_key_holds_tuples(tmp_path):
    # Config dicts hold tuples (eval.tasks) that read back from JSON as lists; the cache must still hit.
    from tyr_jax.pipeline import _cached_json

    calls = []
    key = {"eval": {"tasks": ("piqa", "arc_easy")}}
    for _ in range(2):
        assert _cached_json(tmp_path / "dense.json", key, lambda: calls.append(1) or {"ppl": 1.5}) == {"ppl": 1.5}
    assert len(calls) == 1
    assert _cached_json(tmp_path / "dense.json", {"eval": {"tasks": ("piqa",)}}, lambda: {"ppl": 2.0}) == {"ppl": 2.0}


def test_compare_methods_runs_each_method_and_tabulates_them(tiny_hf_dir, tmp_path):
    """scripts/compare_methods.py: one run per method, one dense evaluation shared, one table."""
    import subprocess
    import sys

    model_dir, corpus = tiny_hf_dir
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"""
model: {model_dir}
calibration: {{corpus: {corpus}, num_sequences: 4, seq_len: 32, batch_size: 2}}
supernet: {{target_sparsity: 0.5, min_step_channels: 4, mlp_round_size: 4}}
eval: {{corpus: {corpus}, seq_len: 32, batch_size: 2}}
""")
    out = tmp_path / "compare"
    script = pathlib.Path(__file__).parents[1] / "scripts" / "compare_methods.py"
    run = subprocess.run([sys.executable, str(script), "--out", str(out), "--jobs", "1", "--set", "eval.max_tokens=256",
                          f"{cfg_file}:uniform", f"{cfg_file}:magnitude"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    first, second = (json.loads((out / f"run-{m}" / "dense_eval.json").read_text()) for m in ("uniform", "magnitude"))
    assert first == second
    table = (out / "table.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) == {"run", "dense", "run-uniform", "run-magnitude"}
    for name in ("run-uniform", "run-magnitude"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert f"{summary['ppl']['pruned']:,.2f}" in rows[name]
    # Finished runs are skipped on a re-run; a bad spec is refused before anything runs.
    again = subprocess.run([sys.executable, str(script), "--out", str(out), f"{cfg_file}:uniform"],
                           capture_output=True, text=True)
    assert again.returncode == 0 and "skipped" in again.stdout
    bad = subprocess.run([sys.executable, str(script), "--out", str(out), f"{cfg_file}:pruneit"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "method 'pruneit' is unknown" in bad.stderr
