"""Results saved under a key (`tyr_jax.results`): read back only under the same key; weights digests."""

import numpy as np

from tyr_jax.results import evaluation_finished, load_keyed, save_keyed, weights_sha256


def test_weights_digest_tells_apart_values_shapes_and_dtypes():
    a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    digest = weights_sha256(a)
    assert weights_sha256({"w": a["w"].copy()}) == digest
    assert weights_sha256({"w": a["w"] + 1}) != digest
    assert weights_sha256({"w": a["w"].reshape(3, 2)}) != digest
    assert weights_sha256({"w": a["w"].view(np.int32)}) != digest


def test_a_saved_value_reads_back_under_its_own_key_only(tmp_path):
    path, key = tmp_path / "r.json", {"eval": {"tasks": ("piqa", "boolq")}, "seed": 1}
    assert load_keyed(path, key) is None
    save_keyed(path, key, {"ppl": 3.0})
    assert load_keyed(path, key) == {"ppl": 3.0}          # tuples in the key read back as lists
    assert load_keyed(path, key | {"seed": 2}) is None
    assert not path.with_suffix(".tmp").exists()
    assert not evaluation_finished(path)                   # the key asks for tasks the value lacks
    save_keyed(path, key, {"ppl": 3.0, "zeroshot": {"piqa": 0.5, "boolq": 0.6}})
    assert evaluation_finished(path)
