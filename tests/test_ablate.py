"""`tyr-jax ablate` on a tiny model: vmapped variants equal each variant run alone, the sequential path,
the table and plot, resume, and clear errors for bad --vary arguments."""

import csv
import json

import numpy as np
import pytest

from tyr_jax import ablate
from tyr_jax.cli import main
from tyr_jax.pipeline import eval_windows, evaluate_levels, run_supernet
from tyr_jax.runconfig import load_run_config


def _config(tmp_path, model_dir, corpus, method="uniform"):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"""
model: {model_dir}
method: {method}
calibration: {{corpus: {corpus}, num_sequences: 4, seq_len: 32, batch_size: 2}}
supernet: {{target_sparsity: 0.5, min_step_channels: 4, mlp_round_size: 4}}
search: {{iterations: 1, generations: 1, offspring: 4, stage_candidates: [2, 1], stage_tokens: [32, 32, 64],
          top_k: 16, pool_sequences: 4, seq_len: 32, token_batch: 1, candidate_batch: 2}}
eval: {{corpus: {corpus}, ood_corpus: null, seq_len: 32, batch_size: 2}}
mesh: {{data: 1}}
""")
    return str(cfg_file)


def test_vmapped_variants_equal_each_variant_run_alone(tiny_hf_dir, tmp_path):
    model_dir, corpus = tiny_hf_dir
    cfg_file = _config(tmp_path, model_dir, corpus)
    out = tmp_path / "abl"
    argv = ["ablate", "--config", cfg_file, "--out", str(out), "--vary", "supernet.damp=0.01,0.1",
            "--vary", "supernet.expectation=true,false"]
    assert main(argv) == 0
    table = json.loads((out / "ablation.json").read_text())
    rows = table["rows"]
    assert table["vary"] == {"supernet.damp": [0.01, 0.1], "supernet.expectation": [True, False]}
    assert [(r["supernet.damp"], r["supernet.expectation"]) for r in rows] == [
        (0.01, True), (0.01, False), (0.1, True), (0.1, False)]
    assert {r["mode"] for r in rows} == {"vmap"}
    assert len({round(r["ppl"], 6) for r in rows}) == 4   # the hyper-parameters matter on this model
    for r in rows:
        rc = load_run_config(cfg_file, [f"supernet.damp={r['supernet.damp']}",
                                        f"supernet.expectation={r['supernet.expectation']}",
                                        f"out={tmp_path / 'alone' / r['out']}"])
        model, store, _ = run_supernet(rc, progress=False)
        centre = [rc.supernet.num_levels // 2] * model.cfg.num_layers
        alone = evaluate_levels(model, store, centre, centre, eval_windows(model.tokenizer, rc), batch_size=2,
                                progress=False)
        np.testing.assert_allclose(r["ppl"], alone["ppl"], rtol=1e-5)
        assert r["params"] == alone["params"]
        # The vmapped store is the one a lone build would write: same fingerprint, same kept units.
        vmapped = ablate.sn.SupernetStore(out / r["out"] / "supernet", store.fingerprint)
        for i in range(model.cfg.num_layers):
            a, b = vmapped.load_block(i), store.load_block(i)
            for kind in ("attn", "mlp"):
                for e in range(rc.supernet.num_levels):
                    got, want = a[kind][f"level_{e}"], b[kind][f"level_{e}"]
                    np.testing.assert_array_equal(got["keep"], want["keep"])
                    if "w" in want:
                        np.testing.assert_allclose(got["w"], want["w"], atol=1e-5)
    # The table and the plot are written; a re-run resumes from the saved results.
    with open(out / "ablation.csv") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == ["variant", "supernet.damp", "supernet.expectation", "mode", "ppl", "params", "wall_s",
                            "out"]
    assert [float(g["ppl"]) for g in got] == [r["ppl"] for r in rows]
    assert (out / "ablation.png").stat().st_size
    before = (out / "variant_0" / "ablation_result.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "variant_0" / "ablation_result.json").stat().st_mtime_ns == before


def test_shape_changing_keys_run_sequentially(tiny_hf_dir, tmp_path):
    """Round sizes change the pruner's static schedule: one group per round size, vmapped over damp."""
    model_dir, corpus = tiny_hf_dir
    cfg_file = _config(tmp_path, model_dir, corpus)
    table = ablate.run_ablation(cfg_file, [f"out={tmp_path / 'abl'}"], ["supernet.mlp_round_size=4,40"],
                                progress=False)
    assert [r["mode"] for r in table["rows"]] == ["sequential", "sequential"]
    assert all(np.isfinite(r["ppl"]) and r["params"] > 0 for r in table["rows"])
    _, variants = ablate.make_variants(cfg_file, [], ["supernet.mlp_round_size=4,40", "supernet.damp=0.01,0.1"])
    groups = ablate.vmap_groups(variants)
    assert [[v.index for v in g] for g in groups] == [[0, 1], [2, 3]]


def test_search_variants_run_coarse_to_fine_as_prune_does(tiny_hf_dir, tmp_path):
    """A search variant runs Týr's supernets and searches only (no export, no dense evaluation), in the
    directories `tyr-jax prune` uses: prune on a variant's directory resumes its finished work and
    scores the same model."""
    from tyr_jax.pipeline import run_prune

    model_dir, corpus = tiny_hf_dir
    cfg_file = _config(tmp_path, model_dir, corpus, method="tyr")
    out = tmp_path / "abl"
    table = ablate.run_ablation(cfg_file, [f"out={out}"], ["search.seed=0,1"], progress=False)
    assert [r["mode"] for r in table["rows"]] == ["sequential", "sequential"]
    assert (out / "ablation.png").stat().st_size
    r = table["rows"][1]
    assert (out / r["out"] / "iteration_0" / "search").is_dir() and not (out / r["out"] / "summary.json").exists()
    block = out / r["out"] / "iteration_0" / "supernet" / "block_000"
    before = block.stat().st_mtime_ns
    summary = run_prune(load_run_config(cfg_file, ["search.seed=1", f"out={out / r['out']}"]), progress=False)
    assert block.stat().st_mtime_ns == before                      # resumed, not rebuilt
    np.testing.assert_allclose(r["ppl"], summary["ppl"]["pruned"], rtol=1e-5)
    assert r["params"] == summary["params"]["pruned"]


@pytest.mark.parametrize("vary, message", [
    (["supernet.damp"], "is not key=v1,v2"),
    (["supernet.damp=0.1,,0.2"], "empty value"),
    (["supernet.dampp=0.1,0.2"], "unknown config key"),
    (["out=a,b"], "sets each variant's out"),
    (["supernet.damp=0.1", "supernet.damp=0.2"], "repeats a key"),
    (["supernet.num_levels=3,4"], "num_levels must be odd"),
    ([], "nothing to vary"),
])
def test_bad_vary_is_a_clear_error(tmp_path, capsys, vary, message):
    argv = ["ablate", "--out", str(tmp_path / "abl")] + [a for v in vary for a in ("--vary", v)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "abl").exists()


def test_vary_splits_values_outside_brackets():
    assert ablate.parse_vary("search.stage_candidates=[4,2],[8,4]") == ("search.stage_candidates", [[4, 2], [8, 4]])
    assert ablate.parse_vary(" supernet.expectation = true,false") == ("supernet.expectation", [True, False])
    assert ablate.parse_vary("supernet.damp=1e-3,0.01") == ("supernet.damp", [0.001, 0.01])
    assert ablate.parse_vary("method=uniform,flap") == ("method", ["uniform", "flap"])


def test_plot_takes_categorical_and_list_values(tmp_path):
    from tyr_jax import plots

    rows = [{"search.stage_candidates": [4, 2], "supernet.expectation": True, "ppl": 10.0},
            {"search.stage_candidates": [8, 4], "supernet.expectation": True, "ppl": 1e3},
            {"search.stage_candidates": [4, 2], "supernet.expectation": False, "ppl": 12.0}]
    plots.plot_ablation(rows, ["search.stage_candidates", "supernet.expectation"], tmp_path / "a.png", "t")
    assert (tmp_path / "a.png").stat().st_size
