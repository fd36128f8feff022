"""The evolutionary search: budget-exact mutations, batched candidate evaluation, KL fitness (over chunks
of tokens), resume."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tyr_jax import search
from tyr_jax import supernet as sn
from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig

CFG = ModelConfig(vocab_size=61, hidden_size=24, num_layers=3, num_heads=6, num_kv_heads=3, head_dim=4,
                  intermediate_size=40)
SCFG = search.SearchConfig(generations=3, offspring=6, stage_candidates=(4, 2), stage_tokens=(32, 64, 128),
                           top_k=16, pool_sequences=16, seq_len=16, token_batch=2, candidate_batch=3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    weights = llama.init_weights(CFG, key=jax.random.key(0), scale=0.2)
    calib = np.random.default_rng(1).integers(0, CFG.vocab_size, (8, 16)).astype(np.int32)
    scfg = sn.SupernetConfig(min_step_channels=4, mlp_round_size=4)
    plan = sn.LevelPlan.centred(CFG, scfg)
    store = sn.SupernetStore(tmp_path_factory.mktemp("s"), sn.fingerprint(CFG, scfg, plan, calib, "t", jnp.float32))
    sn.build_supernet(weights, CFG, calib, scfg, plan, store, batch_size=4, progress=False)
    bank = search.load_bank(store, CFG, 9, jnp.float32)
    pool_tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (16, 16)).astype(np.int32)
    pool = search.FitnessPool(weights, CFG, pool_tokens, SCFG, progress=False)
    return search.search_weights(weights), plan, store, bank, pool, weights


def test_mutations_keep_the_unit_budget_exactly():
    # SmolLM2-like clipped attention levels (3 KV groups) next to a regular MLP grid.
    plan = sn.LevelPlan(attn=(sn.level_removals(3, 0.5, 0.125, 9, 1),) * 5,
                        mlp=(sn.level_removals(64, 0.5, 0.125, 9, 4),) * 5)
    parent = np.full((2, 5), 4, np.int32)
    rng = np.random.default_rng(0)
    kids = search.mutate(parent, plan, rng, 50, 4)
    assert len({k.tobytes() for k in kids}) == len(kids) and not any((k == parent).all() for k in kids)
    assert kids.min() >= 0 and kids.max() <= 8
    for k in kids:
        assert search.unit_counts(plan, *k) == search.unit_counts(plan, *parent)


def test_mutations_keep_the_budget_with_centres_of_every_kind():
    # A later iteration centres every sublayer elsewhere: at 0% and 100% (clipped levels on one side) and
    # near them (partial steps), so some shifts must be refused and the rest still keep the budget.
    centres = [0.0, 0.03, 0.5, 0.97, 1.0, 0.5]
    plan = sn.LevelPlan(attn=tuple(sn.level_removals(8, c, 0.0625, 9, 1) for c in centres),
                        mlp=tuple(sn.level_removals(1000, c, 0.0625, 9, 32) for c in centres))
    parent = np.full((2, 6), 4, np.int32)
    kids = search.mutate(parent, plan, np.random.default_rng(1), 128, 4)
    assert len(kids) == 128 and len({k.tobytes() for k in kids}) == 128
    for k in kids:
        assert search.unit_counts(plan, *k) == search.unit_counts(plan, *parent)
    with pytest.raises(ValueError, match="only one"):
        search.mutate(parent[:, :1], sn.LevelPlan(plan.attn[:1], plan.mlp[:1]), np.random.default_rng(1), 4, 4)


@pytest.mark.parametrize("iteration", [0, 1, 2])
def test_the_best_of_an_iteration_is_the_centre_of_the_next(iteration):
    # Coarse-to-fine (ALGORITHMS.md §1.4): the next supernet is centred exactly on the chosen copies, so
    # the next search starts from the previous best with the same unit budget.
    cfg = ModelConfig(vocab_size=61, hidden_size=24, num_layers=6, num_heads=16, num_kv_heads=8, head_dim=4,
                      intermediate_size=14336)
    scfg = sn.SupernetConfig(target_sparsity=0.5)
    plan = sn.LevelPlan.centred(cfg, scfg)
    levels = np.random.default_rng(iteration).integers(0, 9, (2, 6)).astype(np.int32)
    for t in range(iteration + 1):
        finer = sn.SupernetConfig(target_sparsity=0.5, step=search.step_for_iteration(scfg.step, t + 1))
        nxt = sn.LevelPlan.centred(cfg, finer, *search.removal_fractions(plan, levels, cfg))
        assert [r[4] for r in nxt.attn] == [plan.attn[i][e] for i, e in enumerate(levels[0])]
        assert [r[4] for r in nxt.mlp] == [plan.mlp[i][e] for i, e in enumerate(levels[1])]
        plan, levels = nxt, np.random.default_rng(t).integers(0, 9, (2, 6)).astype(np.int32)


def test_candidate_logits_equal_the_assembled_model(setup):
    weights, plan, store, bank, _, dense = setup
    levels = np.array([[0, 5, 8], [3, 4, 6]], np.int32)
    small, small_cfg = sn.assemble(dense, CFG, store, list(levels[0]), list(levels[1]))
    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 10)).astype(np.int32)
    got = search.candidate_logits(weights, bank, jnp.asarray(levels), tokens, CFG)
    np.testing.assert_allclose(np.asarray(got), np.asarray(llama.forward(small, tokens, small_cfg)), atol=1e-5)


def test_topk_kl_matches_numpy_and_vanishes_for_the_dense_model(setup):
    weights = setup[-1]   # the dense model
    tokens = np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 10)).astype(np.int32)
    idx, logp = search.dense_topk(weights, tokens, CFG, 16)
    dense = llama.forward(weights, tokens, CFG)
    assert float(search.topk_kl(dense, idx, logp).sum()) == pytest.approx(0.0, abs=1e-5)
    other = np.asarray(dense) + np.random.default_rng(5).normal(size=dense.shape)
    pick = np.take_along_axis(other[:, :-1], np.asarray(idx), -1)
    logq = pick - np.log(np.exp(pick - pick.max(-1, keepdims=True)).sum(-1, keepdims=True)) - pick.max(-1, keepdims=True)
    p = np.exp(np.asarray(logp, np.float64))
    want = np.sum(p * (np.asarray(logp) - logq))
    assert float(search.topk_kl(jnp.asarray(other, jnp.float32), idx, logp).sum()) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("chunk", [1, 4, 27, search.LOGIT_CHUNK])
def test_fitness_over_token_chunks_equals_whole_logits(setup, chunk):
    # 3 windows of 10 tokens score 27 positions: chunks of 1, of 4 (6 chunks and 3 left over), one chunk, and
    # the default (larger than the input). The same top-k and KL as from the whole [B, T, V] logits.
    weights = setup[-1]   # the dense model
    tokens = np.random.default_rng(6).integers(0, CFG.vocab_size, (3, 10)).astype(np.int32)
    dense = llama.forward(weights, tokens, CFG)
    values, want_idx = jax.lax.top_k(dense[:, :-1], 16)
    idx, logp = search.dense_topk(weights, tokens, CFG, 16, chunk=chunk)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))
    np.testing.assert_allclose(np.asarray(logp), np.asarray(jax.nn.log_softmax(values, axis=-1)), rtol=1e-6, atol=1e-6)
    other = dataclasses.replace(weights, final_norm_d=weights.final_norm_d * 1.5)   # a different model
    x = llama.hidden_states(other, tokens, CFG)
    got = search.stream_topk_kl(other, x, idx, logp, CFG, chunk=chunk)
    want = search.topk_kl(llama.unembed(other, x, CFG), idx, logp)
    assert got.shape == (3,) and float(want.min()) > 0.01
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_fitness_holds_a_chunk_of_logits_not_all_of_them():
    # XLA's buffers for the KL of 4 × 64 positions over 4,096 words: all logits at once are 4 MiB of fp32;
    # in chunks of 16 tokens the whole program needs less than a quarter of that.
    cfg = ModelConfig(vocab_size=4096, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                      intermediate_size=16)
    weights = jax.eval_shape(lambda: llama.init_weights(cfg, key=jax.random.key(0)))
    x = jax.ShapeDtypeStruct((4, 65, 16), jnp.float32)
    idx, logp = jax.ShapeDtypeStruct((4, 64, 8), jnp.int32), jax.ShapeDtypeStruct((4, 64, 8), jnp.float32)
    logits_bytes = 4 * 64 * 4096 * 4

    def temp_bytes(chunk):
        fn = jax.jit(functools.partial(search.stream_topk_kl, cfg=cfg, chunk=chunk))
        return fn.lower(weights, x, idx, logp).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(16) < logits_bytes / 4
    assert temp_bytes(256) >= logits_bytes          # one chunk of everything: the whole logits


def test_logit_chunk_is_a_setting_that_changes_only_the_summation_order(setup):
    weights, plan, _, bank, pool, dense = setup
    assert SCFG.logit_chunk == search.LOGIT_CHUNK == search.SearchConfig().logit_chunk
    with pytest.raises(ValueError, match="logit_chunk must be a positive"):
        dataclasses.replace(SCFG, logit_chunk=0)
    parent = np.full((2, 3), 4, np.int32)
    kids = search.mutate(parent, plan, np.random.default_rng(3), 6, 4)
    rows = np.arange(4)
    small = dataclasses.replace(SCFG, logit_chunk=5)      # 4 windows × 15 positions: 12 chunks per call
    parent_fit, fit = search.evaluate(weights, bank, CFG, SCFG, pool, parent, kids, rows)
    parent_small, fit_small = search.evaluate(weights, bank, CFG, small, pool, parent, kids, rows)
    np.testing.assert_allclose(fit_small, fit, rtol=1e-6)
    assert parent_small == pytest.approx(parent_fit, rel=1e-6)
    pool_small = search.FitnessPool(dense, CFG, pool.tokens, small, progress=False)
    np.testing.assert_array_equal(np.asarray(pool_small.idx), np.asarray(pool.idx))
    np.testing.assert_allclose(np.asarray(pool_small.logp), np.asarray(pool.logp), rtol=1e-6, atol=1e-6)
    # A resumed search may use another chunk size.
    assert search.search_fingerprint(small, plan, pool, 0) == search.search_fingerprint(SCFG, plan, pool, 0)


def test_search_is_deterministic_budget_exact_and_resumes(setup, tmp_path, monkeypatch):
    weights, plan, _, bank, pool, _ = setup
    best, hist = search.run_search(weights, CFG, plan, bank, pool, SCFG, tmp_path / "a", progress=False)
    assert len(hist) == 3 and search.unit_counts(plan, *best) == search.unit_counts(plan, *np.full((2, 3), 4))
    again, hist2 = search.run_search(weights, CFG, plan, bank, pool, SCFG, tmp_path / "b", progress=False)
    np.testing.assert_array_equal(best, again)
    assert hist == hist2
    # Killed after the second generation, then run again: the same result.
    step = search.generation_step
    calls = []

    def dies(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(search, "generation_step", dies)
    with pytest.raises(KeyboardInterrupt):
        search.run_search(weights, CFG, plan, bank, pool, SCFG, tmp_path / "c", progress=False)
    monkeypatch.setattr(search, "generation_step", step)
    assert ocp.CheckpointManager((tmp_path / "c").absolute()).latest_step() == 2
    resumed, hist3 = search.run_search(weights, CFG, plan, bank, pool, SCFG, tmp_path / "c", progress=False)
    np.testing.assert_array_equal(best, resumed)
    assert hist3 == hist
    # Other settings are refused, not resumed; more generations continue the same search.
    refused = r"holds a search run with other settings \(search\.seed: stored 0, requested 1\)"
    with pytest.raises(ValueError, match=refused):
        search.run_search(weights, CFG, plan, bank, pool, dataclasses.replace(SCFG, seed=1), tmp_path / "c",
                          progress=False)
    with pytest.raises(ValueError, match="more than search.generations"):
        search.run_search(weights, CFG, plan, bank, pool, dataclasses.replace(SCFG, generations=2), tmp_path / "c",
                          progress=False)
    _, hist4 = search.run_search(weights, CFG, plan, bank, pool, dataclasses.replace(SCFG, generations=4),
                                 tmp_path / "c", progress=False)
    assert hist4[:3] == hist and len(hist4) == 4


def test_a_search_call_is_one_compiled_layer_whatever_the_depth():
    # The candidates' forward scans the stacked layers: a model 4× deeper lowers to the same program (the
    # same matmuls and conditionals), only the scan's trip count and the stacked shapes grow.
    def program(num_layers):
        cfg = dataclasses.replace(CFG, num_layers=num_layers)
        weights = jax.eval_shape(search.search_weights, llama.abstract_weights(cfg, jnp.float32))
        s = jax.ShapeDtypeStruct
        args = (weights, search.abstract_bank(cfg, 9, jnp.float32), s((2, num_layers), jnp.int32),
                s((4, 2, num_layers), jnp.int32), s((2, 16), jnp.int32), s((16, 15, 16), jnp.int32),
                s((16, 15, 16), jnp.float32), s((2,), jnp.int32))
        text = search.candidates_kl.lower(*args, cfg, 2).as_text()
        return {op: text.count(op) for op in ("stablehlo.dot_general", "stablehlo.case", "stablehlo.while")}

    shallow = program(2)
    assert shallow["stablehlo.dot_general"] > 0 and shallow["stablehlo.case"] > 0
    assert program(8) == shallow


def test_a_search_call_reads_only_the_copies_it_picks():
    # Each sublayer indexes its chosen copy from the whole stacked bank. Scanning the bank instead handed
    # the loop body a layer's E copies, which XLA materialised before the conditional that skips unchanged
    # sublayers (E × o_proj and down_proj per layer and call: 11% of a generation on 8B shapes).
    weights = jax.eval_shape(search.search_weights, llama.abstract_weights(CFG, jnp.float32))
    s = jax.ShapeDtypeStruct
    args = (weights, search.abstract_bank(CFG, 9, jnp.float32), s((2, 3), jnp.int32), s((4, 2, 3), jnp.int32),
            s((2, 16), jnp.int32), s((16, 15, 16), jnp.int32), s((16, 15, 16), jnp.float32), s((2,), jnp.int32))
    compiled = search.candidates_kl.lower(*args, CFG, 2).compile().as_text()
    layer_copies = [f"= f32[9,{n},{CFG.hidden_size}]" for n in (CFG.intermediate_size, CFG.num_heads * CFG.head_dim)]
    made = [line for line in compiled.splitlines() if any(shape in line for shape in layer_copies)
            and any(op in line for op in (" fusion(", " copy(", " dynamic-slice("))]
    assert not made, made


def test_the_search_refuses_unstacked_weights(setup):
    weights, plan, _, bank, pool, dense = setup
    parent = np.full((2, 3), 4, np.int32)
    with pytest.raises(ValueError, match="search_weights"):
        search.evaluate(dense, bank, CFG, SCFG, pool, parent, parent[None], np.arange(2))


def test_first_change_orders_sublayers_attention_before_mlp():
    parent = np.full((2, 3), 4)
    kids = np.stack([parent] * 4)
    kids[0, 1, 0] = 3                  # MLP 0: sublayer 1
    kids[1, 0, 2], kids[1, 1, 1] = 5, 5  # attention 2 and MLP 1: sublayer 3
    kids[2, 0, 0] = 3                  # attention 0: sublayer 0
    np.testing.assert_array_equal(search.first_change(kids, parent), [1, 3, 0, 6])
    np.testing.assert_array_equal(search.first_change(jnp.asarray(kids), jnp.asarray(parent)), [1, 3, 0, 6])


def _alone(weights, bank, pool, levels, rows):
    """Mean top-k KL of one level choice run on its own from the embedding."""
    logits = search.candidate_logits(weights, bank, jnp.asarray(levels), pool.tokens[rows], CFG)
    return float(search.topk_kl(logits, pool.idx[rows], pool.logp[rows]).sum()) / (len(rows) * (SCFG.seq_len - 1))


@pytest.mark.parametrize("num, windows", [(6, 5), (6, 3), (6, 6), (1, 4)],
                         ids=["one group", "pairs", "lone", "one candidate"])
def test_offspring_share_the_parents_prefix_and_score_as_if_run_alone(setup, num, windows):
    # Many per compiled call, each group from its first changed sublayer on (calls of 6 candidates × 1
    # window, 2 × 3, 1 × 6, or one candidate × 2): the same fitness as running every candidate alone from
    # the embedding, whichever parent the prefix is taken from.
    weights, plan, _, bank, pool, _ = setup
    parent = np.full((2, 3), 4, np.int32)
    kids = search.mutate(parent, plan, np.random.default_rng(0), 6, 4)[:num]
    assert search.call_layout(SCFG, num, windows, 1).group == {6: {5: 6, 3: 2, 6: 1}, 1: {4: 1}}[num][windows]
    assert num == 1 or len(set(search.first_change(kids, parent).tolist())) > 1
    rows = np.arange(windows)
    alone = [_alone(weights, bank, pool, k, rows) for k in kids]
    for reference in (parent, kids[-1], np.ones_like(parent)):
        parent_fit, fit = search.evaluate(weights, bank, CFG, SCFG, pool, reference, kids, rows)
        np.testing.assert_allclose(fit, alone, rtol=1e-5)
        assert parent_fit == pytest.approx(_alone(weights, bank, pool, reference, rows), rel=1e-5)
    # Level 0 of every sublayer is the dense weight itself (the refit goes towards W₀): KL 0 up to rounding,
    # so it is compared in absolute terms.
    dense_fit, fit = search.evaluate(weights, bank, CFG, SCFG, pool, np.zeros_like(parent), kids, rows)
    np.testing.assert_allclose(fit, alone, rtol=1e-5)
    assert abs(dense_fit) < 1e-6


def test_fitness_pool_refuses_windows_or_top_k_that_do_not_fit(setup):
    weights = setup[-1]
    with pytest.raises(ValueError, match="search.seq_len = 16"):
        search.FitnessPool(weights, CFG, np.zeros((16, 8), np.int32), SCFG, progress=False)
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        search.FitnessPool(weights, CFG, np.zeros((16, 16), np.int32), dataclasses.replace(SCFG, top_k=100),
                           progress=False)


def test_search_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="multiple of seq_len = 16"):
        dataclasses.replace(SCFG, stage_tokens=(24, 64, 128))
    with pytest.raises(ValueError, match="smaller than the last stage"):
        dataclasses.replace(SCFG, pool_sequences=4)
    # Stages need not fill whole calls: 3 windows with calls of up to 6 (candidate, window) pairs.
    assert search.call_layout(SCFG, 6, 3, 1) == search.CallLayout("tokens", 3, 2, 6)
    assert search.call_layout(SCFG, 5, 3, 2) == search.CallLayout("candidates", 3, 2, 8)   # 2 groups of 2 each
