"""Corpora (Wikipedia split, news, user files, disk cache) and the token samplers."""

import importlib.util
import re

import jax
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tyr_jax import data
from tyr_jax.data import corpora

# Pre-tokenizer regex of Qwen2 (Llama-3 differs only in \p{N}{1,3}): punctuation takes the newlines after it.
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def wiki_cache(tmp_path_factory):
    """A private cache directory, filled by one cold parse that the whole module shares."""
    with pytest.MonkeyPatch.context() as mp:
        cache_home = tmp_path_factory.mktemp("xdg_cache")
        mp.setenv("XDG_CACHE_HOME", str(cache_home))
        articles = data.wiki_articles()
        yield cache_home / "tyr_jax", articles


@pytest.fixture
def articles(wiki_cache):
    return wiki_cache[1]


def _cache_files(cache_dir):
    return sorted(p for p in cache_dir.iterdir())


# --------------------------------------------------------------------------------------------
# Wikipedia


def test_wiki_articles_have_plausible_size(articles):
    titles = [t for t, _ in articles]
    assert len(titles) == len(set(titles)) == 105
    n_chars = sum(len(text) for _, text in articles)
    n_words = sum(len(text.split()) for _, text in articles)
    assert 2_900_000 < n_chars < 3_200_000
    assert 450_000 < n_words < 500_000
    assert min(len(text) for _, text in articles) >= corpora.MIN_ARTICLE_CHARS
    assert "Anarchism" in titles and "Albert Einstein" in titles


@pytest.mark.parametrize("leftover", ["'''", "''", "[[", "]]", "{{", "}}", "==", "alt=", "|thumb", "\xa0",
                                      "\t", "  ", "\n\n\n", " ,", "()"])
def test_wiki_text_has_no_markup_leftovers(articles, leftover):
    hits = [title for title, text in articles if leftover in text]
    assert not hits, f"{leftover!r} left in {hits[:5]}"


def test_wiki_text_is_clean_prose(articles):
    text = dict(articles)["Autism"]
    assert text.startswith("Autism is a neurodevelopmental disorder characterized by impaired social")
    assert "\n\nCharacteristics\n\n" in text  # headings are their own paragraph
    for title, text in articles:
        assert text == text.strip()
        assert not re.search(r"(?<!\w)\d+(?:x\d+)?px", text), title
        assert not re.search(r"^[*#:;]", text, re.M), title
        assert not text.lower().startswith("#redirect")


def test_wiki_split_is_fixed_disjoint_and_by_rule(articles):
    calib, evaluation = data.wiki_split()
    assert data.wiki_split() == (calib, evaluation)
    calib_titles = {t for t, _ in calib}
    eval_titles = {t for t, _ in evaluation}
    assert not calib_titles & eval_titles
    assert calib_titles | eval_titles == {t for t, _ in articles}
    assert (len(calib), len(evaluation)) == (79, 26)
    # The documented rule: every 4th article in title order is evaluation.
    ordered = sorted(t for t, _ in articles)
    assert [t for i, t in enumerate(ordered) if i % 4 == 3] == [t for t, _ in evaluation]
    eval_chars = sum(len(x) for _, x in evaluation)
    assert 0.2 < eval_chars / sum(len(x) for _, x in articles) < 0.3


def test_load_text_builtins(articles):
    calib, evaluation = data.wiki_split()
    assert data.load_text("wiki-calib") == "\n\n".join(x for _, x in calib)
    assert data.load_text("wiki-eval") == "\n\n".join(x for _, x in evaluation)
    news = data.load_text("news")
    documents = news.split("\n\n")
    assert len(documents) == 300
    assert 55_000 < len(news.split()) < 65_000
    assert documents[0].startswith("Hundreds of people have been forced to vacate their homes")


# --------------------------------------------------------------------------------------------
# Disk cache


def test_second_call_reads_the_cache(wiki_cache, monkeypatch):
    cache_dir, articles = wiki_cache
    [cache_file] = _cache_files(cache_dir)  # no temporary files left behind
    assert cache_file.name.startswith("wiki-") and cache_file.suffix == ".json"

    def no_parse(_):
        raise AssertionError("parsed again although the cache is valid")

    monkeypatch.setattr(corpora, "_parse_wiki", no_parse)
    assert data.wiki_articles() == articles


def _truncate(b):
    return b[: len(b) // 2]


def _flip_payload_byte(b):
    i = len(b) - 1000
    return b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1:]


def _other_version(b):
    v = corpora._CACHE_VERSION
    return b.replace(f'"version": {v},'.encode(), f'"version": {v - 1},'.encode(), 1)


@pytest.mark.parametrize("corrupt", [_truncate, _flip_payload_byte, _other_version, lambda b: b"",
                                     lambda b: b"not json\n[]"])
def test_corrupt_or_stale_cache_is_rebuilt(wiki_cache, tmp_path, monkeypatch, corrupt):
    cache_dir, articles = wiki_cache
    [good] = _cache_files(cache_dir)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "tyr_jax").mkdir()
    bad = tmp_path / "tyr_jax" / good.name
    bad.write_bytes(corrupt(good.read_bytes()))

    calls = []
    monkeypatch.setattr(corpora, "_parse_wiki", lambda source: calls.append(source) or list(articles))
    assert data.wiki_articles() == articles
    assert len(calls) == 1
    assert bad.read_bytes() == good.read_bytes()  # rewritten in full


def test_failed_cache_write_leaves_no_file(wiki_cache, tmp_path, monkeypatch):
    _, articles = wiki_cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(corpora, "_parse_wiki", lambda source: list(articles))

    def killed(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(corpora.os, "replace", killed)
    assert data.wiki_articles() == articles  # the text is still returned
    assert list((tmp_path / "tyr_jax").iterdir()) == []


def test_missing_gensim_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gensim" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"pip install gensim==4\.4\.0"):
        data.load_text("news")


# --------------------------------------------------------------------------------------------
# User files


def test_load_text_user_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes("\ufeffFirst line – naïve\r\nsecond line\n".encode("utf-8"))
    assert data.load_text(str(path)) == "First line – naïve\nsecond line\n"


def test_load_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="wiki-calib, wiki-eval, news"):
        data.load_text("wikitext-2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_text(str(tmp_path / "missing.txt"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"not valid UTF-8.*iconv"):
        data.load_text(str(latin1))
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    with pytest.raises(ValueError, match="no text"):
        data.load_text(str(empty))


# --------------------------------------------------------------------------------------------
# Sampler


def test_sample_windows_shape_bounds_and_contiguity():
    tokens = np.arange(1000, dtype=np.int32)
    batch = data.sample_windows(tokens, 64, 100, key=jax.random.key(0))
    assert batch.shape == (64, 100) and batch.dtype == np.int32
    starts = batch[:, 0]
    assert starts.min() >= 0 and starts.max() <= 1000 - 100 - 1
    np.testing.assert_array_equal(batch, starts[:, None] + np.arange(100))
    assert len(np.unique(starts)) > 32  # offsets are spread, not one repeated window


def test_sample_windows_is_a_function_of_the_key():
    tokens = np.random.default_rng(0).integers(0, 50_000, size=5000).astype(np.int32)
    a = data.sample_windows(tokens, 64, 128, key=jax.random.key(1))
    b = data.sample_windows(tokens, 64, 128, key=jax.random.key(1))
    c = data.sample_windows(tokens, 64, 128, key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Raw uint32 keys work too.
    np.testing.assert_array_equal(data.sample_windows(tokens, 64, 128, key=jax.random.PRNGKey(3)),
                                  data.sample_windows(tokens, 64, 128, key=jax.random.PRNGKey(3)))


def test_sample_windows_shortest_text_has_one_window():
    batch = data.sample_windows(np.arange(11), 64, 10, key=jax.random.key(0))
    np.testing.assert_array_equal(batch, np.tile(np.arange(10), (64, 1)))


def test_sample_windows_errors():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="10 tokens, fewer than seq_len \\+ 1 = 11"):
        data.sample_windows(np.arange(10), 1, 10, key=key)
    with pytest.raises(ValueError, match="num_sequences"):
        data.sample_windows(np.arange(100), 0, 10, key=key)
    with pytest.raises(ValueError, match="seq_len"):
        data.sample_windows(np.arange(100), 1, 0, key=key)
    with pytest.raises(ValueError, match="1-D"):
        data.sample_windows(np.zeros((4, 100), np.int32), 1, 10, key=key)
    with pytest.raises(TypeError, match="integers"):
        data.sample_windows(np.linspace(0, 1, 100), 1, 10, key=key)


def test_token_windows_arithmetic():
    tokens = np.arange(1000)
    windows = data.token_windows(tokens, 128)
    assert windows.shape == (7, 128) and windows.dtype == np.int32
    np.testing.assert_array_equal(windows, np.arange(7 * 128).reshape(7, 128))
    assert data.token_windows(tokens, 128, max_tokens=300).shape == (2, 128)
    assert data.token_windows(tokens, 100, max_tokens=5000).shape == (10, 100)
    assert data.token_windows(tokens, 1000).shape == (1, 1000)


def test_token_windows_errors():
    with pytest.raises(ValueError, match="the text has 100 tokens"):
        data.token_windows(np.arange(100), 128)
    with pytest.raises(ValueError, match=r"has 50 tokens \(after max_tokens=50\)"):
        data.token_windows(np.arange(1000), 128, max_tokens=50)
    with pytest.raises(ValueError, match="max_tokens"):
        data.token_windows(np.arange(1000), 128, max_tokens=0)
    with pytest.raises(ValueError, match="seq_len"):
        data.token_windows(np.arange(1000), 0)


# --------------------------------------------------------------------------------------------
# Tokenization


def _byte_level_bpe(texts, qwen_regex=False):
    """A tiny trained byte-level BPE: GPT-2/SmolLM2 pre-tokenizer, or Qwen2's regex + ByteLevel."""
    tok = Tokenizer(models.BPE())
    if qwen_regex:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


@pytest.fixture(scope="module")
def eval_text(wiki_cache):
    return data.load_text("wiki-eval")[:100_000]


def test_tokenize_matches_whole_text_encoding_without_specials(eval_text):
    tok = _byte_level_bpe([eval_text])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    ids = data.tokenize(tok, eval_text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    np.testing.assert_array_equal(ids, tok.encode(eval_text, add_special_tokens=False).ids)
    assert 0 not in ids  # no BOS
    assert tok.decode(ids.tolist()) == eval_text
    assert data.tokenize(tok, "").shape == (0,)


def _encode_chunks(tok, chunks):
    return [i for enc in tok.encode_batch(chunks, add_special_tokens=False) for i in enc.ids]


def test_paragraph_chunked_encoding_is_not_exact(eval_text):
    """Why `tokenize` encodes the whole text: no paragraph split is exact for both regex families.

    GPT-2's regex splits "\\n\\nX" into "\\n", "\\n", "X" (so a chunk ending in "\\n\\n" differs once
    "ĊĊ" is a merge); Qwen2's glues ".\\n\\n" into one pre-token (so a chunk starting with "\\n\\n"
    differs).
    """
    before = re.split(r"(?=\n\n)", eval_text)  # chunks start with the paragraph break
    after = re.split(r"(?<=\n\n)", eval_text)  # chunks end with it
    assert len(before) > 100

    gpt2 = _byte_level_bpe([eval_text, eval_text.replace("\n\n", "\n\n\n")])
    assert gpt2.token_to_id("ĊĊ") is not None
    whole = gpt2.encode(eval_text, add_special_tokens=False).ids
    assert _encode_chunks(gpt2, before) == whole
    assert _encode_chunks(gpt2, after) != whole

    qwen = _byte_level_bpe([eval_text], qwen_regex=True)
    whole = qwen.encode(eval_text, add_special_tokens=False).ids
    assert _encode_chunks(qwen, after) == whole
    assert _encode_chunks(qwen, before) != whole
    np.testing.assert_array_equal(data.tokenize(qwen, eval_text), whole)
