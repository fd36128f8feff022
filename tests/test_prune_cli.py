"""`tyr-jax prune` end to end on a tiny model: every stage runs, the export reloads (in transformers too), a
re-run resumes."""

import json
import os
import pathlib
import re

import numpy as np
import pytest
import torch
import transformers

from tyr_jax.cli import main
from tyr_jax.loading import load_model
from tyr_jax.models import llama


def test_prune_runs_exports_and_resumes(tiny_hf_dir, tmp_path, capsys):
    model_dir, corpus = tiny_hf_dir
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"""
model: {model_dir}
method: tyr
calibration: {{corpus: {corpus}, num_sequences: 4, seq_len: 32, batch_size: 2}}
supernet: {{target_sparsity: 0.5, min_step_channels: 4, mlp_round_size: 4}}
search: {{iterations: 2, generations: 2, offspring: 6, stage_candidates: [4, 2], stage_tokens: [64, 64, 128],
          top_k: 16, pool_sequences: 8, seq_len: 32, token_batch: 2, candidate_batch: 3}}
eval: {{corpus: {corpus}, seq_len: 32, max_tokens: 1024, batch_size: 2}}
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
    logits = np.asarray(llama.forward(exported.weights, tokens, exported.cfg))
    assert np.isfinite(logits).all()
    # transformers loads the export too (per-layer sizes through the bundled modeling_tyr.py), as printed.
    remote = summary["export"]["trust_remote_code"]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=remote)
    with torch.no_grad():
        hf_logits = hf_model.eval()(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(hf_logits, logits, atol=1e-4, rtol=0)
    printed = capsys.readouterr().out
    assert f"from_pretrained('{out}/model'{', trust_remote_code=True' if remote else ''})" in printed
    # Out-of-domain perplexity (the default eval.ood_corpus, news) in the same windows, printed too.
    ood = summary["ppl_ood"]
    assert ood["text"] == "news" and ood["tokens_scored"] == 32 * 31
    assert np.isfinite([ood["dense"], ood["pruned"]]).all()
    assert "out-of-domain perplexity" in printed
    # A finished run re-run is returned as it is: nothing re-exported, its wall time kept.
    text, model_time = (out / "summary.json").read_text(), (out / "model" / "config.json").stat().st_mtime_ns
    assert main(["prune", "--config", str(cfg_file), "--out", str(out)]) == 0
    assert "already holds this run, finished" in capsys.readouterr().out
    assert (out / "summary.json").read_text() == text
    assert (out / "model" / "config.json").stat().st_mtime_ns == model_time
    # Without its summary, a re-run finds every supernet block and search generation done, says so, and
    # gives the same model.
    (out / "summary.json").unlink()
    before = (out / "iteration_1" / "supernet" / "block_000").stat().st_mtime_ns
    assert main(["prune", "--config", str(cfg_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "supernet complete (2/2 blocks stored)" in printed
    assert "resuming search (iteration 2) at generation 2/2" in printed
    assert (out / "iteration_1" / "supernet" / "block_000").stat().st_mtime_ns == before
    assert json.loads((out / "summary.json").read_text())["per_layer"] == summary["per_layer"]
    # Stored work of other settings is refused before anything is written, naming what differs.
    run_config = (out / "run_config.json").read_text()
    assert main(["prune", "--config", str(cfg_file), "--out", str(out), "supernet.damp=0.1"]) == 2
    assert "supernet.damp: stored 0.01, requested 0.1" in capsys.readouterr().err
    assert (out / "run_config.json").read_text() == run_config


def test_bad_inputs_fail_before_any_work_naming_the_key(tiny_hf_dir, tmp_path, capsys):
    model_dir, corpus = tiny_hf_dir
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"""
model: {model_dir}
method: uniform
calibration: {{corpus: {corpus}, num_sequences: 4, seq_len: 32, batch_size: 2}}
eval: {{corpus: {corpus}, seq_len: 32, batch_size: 2}}
mesh: {{data: 1}}
""")
    empty, latin1 = tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_text("  \n")
    latin1.write_bytes("caf\xe9 ".encode("latin1") * 50)
    out = tmp_path / "run"
    for override, message in [(f"eval.corpus={empty}", "eval.corpus: .*contains no text"),
                               (f"calibration.corpus={tmp_path / 'missing.txt'}",
                                "calibration.corpus: .*does not exist"),
                               (f"eval.ood_corpus={latin1}", "eval.ood_corpus: .*not valid UTF-8.*null skips it"),
                               ("eval.seq_len=4096", "eval.corpus: No window of seq_len=4096"),
                               ("eval.tasks=piqa,arc_ez", "eval.tasks: unknown zero-shot task 'arc_ez'")]:
        assert main(["prune", "--config", str(cfg_file), "--out", str(out), override]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), (override, err)
        assert not out.exists()       # refused before anything was written


def test_prune_requires_a_config(capsys):
    assert main(["prune"]) == 2
    err = capsys.readouterr().err
    assert "--config is required" in err and "configs/smoke.yaml" in err and "quick" in err


def test_config_values_are_checked_against_their_types():
    from tyr_jax.runconfig import load_run_config

    for override, message in [("search.generations=three", "search.generations: expected an integer, got 'three'"),
                              ("supernet.damp=lots", "supernet.damp: expected a number, got 'lots'"),
                              ("supernet.expectation=1", "supernet.expectation: expected true or false, got 1"),
                              ("search.generations=2.5", "search.generations: expected an integer, got 2.5"),
                              ("search.stage_tokens=[64,x,128]", r"search.stage_tokens\[1\]: expected an integer"),
                              ("mesh.data=two", "mesh.data: expected an integer or null, got 'two'"),
                              ("eval.corpus=7", "eval.corpus: expected a string, got 7")]:
        with pytest.raises(ValueError, match=message):
            load_run_config(None, [override])
    rc = load_run_config(None, ["supernet.damp=1", "mesh.data=null", "eval.tasks=piqa,boolq",
                                "search.stage_candidates=8,4", "eval.ood_corpus=null"])
    assert rc.supernet.damp == 1.0 and isinstance(rc.supernet.damp, float) and rc.mesh.data is None
    assert rc.eval.tasks == ("piqa", "boolq") and rc.search.stage_candidates == (8, 4) and rc.eval.ood_corpus is None


def test_a_killed_evaluation_resumes_with_the_parts_not_yet_done(tmp_path, monkeypatch):
    # Perplexity and every zero-shot task are saved as they finish: a run killed in its second task keeps
    # the perplexity and the first task, and the re-run computes only the rest. The key holds tuples
    # (eval.tasks) that read back from JSON as lists; the saved parts must still be found.
    import jax

    from tyr_jax import pipeline
    from tyr_jax.runconfig import EvalConfig, RunConfig
    from tyr_jax.sharding import make_mesh

    mesh = make_mesh(1, 1, jax.devices()[:1])
    rc = RunConfig(eval=EvalConfig(tasks=("piqa", "arc_easy", "boolq")))
    calls = []

    def fake_perplexity(*args, **kwargs):
        calls.append("ppl")
        return {"ppl": 12.5, "tokens_scored": 10, "seq_len": 4}

    def fake_zeroshot(fn, tokenizer, tasks, **kwargs):
        (task,) = tasks
        calls.append(task)
        if task == "arc_easy" and calls.count(task) == 1:
            raise KeyboardInterrupt  # the kill
        return {task: {"acc_norm": len(task) / 10}}

    monkeypatch.setattr(pipeline, "perplexity", fake_perplexity)
    monkeypatch.setattr(pipeline.zeroshot, "evaluate", fake_zeroshot)
    path, key = tmp_path / "eval.json", {"eval": pipeline.to_dict(rc.eval)}
    evaluate = lambda: pipeline._evaluate(None, None, None, rc, None, False, mesh, path, key)  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        evaluate()
    assert calls == ["ppl", "piqa", "arc_easy"]
    result = evaluate()
    assert calls[3:] == ["arc_easy", "boolq"]
    assert result == {"ppl": 12.5, "tokens_scored": 10, "seq_len": 4,
                      "zeroshot": {"piqa": 0.4, "arc_easy": 0.8, "boolq": 0.5}}
    assert evaluate() == result and len(calls) == 5          # finished: read back, nothing recomputed
    other = {"eval": pipeline.to_dict(EvalConfig(tasks=("piqa",)))}
    pipeline._evaluate(None, None, None, rc, None, False, mesh, path, other)
    assert calls[5] == "ppl"                                 # another key: computed anew


def test_compare_methods_shares_only_a_finished_dense_evaluation(tmp_path):
    # A run writes dense_eval.json part by part; a partial one copied to the other runs would make each of
    # them compute the missing tasks again.
    import importlib.util

    from tyr_jax.results import evaluation_finished, save_keyed

    spec = importlib.util.spec_from_file_location(
        "compare_methods", pathlib.Path(__file__).parents[1] / "scripts" / "compare_methods.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    runs, key = [{"dir": first}, {"dir": second}], {"eval": {"tasks": ("piqa", "boolq")}}
    save_keyed(first / "dense_eval.json", key, {"ppl": 3.0, "zeroshot": {"piqa": 0.5}})
    compare.share_dense_eval(runs)
    assert not (second / "dense_eval.json").exists()
    save_keyed(first / "dense_eval.json", key, {"ppl": 3.0, "zeroshot": {"piqa": 0.5, "boolq": 0.6}})
    compare.share_dense_eval(runs)
    assert (second / "dense_eval.json").read_text() == (first / "dense_eval.json").read_text()
    save_keyed(first / "no_tasks.json", {"eval": {"tasks": ()}}, {"ppl": 3.0})
    assert evaluation_finished(first / "no_tasks.json") and not evaluation_finished(first / "missing.json")


def compare_plan(cfg_file, out):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "compare_methods", pathlib.Path(__file__).parents[1] / "scripts" / "compare_methods.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    return compare.plan_runs([f"{cfg_file}:flap", f"{cfg_file}:flap+EA"], out, [])


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
    root = pathlib.Path(__file__).parents[1]
    script = root / "scripts" / "compare_methods.py"
    # The script and the runs it starts import this checkout's package, wherever it is installed from.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])]))
    run = subprocess.run([sys.executable, str(script), "--out", str(out), "--jobs", "1", "--set", "eval.max_tokens=256",
                          f"{cfg_file}:uniform", f"{cfg_file}:magnitude"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    first, second = (json.loads((out / f"run-{m}" / "dense_eval.json").read_text()) for m in ("uniform", "magnitude"))
    assert first == second
    table = (out / "table.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) == {"run", "dense", "run-uniform", "run-magnitude"}
    assert "ood ppl (news)" in rows["run"]
    for name in ("run-uniform", "run-magnitude"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert f"{summary['ppl']['pruned']:,.2f}" in rows[name]
        assert f"{summary['ppl_ood']['pruned']:,.2f}" in rows[name]
    # magnitude as published: one level at the target, no expectation stream; "+EA" names the variant.
    assert json.loads((out / "run-magnitude" / "run_config.json").read_text())["supernet"]["num_levels"] == 1
    plan = compare_plan(cfg_file, out)
    assert [r["name"] for r in plan] == ["run-flap", "run-flap+EA"]
    assert "supernet.baseline_stream=expectation" in plan[1]["command"]
    # Finished runs are skipped on a re-run; a bad spec is refused before anything runs.
    again = subprocess.run([sys.executable, str(script), "--out", str(out), f"{cfg_file}:uniform"],
                           capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "skipped" in again.stdout
    bad = subprocess.run([sys.executable, str(script), "--out", str(out), f"{cfg_file}:pruneit"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "method 'pruneit' is unknown" in bad.stderr


def test_a_run_finished_before_a_display_setting_existed_is_still_found(tmp_path):
    """`policy_gradient.log_every` changes what is shown, not what is computed: a summary stored without
    it (or with another value) is the finished run of the config, and an ablation's result is found too."""
    from tyr_jax.pipeline import finished_summary
    from tyr_jax.runconfig import load_run_config, result_key, to_dict

    rc = load_run_config(None, [f"out={tmp_path}", "policy_gradient.log_every=7"])
    stored = to_dict(rc)
    del stored["policy_gradient"]["log_every"]
    (tmp_path / "summary.json").write_text(json.dumps({"config": stored, "ppl": 1.0}))
    assert finished_summary(rc)["ppl"] == 1.0
    assert json.dumps(result_key(to_dict(rc))) == json.dumps(result_key(stored))   # an ablation's result key
    other = load_run_config(None, [f"out={tmp_path}", "policy_gradient.steps=3"])
    assert finished_summary(other) is None
