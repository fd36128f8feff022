"""The supernet: level grids, Eq. 5 expectation propagation, Orbax store, resume and refusal."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tyr_jax import supernet as sn
from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig

CFG = ModelConfig(vocab_size=61, hidden_size=24, num_layers=3, num_heads=6, num_kv_heads=3, head_dim=4,
                  intermediate_size=40)


def _model(seed=0):
    return llama.init_weights(CFG, key=jax.random.key(seed), scale=0.2)


def _calib(n=8, t=16, seed=1):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (n, t)).astype(np.int32)


def _build(tmp_path, method="tyr", expectation=True, calib=None, name="s", **kw):
    scfg = sn.SupernetConfig(method=method, expectation=expectation, min_step_channels=4, mlp_round_size=4, **kw)
    plan = sn.LevelPlan.centred(CFG, scfg)
    calib = _calib() if calib is None else calib
    store = sn.SupernetStore(tmp_path / name, sn.fingerprint(CFG, scfg, plan, calib, "tiny", jnp.float32))
    sn.build_supernet(_model(), CFG, calib, scfg, plan, store, batch_size=4, progress=False)
    return store, plan, scfg


def test_level_grid_is_centred_clipped_and_in_whole_units():
    assert sn.level_removals(3, 0.5, 0.125, 9, 1) == (0, 0, 0, 1, 2, 3, 3, 3, 3)
    assert sn.level_removals(1536, 0.5, 0.125, 9, 32) == tuple(range(0, 1537, 192))
    assert sn.level_removals(100, 0.5, 0.0625, 5, 32) == (0, 18, 50, 82, 100)   # step 6.25 → at least 32
    w = sn.expectation_weights((0, 1, 2, 3), 3)
    np.testing.assert_allclose(w, np.array([3, 2, 1, 0]) / 6)
    assert not sn.expectation_weights((3, 3), 3).any()
    with pytest.raises(ValueError, match="target_sparsity"):
        sn.SupernetConfig(target_sparsity=1.5)
    with pytest.raises(ValueError, match="unknown pruner"):
        sn.SupernetConfig(method="nope")


def test_expectation_propagation_is_the_weighted_mean_of_the_copies(tmp_path):
    """Eq. 5 against the model's own sublayers run once per stored copy."""
    store, plan, _ = _build(tmp_path)
    weights = _model()
    blk, stored = weights.blocks[0], store.load_block(0)
    x = llama.embed(weights, jnp.asarray(_calib()[:4]))
    rope = llama.rope_tables(CFG, llama.default_positions(x[..., 0]))
    # The propagation steps take a leading variant axis (here one) and donate their input buffers.
    attn_copies = sn.stacked_copies(stored["attn"], 8, 24, np.float32)   # [E, I, O] as the pruner gives them
    got_mid = sn.propagate_attention(blk, [attn_copies], plan.attn[0], [x[None]], rope, CFG, [True])[0][0]
    mlp_copies = sn.stacked_copies(stored["mlp"], 1, 24, np.float32)
    got_out = sn.propagate_mlp(blk, [mlp_copies], plan.mlp[0], [got_mid[None]], CFG, [True])[0][0]

    def copy(level):  # the physically pruned block of one attention / MLP copy
        a, m = stored["attn"][f"level_{level}"], stored["mlp"][f"level_{level}"]
        small = llama.slice_block(blk, np.flatnonzero(a["keep"]), np.flatnonzero(m["keep"]))
        o = jnp.asarray(a["w"]).reshape(-1, 2, 4, 24) if "w" in a else small.attn.o_kghd
        down = jnp.asarray(m["w"]) if "w" in m else small.mlp.down_fd
        return llama.Block(dataclasses.replace(small.attn, o_kghd=o), dataclasses.replace(small.mlp, down_fd=down))

    w_attn, w_mlp = sn.expectation_weights(plan.attn[0], 3), sn.expectation_weights(plan.mlp[0], 40)
    want_mid = sum(w * (x + llama.attention(copy(e).attn, x, CFG, rope)) for e, w in enumerate(w_attn))
    want_out = sum(w * (want_mid + llama.mlp(copy(e).mlp, want_mid, CFG)) for e, w in enumerate(w_mlp))
    np.testing.assert_allclose(np.asarray(got_mid), np.asarray(want_mid), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), atol=1e-5)
    # The ablation hands on the dense output instead, which differs.
    dense = sn.propagate_attention(blk, [attn_copies], plan.attn[0], [x[None]], rope, CFG, [False])[0][0]
    np.testing.assert_allclose(np.asarray(dense), np.asarray(x + llama.attention(blk.attn, x, CFG, rope)), atol=1e-5)
    assert not np.allclose(np.asarray(dense), np.asarray(got_mid), atol=1e-3)


def test_copies_are_compact_and_exact_in_unit_counts(tmp_path):
    store, plan, _ = _build(tmp_path)
    for i in range(CFG.num_layers):
        blk = store.load_block(i)
        for e, removed in enumerate(plan.attn[i]):
            entry = blk["attn"][f"level_{e}"]
            assert entry["keep"].sum() == 3 - removed
            assert ("w" in entry) == (removed < 3)
            if "w" in entry:
                assert entry["w"].shape == ((3 - removed) * 2 * 4, 24)
        for e, removed in enumerate(plan.mlp[i]):
            assert store.load_block(i)["mlp"][f"level_{e}"]["keep"].sum() == 40 - removed


def test_one_pruner_program_serves_every_layer_and_iteration(tmp_path):
    """The removal counts reach `prune_step` as data: a build compiles one attention and one MLP pruner
    for all its layers (whose counts differ), and the next coarse-to-fine iteration, re-centred per
    layer with a finer step, compiles nothing new."""
    before = sn.prune_step._cache_size()
    store, plan, scfg = _build(tmp_path, name="it0")
    assert len(set(plan.attn)) > 1                                   # the layers' counts differ
    compiled = sn.prune_step._cache_size()
    assert compiled - before <= 2
    centres = ([0.0, 1 / 3, 1.0], [0.2, 0.5, 0.9])                  # as a search might leave them
    finer = dataclasses.replace(scfg, step=scfg.step / 2)
    nxt = sn.LevelPlan.centred(CFG, finer, *centres)
    assert set(nxt.mlp).isdisjoint(plan.mlp)
    store = sn.SupernetStore(tmp_path / "it1", sn.fingerprint(CFG, finer, nxt, _calib(), "tiny", jnp.float32))
    sn.build_supernet(_model(), CFG, _calib(), finer, nxt, store, batch_size=4, progress=False)
    assert sn.prune_step._cache_size() == compiled
    for i in range(CFG.num_layers):
        for e, removed in enumerate(nxt.mlp[i]):
            assert store.load_block(i)["mlp"][f"level_{e}"]["keep"].sum() == 40 - removed
    # Counts outside [0, units] cannot be checked once traced: the plan is checked before the build.
    bad = sn.LevelPlan(attn=nxt.attn, mlp=((0, 41),) * 3)
    with pytest.raises(ValueError, match=r"mlp plan's removal counts must lie in \[0, 40\]"):
        bad.level_arrays(CFG)
    with pytest.raises(ValueError, match="one row of counts per layer"):
        sn.LevelPlan(attn=nxt.attn[:2], mlp=nxt.mlp[:2]).level_arrays(CFG)


def test_killed_build_resumes_bit_identically(tmp_path, monkeypatch):
    full, _, _ = _build(tmp_path, name="full")
    save = sn.SupernetStore.save_block

    def dies_at_block_2(self, i, tree):
        if i == 2:
            raise KeyboardInterrupt("killed")
        save(self, i, tree)

    monkeypatch.setattr(sn.SupernetStore, "save_block", dies_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path, name="resumed")
    monkeypatch.setattr(sn.SupernetStore, "save_block", save)
    before = (tmp_path / "resumed" / "block_000").stat().st_mtime_ns
    resumed, _, _ = _build(tmp_path, name="resumed")
    assert (tmp_path / "resumed" / "block_000").stat().st_mtime_ns == before    # not rebuilt
    for i in range(CFG.num_layers):
        chex.assert_trees_all_equal(full.load_block(i), resumed.load_block(i))


def test_variants_built_together_equal_each_built_alone(tmp_path):
    """One pass over V configs (damp, expectation vary): store v holds what config v built alone holds;
    a store that already has its blocks is replayed, not rebuilt; other differences are refused."""
    kw = {"min_step_channels": 4, "mlp_round_size": 4}
    scfgs = [sn.SupernetConfig(damp=0.01, **kw), sn.SupernetConfig(damp=0.1, **kw),
             sn.SupernetConfig(damp=0.1, expectation=False, **kw)]
    plan, calib = sn.LevelPlan.centred(CFG, scfgs[0]), _calib()
    alone = [_build(tmp_path, name=f"alone{v}", damp=s.damp, expectation=s.expectation)[0]
             for v, s in enumerate(scfgs)]
    stores = [sn.SupernetStore(tmp_path / f"together{v}", a.fingerprint) for v, a in enumerate(alone)]
    # Variant 1's store is finished already: its blocks must stay, the others are built alongside.
    sn.build_supernet(_model(), CFG, calib, scfgs[1], plan, stores[1], batch_size=4, progress=False)
    before = (stores[1].root / "block_000").stat().st_mtime_ns
    sn.build_supernets(_model(), CFG, calib, scfgs, plan, stores, batch_size=4, progress=False)
    assert (stores[1].root / "block_000").stat().st_mtime_ns == before
    for want, got in zip(alone, stores):
        for i in range(CFG.num_layers):   # the same kept units (bools), weights up to fp32 rounding
            chex.assert_trees_all_close(want.load_block(i), got.load_block(i), atol=1e-5)
    differ = [scfgs[0], dataclasses.replace(scfgs[0], mlp_round_size=8)]
    with pytest.raises(ValueError, match="may differ only in damp, expectation"):
        sn.build_supernets(_model(), CFG, calib, differ, plan, stores[:2], batch_size=4, progress=False)


def test_mismatched_store_is_refused_and_left_untouched(tmp_path):
    store, _, _ = _build(tmp_path)
    meta = (store.root / "meta.json").read_text()
    with pytest.raises(ValueError, match="calibration_sha256"):
        _build(tmp_path, calib=_calib(seed=7))
    with pytest.raises(ValueError, match="supernet"):
        _build(tmp_path, method="magnitude")
    assert (store.root / "meta.json").read_text() == meta
    (store.root / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        _build(tmp_path)


def test_assembled_model_equals_masked_model(tmp_path):
    """With a pruner that does not touch weights, the assembled smaller model is the masked dense one."""
    store, plan, scfg = _build(tmp_path, method="magnitude")
    weights = _model()
    levels = [4, 6, 8]
    small, small_cfg = sn.assemble(weights, CFG, store, levels, levels)
    keep = [store.load_block(i) for i in range(3)]
    masks = llama.UnitMasks(
        kv_lk=jnp.asarray(np.stack([k["attn"][f"level_{e}"]["keep"] for k, e in zip(keep, levels)]), jnp.float32),
        mlp_lf=jnp.asarray(np.stack([k["mlp"][f"level_{e}"]["keep"] for k, e in zip(keep, levels)]), jnp.float32))
    assert small_cfg.kv_groups == tuple(3 - plan.attn[i][e] for i, e in enumerate(levels))
    tokens = _calib(2, 12, seed=3)
    np.testing.assert_allclose(np.asarray(llama.forward(small, tokens, small_cfg)),
                               np.asarray(llama.forward(weights, tokens, CFG, masks=masks)), atol=1e-5)
    assert small_cfg.num_params() == sum(x.size for x in jax.tree.leaves(small))


def test_flap_bias_compensation_is_stored_and_assembled(tmp_path):
    store, _, _ = _build(tmp_path, method="flap")
    assert "bias" in store.load_block(0)["mlp"]["level_4"]
    small, small_cfg = sn.assemble(_model(), CFG, store, [4] * 3, [4] * 3)
    assert small.blocks[0].mlp.down_bias_d is not None and small.blocks[0].attn.o_bias_d is not None
    assert np.isfinite(np.asarray(llama.forward(small, _calib(1, 8), small_cfg))).all()
    # A sublayer with every unit removed keeps its compensation bias, and the parameter count says so.
    gone, gone_cfg = sn.assemble(_model(), CFG, store, [8, 4, 4], [4, 8, 4])
    assert gone_cfg.kv_groups[0] == 0 and gone_cfg.mlp_widths[1] == 0
    assert gone.blocks[0].attn.o_bias_d is not None and gone.blocks[1].mlp.down_bias_d is not None
    assert gone_cfg.num_params() == sum(x.size for x in jax.tree.leaves(gone))


def test_cli_supernet_builds_resumes_and_refuses(tiny_hf_dir, tmp_path, capsys):
    """`tyr-jax supernet` end to end on a tiny HF model with its own tokenizer and a text file."""
    from tyr_jax.cli import main

    model_dir, corpus = tiny_hf_dir
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"model: {model_dir}\ncalibration: {{corpus: {corpus}, num_sequences: 4, "
                        "seq_len: 32, batch_size: 2}\nsupernet: {min_step_channels: 4, mlp_round_size: 4}\n"
                        "mesh: {data: 2, model: 2}\n")
    out = tmp_path / "run"
    assert main(["supernet", "--config", str(cfg_file), "--out", str(out)]) == 0
    first = (out / "supernet" / "block_001").stat().st_mtime_ns
    assert main(["supernet", "--config", str(cfg_file), "--out", str(out)]) == 0
    assert (out / "supernet" / "block_001").stat().st_mtime_ns == first
    capsys.readouterr()
    assert main(["supernet", "--config", str(cfg_file), "--out", str(out), "supernet.target_sparsity=0.25"]) == 2
    err = capsys.readouterr().err
    assert "supernet.target_sparsity: stored 0.5, requested 0.25" in err and "levels.attn" in err
    assert main(["supernet", "--config", str(cfg_file), "--out", str(out), "supernet.bogus=1"]) == 2
    assert main(["supernet", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_calibration_batches_refuse_uneven_batches_and_pruned_models():
    batches = sn.calibration_batches(CFG, _calib(n=8), 4)
    assert [b.shape for b in batches] == [(4, 16), (4, 16)] and batches[0].dtype == np.int32
    with pytest.raises(ValueError, match="7 calibration sequences do not split into batches of 4"):
        sn.calibration_batches(CFG, _calib(n=7), 4)
    with pytest.raises(ValueError, match="0 calibration sequences"):
        sn.calibration_batches(CFG, _calib(n=0), 4)
    pruned = CFG.with_layer_sizes([2, 3, 3], [40, 20, 40])
    with pytest.raises(ValueError, match="built from the dense model"):
        sn.calibration_batches(pruned, _calib(n=8), 4)


def test_baselines_take_one_level_of_statistics_from_dense_activations(tmp_path):
    """method=flap (as published): one copy at the target, fitted to the dense model's activations; block 1's
    copies equal FLAP run directly on statistics of the dense block 0's output."""
    from tyr_jax.pruning import SublayerStats, accumulate_stats, get_pruner
    from tyr_jax.runconfig import RunConfig

    base = sn.SupernetConfig(target_sparsity=0.5, min_step_channels=4)
    scfg = RunConfig(method="flap", supernet=base).supernet
    assert (scfg.method, scfg.num_levels, scfg.expectation) == ("flap", 1, False)
    plan = sn.LevelPlan.centred(CFG, scfg)
    calib = _calib()
    store = sn.SupernetStore(tmp_path / "flap", sn.fingerprint(CFG, scfg, plan, calib, "tiny", jnp.float32))
    sn.build_supernet(_model(), CFG, calib, scfg, plan, store, batch_size=4, progress=False)

    weights = _model()
    blk = weights.blocks[1]
    attn_stats, mlp_stats = SublayerStats.zeros(24), SublayerStats.zeros(40)
    for start in (0, 4):
        x = llama.embed(weights, jnp.asarray(calib[start: start + 4]))
        rope = llama.rope_tables(CFG, llama.default_positions(x[..., 0]))
        x1 = llama.block(weights.blocks[0], x, CFG, rope)          # the dense model's block-1 input
        ctx = llama.attention_context(blk.attn, x1, CFG, rope)
        attn_stats = accumulate_stats(attn_stats, ctx.reshape(-1, 24))
        mid = x1 + llama.attention(blk.attn, x1, CFG, rope)
        mlp_stats = accumulate_stats(mlp_stats, llama.mlp_hidden(blk.mlp, mid, CFG).reshape(-1, 40))
    flap = get_pruner("flap")
    want = {"attn": flap(blk.attn.o_kghd.reshape(-1, 24), attn_stats, unit_size=8, removals=plan.attn[1]),
            "mlp": flap(blk.mlp.down_fd, mlp_stats, unit_size=1, removals=plan.mlp[1])}
    stored = store.load_block(1)
    for kind, unit in (("attn", 8), ("mlp", 1)):
        got = stored[kind]["level_0"]
        np.testing.assert_array_equal(got["keep"], np.asarray(want[kind].keep_eu[0]))
        rows = np.repeat(got["keep"], unit)
        np.testing.assert_allclose(got["w"], np.asarray(want[kind].w_eio[0])[rows], atol=1e-5)
        np.testing.assert_allclose(got["bias"], np.asarray(want[kind].bias_eo[0]), atol=1e-5)

    # The "+EA" variant keeps Týr's 9 levels and expectation stream, under its own label.
    ea = RunConfig(method="flap", supernet=dataclasses.replace(base, baseline_stream="expectation"))
    assert (ea.supernet.num_levels, ea.supernet.expectation, ea.label) == (9, True, "flap+EA")
    assert RunConfig(method="flap").label == "flap"
    uniform = RunConfig(method="uniform", supernet=base).supernet      # Týr's own centre copies: unchanged
    assert (uniform.num_levels, uniform.expectation) == (9, True)
    with pytest.raises(ValueError, match="baseline_stream"):
        sn.SupernetConfig(baseline_stream="sparse")
