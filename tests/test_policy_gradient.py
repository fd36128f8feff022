"""Policy-gradient masks (ALGORITHMS.md §2): what the estimator is unbiased for, the exact budget, the
Wanda-sp initialisation, whole-sublayer gates, learning, resume, the CLI and config errors."""

import dataclasses
import functools
import itertools
import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from tyr_jax.cli import main
from tyr_jax.data import sampler
from tyr_jax.loading import load_model
from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig
from tyr_jax.pipeline import place
from tyr_jax.pruning import SublayerStats, accumulate_stats
from tyr_jax.pruning import policy_gradient as pgm
from tyr_jax.pruning.baselines import wanda_sp_scores
from tyr_jax.runconfig import load_run_config
from tyr_jax.sharding import make_mesh, put_batch, stack_layers

CFG = ModelConfig(vocab_size=61, hidden_size=24, num_layers=2, num_heads=6, num_kv_heads=3, head_dim=4,
                  intermediate_size=40)
masked_losses = jax.jit(pgm.masked_losses, static_argnames="cfg")


@pytest.fixture(scope="module")
def weights():
    # Large weights, so that which units are kept changes the loss clearly.
    return llama.init_weights(CFG, key=jax.random.key(0), scale=0.2)


@pytest.mark.parametrize("k, baseline", [(2, 0.0), (2, 3.0), (4, 1.5)])
def test_estimator_is_unbiased_for_the_scaled_exact_gradient(k, baseline):
    # 4 units and an arbitrary loss table over all 16 masks; δ fixed (independent of the samples).
    s = np.array([0.2, 0.5, 0.7, 0.9])
    table = np.random.default_rng(0).normal(3.0, 1.0, 16)
    masks = np.array(list(itertools.product([0, 1], repeat=4)))[:, ::-1]  # row i: the bits of i
    prob_m = np.prod(np.where(masks == 1, s, 1 - s), axis=1)
    # ∂E[L]/∂s_i = E[L | m_i = 1] − E[L | m_i = 0] (E[L] is multilinear in s), by enumeration in float64.
    grad = np.array([np.sum(prob_m * table * np.where(masks[:, i] == 1, 1 / s[i], -1 / (1 - s[i]))) for i in range(4)])
    eps = 1e-7
    want = k / (k - 1) * s * (1 - s) / np.sqrt(s * (1 - s) + eps) * grad

    n = 100_000
    s32 = jnp.asarray(s, jnp.float32)

    def one_step(key):
        m_k = pgm.sample_masks(s32, k, key=key)
        index_k = (m_k * jnp.array([1, 2, 4, 8], jnp.float32)).sum(-1).astype(jnp.int32)
        losses_k = jnp.asarray(table, jnp.float32)[index_k]
        return pgm.score_function_estimate(losses_k, m_k, s32, jnp.float32(baseline), eps)

    g = np.asarray(jax.jit(jax.vmap(one_step))(jax.random.split(jax.random.key(1), n)), np.float64)
    stderr = g.std(axis=0) / np.sqrt(n)
    np.testing.assert_array_less(np.abs(g.mean(axis=0) - want), 4 * stderr)
    # The normalisation matters: the unscaled gradient is far off for the extreme units.
    assert abs(g.mean(axis=0)[3] - grad[3]) > 10 * stderr[3]


def test_projection_meets_the_budget_exactly_and_is_idempotent():
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(0.5, 0.6, (3, 50)), jnp.float32)
    gate = jnp.asarray(rng.uniform(0.3, 1.0, (3, 1)), jnp.float32)
    for weight, budget in ((jnp.ones((3, 1), jnp.float32), 60.0), (gate, 40.0), (jnp.ones((3, 1), jnp.float32), 149.0)):
        p = pgm.project_to_budget(s, weight, budget)
        assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
        assert float(jnp.sum(jnp.broadcast_to(weight, s.shape) * p)) == pytest.approx(budget, abs=1e-4)
        np.testing.assert_allclose(np.asarray(pgm.project_to_budget(p, weight, budget)), np.asarray(p), atol=1e-6)
    # More budget than units: everything is kept.
    assert float(pgm.project_to_budget(s, jnp.ones((3, 1), jnp.float32), 200.0).min()) == 1.0
    # Both pools at once; the gates are clipped only.
    probs = pgm.KeepProbs(s[:2, :3], s[:2], jnp.array([1.3, 0.5]), jnp.array([-0.2, 0.7]))
    out = pgm.project(probs, pgm.Budget(3, 30))
    assert float(jnp.sum(out.attn_lk * out.attn_gate_l[:, None])) == pytest.approx(3.0, abs=1e-5)
    assert float(jnp.sum(out.mlp_lf * out.mlp_gate_l[:, None])) == pytest.approx(30.0, abs=1e-4)
    np.testing.assert_array_equal(np.asarray(out.attn_gate_l), np.float32([1.0, 0.5]))
    np.testing.assert_array_equal(np.asarray(out.mlp_gate_l), np.float32([0.0, 0.7]))


def test_hard_masks_keep_exact_unit_counts_and_follow_the_gates():
    budget = pgm.keep_budget(CFG, 0.5)
    assert budget == pgm.Budget(3, 40)
    s = jax.random.uniform(jax.random.key(0), (2, 43))
    probs = pgm.KeepProbs(s[:, :3], s[:, 3:], jnp.array([0.0, 1.0]), jnp.array([1.0, 1.0]))
    masks = pgm.hard_masks(probs, budget)
    assert masks.kv_lk.sum() == 3 and masks.mlp_lf.sum() == 40
    assert masks.kv_lk[0].sum() == 0  # the closed attention gate drops the whole sublayer
    top = np.argsort(-np.asarray(s[:, 3:]).ravel(), kind="stable")[:40]
    np.testing.assert_array_equal(np.flatnonzero(masks.mlp_lf.ravel()), np.sort(top))


def test_wanda_sp_initialisation(weights):
    calib = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 16)).astype(np.int32)
    attn, mlp_m = pgm.wanda_sp_metric(weights, CFG, calib, batch_size=2)
    assert attn.shape == (2, 3) and mlp_m.shape == (2, 40)
    # Layer 0 against the Hessian statistics the supernet gathers (its diagonal is Σ x²).
    x = llama.embed(weights, jnp.asarray(calib))
    rope = llama.rope_tables(CFG, llama.default_positions(jnp.asarray(calib)))
    ctx = llama.attention_context(weights.blocks[0].attn, x, CFG, rope)
    stats = accumulate_stats(SublayerStats.zeros(24), ctx.reshape(-1, 24))
    want = wanda_sp_scores(weights.blocks[0].attn.o_kghd.reshape(24, 24), jnp.sqrt(jnp.diagonal(stats.hessian_ii)), 8)
    np.testing.assert_allclose(np.asarray(attn[0]), np.asarray(want), rtol=1e-4)
    pcfg = pgm.PolicyGradientConfig(init="wanda_sp")
    probs = pgm.initial_probs(pcfg, CFG, 0.5, (attn, mlp_m))
    # Order-preserving within a layer, mean = keep where nothing is clipped.
    for metric, s in ((attn, probs.attn_lk), (mlp_m, probs.mlp_lf)):
        for m_l, s_l in zip(np.asarray(metric), np.asarray(s)):
            assert (np.diff(s_l[np.argsort(m_l)]) >= 0).all()
    np.testing.assert_allclose(np.asarray(probs.attn_lk).mean(axis=1), 0.5, atol=1e-6)
    state = pgm.policy_gradient(pcfg, pgm.Budget(3, 40)).init(probs, key=jax.random.key(0))
    assert float(state.probs.mlp_lf.sum()) == pytest.approx(40.0, abs=1e-4)


def test_a_closed_sublayer_gate_masks_the_whole_sublayer(weights):
    probs = pgm.KeepProbs(jnp.ones((2, 3)), jnp.ones((2, 40)), jnp.array([0.0, 1.0]), jnp.array([1.0, 1.0]))
    masks = pgm.unit_masks(pgm.sample_masks(probs, 3, key=jax.random.key(0)))
    assert masks.kv_lk.shape == (3, 2, 3) and float(masks.kv_lk[:, 0].max()) == 0.0
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 9)), jnp.int32)
    losses = masked_losses(weights, tokens, masks, cfg=CFG)
    # The same as the model whose first attention sublayer is sliced away.
    small, small_cfg = llama.apply_masks(weights, CFG, jax.tree.map(lambda m: m[0], masks))
    assert small_cfg.kv_groups == (0, 3)
    logprobs = jax.jit(llama.token_logprobs, static_argnames="cfg")(small, tokens[:, :-1], tokens[:, 1:], cfg=small_cfg)
    np.testing.assert_allclose(np.asarray(losses), -float(logprobs.mean()), rtol=1e-5)


def test_a_short_run_lowers_the_loss_of_sampled_masks(weights):
    pcfg = pgm.PolicyGradientConfig(steps=30, samples=4, learning_rate=0.5, init="uniform")
    pg = pgm.policy_gradient(pcfg, pgm.keep_budget(CFG, 0.5))
    state = pg.init(pgm.initial_probs(pcfg, CFG, 0.5), key=jax.random.key(1))
    start = jax.tree.map(jnp.copy, state.probs)  # the step donates the state
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 17)), jnp.int32)
    step = pgm.compile_step(pg, CFG)
    for _ in range(pcfg.steps):
        state, _ = step(state, weights, tokens)
    assert int(state.step) == 30
    np.testing.assert_array_equal(np.asarray(state.probs.attn_gate_l), 1.0)  # gates off: they never move

    def expected_loss(probs):  # the same 512 uniform draws for both: a paired comparison
        masks = pgm.sample_masks(probs, 512, key=jax.random.key(7))
        return float(masked_losses(weights, tokens, pgm.unit_masks(masks), cfg=CFG).mean())

    assert expected_loss(state.probs) < expected_loss(start) - 0.03


def test_the_step_scans_one_block_whatever_the_depth(weights, tmp_path, monkeypatch):
    # learn_probs trains on the layers stacked (sharding.stack_layers): the compiled step is one block in a
    # scan, so its program does not grow with depth, and the losses are the per-layer model's.
    pcfg = pgm.PolicyGradientConfig(samples=3, init="uniform")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 17)), jnp.int32)

    def program_size(num_layers):
        cfg = dataclasses.replace(CFG, num_layers=num_layers)
        pg = pgm.policy_gradient(pcfg, pgm.keep_budget(cfg, 0.5))
        state = pg.init(pgm.initial_probs(pcfg, cfg, 0.5), key=jax.random.key(1))
        stacked = stack_layers(llama.init_weights(cfg, key=jax.random.key(0)))
        return len(jax.make_jaxpr(functools.partial(pgm.train_step, pg, cfg=cfg))(state, stacked, tokens).eqns)

    assert program_size(2) == program_size(8)
    probs = pgm.initial_probs(pcfg, CFG, 0.5)
    masks = pgm.unit_masks(pgm.sample_masks(probs, 3, key=jax.random.key(2)))
    np.testing.assert_allclose(masked_losses(stack_layers(weights), tokens, masks, cfg=CFG),
                               masked_losses(weights, tokens, masks, cfg=CFG), rtol=1e-6)
    trained_on = []

    def first_step_only(pg, cfg):
        def step(state, w, tokens):
            trained_on.append(w)
            raise KeyboardInterrupt
        return step

    monkeypatch.setattr(pgm, "compile_step", first_step_only)
    with pytest.raises(KeyboardInterrupt):
        _learn(weights, tmp_path, init="uniform")
    assert isinstance(trained_on[0].blocks, llama.Block)


def test_a_step_with_a_non_finite_loss_changes_nothing():
    pcfg = pgm.PolicyGradientConfig(steps=10, samples=2, init="uniform")
    pg = pgm.policy_gradient(pcfg, pgm.keep_budget(CFG, 0.5))
    state = pg.init(pgm.initial_probs(pcfg, CFG, 0.5), key=jax.random.key(0))
    masks = pg.sample(state.probs, key=jax.random.key(1))
    after = pg.update(state, masks, jnp.array([3.0, jnp.nan]))
    assert int(after.step) == 1
    chex.assert_trees_all_equal((after.probs, after.opt_state, after.baseline),
                                (state.probs, state.opt_state, state.baseline))
    moved = pg.update(state, masks, jnp.array([3.0, 2.0]))
    assert not np.array_equal(np.asarray(moved.probs.mlp_lf), np.asarray(state.probs.mlp_lf))


def _learn(weights, state_dir, mesh=None, **kwargs):
    pcfg = pgm.PolicyGradientConfig(**{"steps": 6, "samples": 2, "batch_size": 2, "seq_len": 8, "learning_rate": 0.3,
                                       "checkpoint_every": 2, **kwargs})
    stream = np.random.default_rng(3).integers(0, CFG.vocab_size, 500).astype(np.int32)
    calib = np.random.default_rng(4).integers(0, CFG.vocab_size, (8, 8)).astype(np.int32)
    return pgm.learn_probs(weights, CFG, stream, pcfg, 0.5, state_dir, calib_bt=calib, calib_batch_size=8,
                           mesh=mesh, progress=False)


@pytest.fixture(scope="module")
def learned_on_one_device(weights, tmp_path_factory):
    return _learn(weights, tmp_path_factory.mktemp("pg-one"), batch_size=8, init="wanda_sp")


@pytest.mark.parametrize("shape", [(8, 1), (4, 2), (2, 4)])
def test_learning_on_a_mesh_equals_one_device(weights, learned_on_one_device, tmp_path, shape):
    # Windows split over `data`, weights over `model` (the Wanda-sp statistics too); the same masks are
    # drawn everywhere, so the probabilities agree up to fp32 summation order, and a resume may switch mesh.
    mesh = make_mesh(*shape)
    assert put_batch(np.zeros((8, 9), np.int32), mesh).sharding.spec == P("data", None)
    probs, losses = _learn(place(weights, mesh), tmp_path / "mesh", mesh=mesh, batch_size=8, init="wanda_sp")
    want_probs, want_losses = learned_on_one_device
    chex.assert_trees_all_close(probs, want_probs, atol=1e-5)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)


def _killed_at_step_5(monkeypatch, run):
    """Runs `run()` with the training loop interrupted before step 5 (after the checkpoint of step 4)."""
    batches = pgm._batches

    def dies(stream, pcfg, key, steps):
        if 5 in steps:
            raise KeyboardInterrupt
        return batches(stream, pcfg, key, steps)

    monkeypatch.setattr(pgm, "_batches", dies)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(pgm, "_batches", batches)


def test_the_host_looks_every_log_every_steps_and_results_do_not_change(weights, tmp_path, monkeypatch):
    """Losses reach the host once per `log_every` steps (and at checkpoints), batches are drawn once per
    span; what is learned is the same bit for bit as looking at every step, and equals batches drawn
    one step at a time."""
    calls = {"log": [], "batches": 0}
    log, batches = pgm._log, pgm._batches

    def counted_log(bar, steps, *args):
        calls["log"].append((steps.start, steps.stop))
        return log(bar, steps, *args)

    def counted_batches(*args):
        calls["batches"] += 1
        return batches(*args)

    monkeypatch.setattr(pgm, "_log", counted_log)
    monkeypatch.setattr(pgm, "_batches", counted_batches)
    every_step = _learn(weights, tmp_path / "a", steps=7, checkpoint_every=4, log_every=1)
    assert len(calls["log"]) == 7
    calls["log"].clear()
    spans = _learn(weights, tmp_path / "b", steps=7, checkpoint_every=4, log_every=3)
    assert calls["log"] == [(0, 3), (3, 4), (4, 6), (6, 7)] and calls["batches"] == 7 + 4
    chex.assert_trees_all_equal(spans, every_step)
    key_data = jax.random.key_data(jax.random.key(42))
    stream = np.random.default_rng(3).integers(0, CFG.vocab_size, 500).astype(np.int32)
    pcfg = pgm.PolicyGradientConfig(batch_size=2, seq_len=8)
    drawn = batches(stream, pcfg, key_data, range(2, 5))
    for s, step in enumerate(range(2, 5)):
        one = sampler.sample_windows(stream, 2, 9, key=pgm.step_keys(key_data, step)[0])
        np.testing.assert_array_equal(drawn[s], one)


def test_a_run_killed_on_a_mesh_resumes_on_one_device(weights, learned_on_one_device, tmp_path, monkeypatch):
    mesh = make_mesh(2, 4)
    _killed_at_step_5(monkeypatch, lambda: _learn(place(weights, mesh), tmp_path, mesh=mesh, batch_size=8,
                                                  init="wanda_sp"))
    probs, losses = _learn(weights, tmp_path, batch_size=8, init="wanda_sp")
    chex.assert_trees_all_close(probs, learned_on_one_device[0], atol=1e-5)
    np.testing.assert_allclose(losses, learned_on_one_device[1], rtol=1e-5)


def test_resume_after_an_interruption_gives_the_identical_result(weights, tmp_path, monkeypatch):
    # With sublayer gates on: the most state to restore, and they must run and keep the budget too.
    gates = {"prune_sublayers": True, "sublayer_init": 0.6}
    probs, losses = _learn(weights, tmp_path / "a", **gates)
    assert float(jnp.abs(probs.attn_gate_l - 0.6).max()) > 0  # the gates learn
    masks = pgm.hard_masks(probs, pgm.Budget(3, 40))
    assert masks.kv_lk.sum() == 3 and masks.mlp_lf.sum() == 40
    _killed_at_step_5(monkeypatch, lambda: _learn(weights, tmp_path / "b", **gates))
    assert ocp.CheckpointManager((tmp_path / "b").absolute()).latest_step() == 4
    resumed, resumed_losses = _learn(weights, tmp_path / "b", **gates)
    chex.assert_trees_all_equal(probs, resumed)
    np.testing.assert_array_equal(losses, resumed_losses)
    # A finished run is found finished; other settings are refused, not mixed in.
    again, _ = _learn(weights, tmp_path / "b", **gates)
    np.testing.assert_array_equal(np.asarray(again.mlp_lf), np.asarray(probs.mlp_lf))
    with pytest.raises(ValueError, match=r"policy_gradient\.seed: stored 42, requested 1"):
        _learn(weights, tmp_path / "b", **gates, seed=1)


def test_prune_cli_with_policy_gradient(tiny_hf_dir, tmp_path):
    model_dir, corpus = tiny_hf_dir
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"""
model: {model_dir}
method: policy_gradient
calibration: {{corpus: {corpus}, num_sequences: 4, seq_len: 32, batch_size: 2}}
supernet: {{target_sparsity: 0.5}}
policy_gradient: {{steps: 4, samples: 2, batch_size: 2, seq_len: 16, learning_rate: 0.05, checkpoint_every: 2}}
eval: {{corpus: {corpus}, ood_corpus: null, seq_len: 32, batch_size: 2}}
""")
    out = tmp_path / "run"
    assert main(["prune", "--config", str(cfg_file), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"method", "model", "target_sparsity", "params", "ppl", "zeroshot", "per_layer",
                            "search_history", "export", "wall_time_s", "policy_gradient"}
    assert summary["method"] == "policy_gradient" and summary["search_history"] == []
    assert len(summary["policy_gradient"]["loss_curve"]) == 4
    # 50% of 2 layers × 3 KV groups is 3 groups; of 2 × 40 channels, 40: the budget is exact.
    assert sum(r["kv_groups_kept"] for r in summary["per_layer"]) == 3
    assert sum(r["mlp_channels_kept"] for r in summary["per_layer"]) == 40
    p = summary["params"]
    assert p["prunable_pruned"] == p["prunable_dense"] // 2
    assert not (out / "iteration_0").exists()  # no supernet
    exported = load_model(out / "model")
    assert exported.cfg.kv_groups == tuple(r["kv_groups_kept"] for r in summary["per_layer"])


@pytest.mark.parametrize("override, message", [
    ("policy_gradient.samples=1", "samples must be an integer >= 2"),
    ("policy_gradient.init=magnitude", "init must be one of wanda_sp, uniform"),
    ("policy_gradient.prune_sublayers=maybe", "policy_gradient.prune_sublayers: expected true or false, got 'maybe'"),
    ("policy_gradient.steps=0", "steps must be a positive integer"),
    ("policy_gradient.learning_rate=-1", "learning_rate must be positive"),
    ("policy_gradient.sublayer_init=0", "sublayer_init must be in"),
    ("policy_gradient.lr=0.1", "unknown config key.*policy_gradient.lr"),
])
def test_bad_config_values_give_clear_errors(override, message, capsys):
    with pytest.raises(ValueError, match=message):
        load_run_config(None, ["method=policy_gradient", override])
    smoke = str(pathlib.Path(__file__).parents[1] / "configs" / "smoke.yaml")
    assert main(["prune", "--config", smoke, "method=policy_gradient", override]) == 2
    assert "error" in capsys.readouterr().err
