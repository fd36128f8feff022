"""PBS²P (ALGORITHMS.md §3): each part against a NumPy float64 reference, the packed format, resume,
meshes, refusals, and the CLI end to end on a tiny model."""

import json
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tyr_jax.binarization import arb, compress, linear, nm, packed
from tyr_jax.loading import load_model
from tyr_jax.models import ModelConfig, init_weights
from tyr_jax.runconfig import load_run_config

RNG = np.random.default_rng(0)


def _layer(o=8, i=64, tokens=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, i)) * rng.uniform(0.2, 3.0, i)
    return rng.standard_normal((o, i)) * 0.05, x.T @ x


# -- NumPy float64 references ------------------------------------------------------------------------


def arb_ref(w, keep, iters, start=None):
    n = np.maximum(keep.sum(1), 1)
    mean = lambda v: np.where(keep, v, 0).sum(1) / n  # noqa: E731
    if start is None:
        mu = mean(w)
        alpha, b = mean(np.abs(w - mu[:, None])), np.where(w - mu[:, None] >= 0, 1.0, -1.0)
    else:
        alpha, mu, b = start
    for _ in range(iters):
        mu = mean(w - alpha[:, None] * b)
        alpha = mean(b * (w - mu[:, None]))
        b = np.where(w - mu[:, None] >= 0, 1.0, -1.0)
    return alpha, mu, b


def nm_keep_ref(score, pruned, m):
    keep = np.ones(score.shape, bool)
    for r in range(score.shape[0]):
        for g in range(0, score.shape[1], m):
            order = np.argsort(score[r, g:g + m], kind="stable")
            keep[r, g + order[:pruned]] = False
    return keep


def compress_ref(w, h, *, variant, n, m, bs, damp=0.01, iters=15, steps=None, metric="saliency"):
    """GPTQ-order compression of one [O, I] weight, written out with loops in float64."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    steps = m - n if steps is None else steps
    out_keep, out_hat = np.zeros(w.shape, bool), np.zeros(w.shape)
    for s in range(0, w.shape[1], bs):
        w1, d = w[:, s:s + bs], np.diag(u)[s:s + bs]
        keep = np.ones(w1.shape, bool)
        if variant == "binarize" or n == m:
            a, mu, b = arb_ref(w1, keep, iters)
        elif variant == "nm_then_binarize":
            keep = nm_keep_ref(np.where(dead[s:s + bs], -np.inf, w1 ** 2 / d ** 2), m - n, m)
            a, mu, b = arb_ref(w1, keep, iters)
        else:
            a, mu, b = arb_ref(w1, keep, iters)
            for k in range(steps):
                pruned = int(round((m - n) * (k + 1) / steps))
                hat = np.where(keep, a[:, None] * b + mu[:, None], 0)
                score = (w1 ** 2 - (w1 - hat) ** 2) / d ** 2 if metric == "error" else w1 ** 2 / d ** 2
                keep = nm_keep_ref(np.where(keep & ~dead[s:s + bs], score, -np.inf), pruned, m)
                a, mu, b = arb_ref(w1, keep, iters, (a, mu, b))
        a, mu = a.astype(np.float16).astype(np.float64), mu.astype(np.float16).astype(np.float64)
        hat = np.where(keep, a[:, None] * b + mu[:, None], 0)
        out_keep[:, s:s + bs], out_hat[:, s:s + bs] = keep, hat
        w1, err = w1.copy(), np.zeros(w1.shape)
        for j in range(w1.shape[1]):         # GPTQ's column loop with the block's values fixed
            err[:, j] = (w1[:, j] - hat[:, j]) / d[j]
            w1[:, j:] -= np.outer(err[:, j], u[s + j, s + j:s + bs])
        w[:, s + bs:] -= err @ u[s:s + bs, s + bs:]
    return out_keep, out_hat


# -- the parts ---------------------------------------------------------------------------------------


def test_arb_matches_float64_reference_over_kept_entries():
    w = RNG.standard_normal((6, 32))
    keep = RNG.random((6, 32)) > 0.3
    for iters in (0, 1, 15):
        got = arb.binarize(jnp.asarray(w, jnp.float32), jnp.asarray(keep), iters)
        alpha, mu, b = arb_ref(w, keep, iters)
        np.testing.assert_allclose(got.alpha_r, alpha, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.mu_r, mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.where(got.sign_rc, 1.0, -1.0)[keep], b[keep])
        hat = np.asarray(arb.reconstruct(got, jnp.asarray(keep)))
        assert np.all(hat[~keep] == 0)


def test_arb_refinement_never_increases_the_error():
    w = RNG.standard_normal((16, 128))
    keep = np.ones(w.shape, bool)
    errs = [float(np.sum((w - arb.reconstruct(arb.binarize(jnp.asarray(w, jnp.float32), keep, k), keep)) ** 2))
            for k in (0, 1, 5, 15)]
    assert all(b <= a + 1e-5 for a, b in zip(errs, errs[1:]))


def test_nm_masks_keep_exactly_n_of_every_m_by_saliency():
    w, u = RNG.standard_normal((5, 48)), RNG.uniform(0.5, 2.0, 48)
    sal = np.asarray(nm.saliency(jnp.asarray(w, jnp.float32), jnp.asarray(u, jnp.float32)))
    np.testing.assert_allclose(sal, w ** 2 / u ** 2, rtol=1e-5)
    for n, m in ((6, 8), (5, 8), (4, 8), (2, 4)):
        keep = np.asarray(nm.nm_keep(jnp.asarray(sal), m - n, m))
        np.testing.assert_array_equal(keep, nm_keep_ref(sal, m - n, m))
        assert np.all(keep.reshape(5, -1, m).sum(-1) == n)


def test_spbo_schedule():
    assert nm.spbo_schedule(6, 8, 2) == (1, 2)
    assert nm.spbo_schedule(4, 8, 4) == (1, 2, 3, 4)
    assert nm.spbo_schedule(4, 8, 1) == (4,)
    assert nm.spbo_schedule(8, 8, 1) == ()
    with pytest.raises(ValueError, match="SPBO steps"):
        nm.spbo_schedule(6, 8, 3)


def test_cfs_block_n_meets_the_target_exactly_within_bounds():
    imp = np.array([3.0, 1.0, 1.1, 1.2, 1.0, 2.5, 1.05])
    ns = nm.cfs_block_n(imp, 5, 4, 6)
    assert sum(ns) == 5 * len(imp) and min(ns) >= 4 and max(ns) <= 6
    assert ns[0] == 6 and ns[1] == 4            # most important keeps most, least important least
    assert nm.cfs_block_n(np.ones(4), 5, 4, 6) == [5] * 4
    assert nm.cfs_block_n(imp, 5, 5, 5) == [5] * len(imp)


@pytest.mark.parametrize("variant,kw", [("binarize", {}), ("nm_then_binarize", {}), ("pbs2p", {}),
                                        ("pbs2p", {"spbo_metric": "saliency"}), ("pbs2p", {"spbo_steps": 1})])
def test_compress_linear_matches_float64_gptq_reference(variant, kw):
    w, h = _layer(o=8, i=64)
    got = linear.compress_linear(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), variant=variant, n=5,
                                 m=8, block_size=32, **kw)
    keep, hat = compress_ref(w, h, variant=variant, n=5, m=8, bs=32, steps=kw.get("spbo_steps"),
                             metric=kw.get("spbo_metric", "error"))
    np.testing.assert_array_equal(np.asarray(got.keep_oi), keep)
    np.testing.assert_allclose(np.asarray(got.dense(32)), hat, atol=1e-4, rtol=1e-3)


def test_compress_linear_pads_a_ragged_last_block_and_zeroes_dead_inputs():
    w, h = _layer(o=4, i=72)
    h[5, :], h[:, 5] = 0.0, 0.0                  # input 5 never fires: dead
    got = linear.compress_linear(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), n=6, m=8, block_size=32)
    keep, hat = compress_ref(w, h, variant="pbs2p", n=6, m=8, bs=32, metric="error")
    assert got.alpha_ob.shape == (4, 3) and got.keep_oi.shape == (4, 72)
    np.testing.assert_array_equal(np.asarray(got.keep_oi), keep)
    np.testing.assert_allclose(np.asarray(got.dense(32)), hat, atol=1e-4, rtol=1e-3)
    assert not np.asarray(got.keep_oi)[:, 5].any()


def test_stepwise_error_metric_beats_one_shot_nm_then_binarize():
    """The paper's claim on a layer whose inputs have uneven scales: pruning chosen with the current
    binarization in view (SPBO, `error`) ends below the one-shot mask, and at 6:8 below binarization alone."""
    w, h = _layer(o=32, i=256, tokens=1000, seed=3)
    err = {}
    for name, kw in (("binarize", {"variant": "binarize"}), ("nm", {"variant": "nm_then_binarize"}),
                     ("pbs2p", {"variant": "pbs2p", "spbo_metric": "error"})):
        lin = linear.compress_linear(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), n=6, m=8, **kw)
        err[name] = float(linear.output_error(w, lin.dense(128), h))
    assert err["pbs2p"] < err["nm"] and err["pbs2p"] < err["binarize"]


def test_compress_linear_row_sharded_equals_one_device():
    w, h = _layer(o=16, i=64)
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(8), ("rows",))
    one = linear.compress_linear(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), block_size=32)
    ws = jax.device_put(jnp.asarray(w, jnp.float32), NamedSharding(mesh, P("rows", None)))
    many = linear.compress_linear(ws, jnp.asarray(h, jnp.float32), block_size=32)
    np.testing.assert_array_equal(np.asarray(many.keep_oi), np.asarray(one.keep_oi))
    np.testing.assert_allclose(np.asarray(many.dense(32)), np.asarray(one.dense(32)), atol=1e-6)


def test_pack_unpack_round_trip_is_exact():
    w, h = _layer(o=8, i=64)
    for variant in ("pbs2p", "binarize"):
        lin = linear.compress_linear(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), variant=variant,
                                     block_size=32)
        arrays = packed.pack(lin)
        assert ("mask" in arrays) == (variant != "binarize")
        back = packed.unpack(arrays, w.shape)
        np.testing.assert_array_equal(back.keep_oi, np.asarray(lin.keep_oi))
        np.testing.assert_array_equal(back.dense(32), np.asarray(lin.dense(32)))


# -- the whole model ---------------------------------------------------------------------------------

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                  intermediate_size=48)


def _compress(tmp_path, pcfg, name="p", **kw):
    weights = init_weights(CFG, key=jax.random.key(0))
    calib = np.random.default_rng(1).integers(0, 64, (8, 16)).astype(np.int32)
    store = compress.Pbs2pStore(tmp_path / name, compress.fingerprint(CFG, pcfg, calib, "tiny", jnp.float32))
    return weights, compress.compress_model(weights, CFG, calib, pcfg, store, batch_size=4, progress=False, **kw)


def test_model_export_loads_back_exactly_with_two_values_per_row_and_block(tmp_path):
    pcfg = compress.Pbs2pConfig(block_size=16)
    _, (weights, layers, ns) = _compress(tmp_path, pcfg)
    assert sum(ns) == 6 * CFG.num_layers and len(set(ns)) > 1          # CFS gave blocks their own N
    meta = {"variant": "pbs2p", "m": 8, "block_size": 16, "n_per_layer": ns}
    report = packed.export_binary(weights, CFG, layers, meta, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    chex.assert_trees_all_equal(weights, loaded.weights)
    for i, blk in enumerate(loaded.weights.blocks):
        w_oi = np.asarray(blk.mlp.down_fd).T
        keep = w_oi != 0
        assert np.all(keep.reshape(w_oi.shape[0], -1, 8).sum(-1) <= ns[i])
        for r in range(w_oi.shape[0]):
            for s in range(0, w_oi.shape[1], 16):
                assert len(np.unique(w_oi[r, s:s + 16][keep[r, s:s + 16]])) <= 2
    assert report["bits_per_weight"]["file"] < 16 and report["file_bytes"] < report["dense_file_bytes"]


def test_killed_run_resumes_after_its_last_block(tmp_path, monkeypatch):
    pcfg = compress.Pbs2pConfig(block_size=16)
    _, (whole, _, _) = _compress(tmp_path, pcfg, name="whole")
    save = compress.Pbs2pStore.save_block

    def dies_at_block_2(self, i, tree):
        if i == 2:
            raise KeyboardInterrupt
        save(self, i, tree)

    monkeypatch.setattr(compress.Pbs2pStore, "save_block", dies_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        _compress(tmp_path, pcfg, name="killed")
    monkeypatch.setattr(compress.Pbs2pStore, "save_block", save)
    _, (resumed, _, _) = _compress(tmp_path, pcfg, name="killed")
    chex.assert_trees_all_equal(whole, resumed)


def test_mesh_run_equals_one_device(tmp_path):
    pcfg = compress.Pbs2pConfig(block_size=16, cfs=False)
    _, (one, _, _) = _compress(tmp_path, pcfg, name="one")
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    _, (many, _, _) = _compress(tmp_path, pcfg, name="many", mesh=mesh)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
        np.testing.assert_array_equal(np.asarray(a) == 0, np.asarray(b) == 0)     # the same masks
        # α, μ are float16: another summation order of H may move one by an ulp (1.5e-5 at 0.02).
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


@pytest.mark.parametrize("override,message", [
    ("pbs2p.n=9", "pbs2p.n must lie in"),
    ("pbs2p.m=7", "pbs2p.block_size .* multiple of pbs2p.m"),
    ("pbs2p.variant=ternary", "pbs2p.variant 'ternary' is unknown"),
    ("pbs2p.spbo_steps=5", "pbs2p.spbo_steps"),
    ("pbs2p.cfs_low=7", "pbs2p.cfs_low / cfs_high")])
def test_bad_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(None, ["method=pbs2p", override])


def test_m_not_dividing_the_inputs_is_refused_before_any_work(tmp_path):
    pcfg = compress.Pbs2pConfig(n=3, m=5, block_size=15)    # 32 hidden inputs: no groups of 5
    with pytest.raises(ValueError, match="pbs2p.m .5. must divide"):
        _compress(tmp_path, pcfg)
    assert not (tmp_path / "p" / "block_000").exists()


def test_cli_prune_pbs2p_end_to_end(tiny_hf_dir, tmp_path):
    model_dir, corpus = tiny_hf_dir
    out = tmp_path / "run"
    config = pathlib.Path(__file__).parents[1] / "configs" / "smollm2-pbs2p.yaml"
    cmd = [sys.executable, "-m", "tyr_jax.cli", "prune", "--config", str(config), f"model={model_dir}", f"out={out}",
           f"calibration.corpus={corpus}", "calibration.num_sequences=4", "calibration.seq_len=32",
           "calibration.batch_size=2", f"eval.corpus={corpus}", f"eval.ood_corpus={corpus}", "eval.seq_len=32",
           "eval.max_tokens=256", "eval.tasks=[]", "pbs2p.block_size=8", "pbs2p.n=5"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pbs2p"]["n_per_layer"] and sum(summary["pbs2p"]["n_per_layer"]) == 5 * 2
    bits = summary["export"]["bits_per_weight"]
    assert 0 < bits["signs_and_scales"] < bits["file"] and np.isfinite(summary["ppl"]["pruned"])
    assert np.isfinite(summary["ppl_ood"]["pruned"])
    evaluated = subprocess.run([sys.executable, "-m", "tyr_jax.cli", "eval", "--model", str(out / "model"), "--text",
                                str(corpus), "--seq-len", "32", "--max-tokens", "256"], capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"perplexity {summary['ppl']['pruned']:.4f}" in evaluated.stdout


def test_dense_blocks_stay_exact_and_the_export_loads(tmp_path):
    pcfg = compress.Pbs2pConfig(block_size=16, dense_blocks=(0,))
    dense, (weights, layers, ns) = _compress(tmp_path, pcfg)
    assert ns[0] is None and sum(ns[1:]) == 6 * 2 and layers[0] is None
    chex.assert_trees_all_equal(dense.blocks[0], weights.blocks[0])
    meta = {"variant": "pbs2p", "m": 8, "block_size": 16, "n_per_layer": ns}
    packed.export_binary(weights, CFG, layers, meta, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    chex.assert_trees_all_equal(weights, loaded.weights)
    with pytest.raises(ValueError, match="pbs2p.dense_blocks"):
        _compress(tmp_path, compress.Pbs2pConfig(block_size=16, dense_blocks=(3,)), name="bad")


def test_compare_methods_takes_per_run_overrides(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "compare_methods", pathlib.Path(__file__).parents[1] / "scripts" / "compare_methods.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    cfg = str(pathlib.Path(__file__).parents[1] / "configs" / "smollm2-pbs2p.yaml")
    runs = compare.plan_runs([cfg, cfg + "+pbs2p.variant=binarize", cfg + "+pbs2p.n=5+pbs2p.cfs=false"], tmp_path,
                             ["eval.limit=10"])
    assert [r["name"] for r in runs] == ["smollm2-pbs2p-pbs2p", "smollm2-pbs2p-pbs2p-pbs2p.variant=binarize",
                                         "smollm2-pbs2p-pbs2p-pbs2p.n=5-pbs2p.cfs=false"]
    assert runs[2]["command"][-4:] == ["pbs2p.n=5", "pbs2p.cfs=false", "eval.limit=10", f"out={runs[2]['dir']}"]
    with pytest.raises(ValueError, match="pbs2p.n must lie"):
        compare.plan_runs([cfg + "+pbs2p.n=9"], tmp_path, [])


def test_a_corrupt_packed_file_is_refused_by_name(tmp_path):
    from tyr_jax.export import save_safetensors
    from tyr_jax.loading.hf import SafetensorsFile

    pcfg = compress.Pbs2pConfig(block_size=16, cfs=False)
    _, (weights, layers, ns) = _compress(tmp_path, pcfg)
    meta = {"variant": "pbs2p", "m": 8, "block_size": 16, "n_per_layer": ns}
    packed.export_binary(weights, CFG, layers, meta, tmp_path / "model")
    path = tmp_path / "model" / "model.safetensors"
    st = SafetensorsFile(path)
    tensors = {name: np.asarray(st.get(name)) for name in st.header}
    name = "model.layers.1.mlp.down_proj.weight_alpha"
    tensors[name] = tensors[name][:, :1]
    save_safetensors(tensors, path)
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj.weight: packed weight .* scales of shape"):
        load_model(tmp_path / "model")


def test_spbo_steps_are_capped_by_each_blocks_own_n():
    pcfg = compress.Pbs2pConfig(n=6, spbo_steps=2)       # CFS may give a block 7:8, one step from 8:8
    assert pcfg.linear_args(7)["spbo_steps"] == 1 and pcfg.linear_args(5)["spbo_steps"] == 2
    assert pcfg.linear_args(6)["n"] == 6 and compress.Pbs2pConfig(variant="binarize").linear_args(6)["n"] == 8
    w, h = _layer(o=4, i=64)
    lin = linear.compress_linear(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32),
                                 **pcfg.linear_args(7) | {"block_size": 32})
    assert np.all(np.asarray(lin.keep_oi).reshape(4, -1, 8).sum(-1) == 7)
