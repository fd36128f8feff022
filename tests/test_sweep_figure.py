"""scripts/sweep_figure.py: finished runs merge into the CSV record; seeds become mean ± std."""

import importlib.util
import json
import pathlib

_SPEC = importlib.util.spec_from_file_location(
    "sweep_figure", pathlib.Path(__file__).parents[1] / "scripts" / "sweep_figure.py")
sweep_figure = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(sweep_figure)


def _run(root, name, method, target, ppl):
    d = root / name
    d.mkdir(exist_ok=True)
    (d / "summary.json").write_text(json.dumps({
        "method": method, "target_sparsity": target, "wall_time_s": 10.0,
        "params": {"prunable_dense": 100, "prunable_pruned": round(100 * (1 - target))},
        "ppl": {"dense": 20.0, "pruned": ppl}, "ppl_ood": {"dense": 30.0, "pruned": 2 * ppl}}))


def test_runs_merge_into_the_csv_and_seeds_average(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    _run(runs, "smollm2-25-tyr", "tyr", 0.25, 30.0)
    _run(runs, "smollm2-25-tyr-search.seed=1", "tyr", 0.25, 32.0)
    _run(runs, "smollm2-25-flap-supernet.target_sparsity=0.125", "flap", 0.125, 40.0)
    csv_path, png = tmp_path / "sweep.csv", tmp_path / "sweep.png"
    args = ["--csv", str(csv_path), "--png", str(png), "--date", "today", "--device", "cpu"]
    monkeypatch.setattr("sys.argv", ["sweep_figure.py", "--runs", str(runs), *args])
    sweep_figure.main()
    rows = sweep_figure.read_rows(csv_path)
    assert {(r["method"], r["variant"], r["target"]) for r in rows} == {
        ("dense", "", 0.0), ("tyr", "", 0.25), ("tyr", "search.seed=1", 0.25), ("flap", "", 0.125)}
    table = sweep_figure.table(rows)
    assert "31.00 ± 1.41 (2 seeds) / 62.00" in table        # mean ± sample std of 30 and 32
    assert "| FLAP | — | 40.00 / 80.00 | — |" in table
    assert png.stat().st_size > 0

    # a rerun replaces a row of the same (method, variant, target) instead of adding one
    _run(runs, "smollm2-25-tyr-search.seed=2", "tyr", 0.25, 34.0)
    _run(runs, "smollm2-25-flap-supernet.target_sparsity=0.125", "flap", 0.125, 41.0)
    sweep_figure.main()
    rows = sweep_figure.read_rows(csv_path)
    assert len(rows) == 5
    assert "32.00 ± 2.00 (3 seeds)" in sweep_figure.table(rows)
    assert "| FLAP | — | 41.00 / 82.00 | — |" in sweep_figure.table(rows)
