"""Results saved under a key: a file holds {"key", "value"} and is read back only under the same key, so
a re-run reuses what was computed with the same settings (and weights) and recomputes anything else.

Used by the run's evaluations (`DIR/dense_eval.json`, `DIR/pruned_eval.json`, saved part by part), by
`tyr-jax ablate` (each variant's result) and by `scripts/compare_methods.py` (one dense evaluation
shared by all runs).
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import jax
import numpy as np

from tyr_jax.distributed import is_primary


def weights_sha256(tree) -> str:
    """Digest of a pytree of host arrays (shapes, dtypes and bytes): the key of a saved evaluation."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = np.ascontiguousarray(leaf)
        digest.update(f"{a.shape}{a.dtype.str}".encode())
        digest.update(a.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def load_keyed(path: pathlib.Path, key: dict):
    """The value saved by `save_keyed(path, key, ...)`, or None when absent or saved under another key."""
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == json.loads(json.dumps(key)):  # compared as it reads back: tuples are lists
            return saved["value"]
    return None


def save_keyed(path: pathlib.Path, key: dict, value) -> None:
    """Writes {"key", "value"} atomically, on process 0 only."""
    if is_primary():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "value": value}, indent=1))
        tmp.replace(path)


def evaluation_finished(path: pathlib.Path) -> bool:
    """Whether the evaluation saved at `path` (by `pipeline`, part by part, so a file may hold only some)
    holds every part its key asks for: perplexity, the out-of-domain one, each task."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    value, asked = saved["value"], saved["key"]["eval"]
    return ("ppl" in value and (asked.get("ood_corpus") is None or "ppl_ood" in value)
            and set(asked["tasks"]) <= set(value.get("zeroshot", {})))
