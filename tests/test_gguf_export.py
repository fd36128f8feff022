"""GGUF export: stock llama.cpp (built by scripts/build_llama_cpp.sh) gives tyr-jax's log-likelihoods.

The llama.cpp tests build llama.cpp once per session through the script and its cache
(~/.cache/tyr-jax/llama.cpp-11434, or $TYR_LLAMA_CPP_DIR; about 5.5 minutes on 2 cores the first time,
seconds afterwards). They are skipped only where there is no cmake or C++ compiler.
"""

import dataclasses
import json
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

from tyr_jax.cli import main as cli_main
from tyr_jax.export import export_gguf, export_model, gguf_blockers, tokenizer_fields
from tyr_jax.loading import load_model
from tyr_jax.loading.gguf import _unpermute_rows, permute_rows, smollm2_path
from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig, RopeConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXT = " ".join(f"The river {w} flows past the old mill near town number {i}." for i, w in
                enumerate(["Avon", "Thames", "Severn", "Trent", "Wye"] * 20))
# Layer by layer (kept KV groups, kept MLP channels): layer 0 loses its attention, layer 1 its MLP behind
# a kept attention, layer 2 both sublayers, the last layer its MLP: every deci stand-in is exercised.
REMOVED = ([[], [1], [], [0, 1]], [np.arange(0, 48, 3), np.array([], int), np.array([], int), np.array([], int)])
VARIANTS = {
    "llama": {},
    "llama3_rope_tied": dict(rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0,
                                             original_max_position_embeddings=16), tie_word_embeddings=True),
    "qwen2_biases": dict(model_type="qwen2", qkv_bias=True, rope=RopeConfig(theta=1e6)),
    "flap_biases": dict(o_bias=True, down_bias=True, rope=RopeConfig(rope_type="linear", factor=2.0)),
    "mistral": dict(model_type="mistral"),
}


# -- helpers ------------------------------------------------------------------------------------


def _tokenizer() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator([TEXT], tokenizers.trainers.BpeTrainer(
        vocab_size=300, show_progress=False, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _tiny(variant: str, keep=REMOVED, seed=0):
    """A tiny random model of `variant` (random norms and biases), pruned to `keep` (None: dense)."""
    tok = _tokenizer()
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=8, intermediate_size=48, bos_token_id=0, eos_token_id=0,
                      **VARIANTS[variant])
    weights = llama.init_weights(cfg, key=jax.random.key(seed), scale=0.3)
    noise = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    weights = jax.tree_util.tree_map_with_path(
        lambda p, w: w + 0.1 * jax.random.normal(next(noise), w.shape) if "norm" in jax.tree_util.keystr(p) or
        "bias" in jax.tree_util.keystr(p) else w, weights)
    if keep is not None:
        kv_keep, mlp_keep = keep
        masks = llama.UnitMasks(
            kv_lk=jnp.asarray([np.isin(np.arange(cfg.num_kv_heads), k) for k in kv_keep], jnp.float32),
            mlp_lf=jnp.asarray([np.isin(np.arange(cfg.intermediate_size), m) for m in mlp_keep], jnp.float32))
        weights, cfg = llama.apply_masks(weights, cfg, masks)
    return weights, cfg, tok


def _tyr_logprobs(weights, cfg, ids) -> np.ndarray:
    ids = jnp.asarray(ids, jnp.int32)[None]
    return np.asarray(llama.token_logprobs(weights, ids[:, :-1], ids[:, 1:], cfg))[0]


def _llama_cpp_logprobs(bin_dir: pathlib.Path, model: pathlib.Path, ids) -> np.ndarray:
    out = subprocess.run([str(bin_dir / "tyr-logprobs"), str(model), *map(str, ids)], capture_output=True,
                         text=True, check=True).stdout
    return np.array([float(line.split()[2]) for line in out.splitlines()])


# -- llama.cpp ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama_cpp() -> pathlib.Path:
    """The directory of the llama.cpp programs, built (or found in the cache) by the script."""
    if not (shutil.which("cmake") and shutil.which("g++")):
        pytest.skip("llama.cpp needs cmake and g++ to build (pip install cmake; apt-get install g++)")
    run = subprocess.run(["bash", str(REPO / "scripts/build_llama_cpp.sh")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return pathlib.Path(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_pruned_model_runs_in_llama_cpp_with_tyr_jax_log_likelihoods(variant, llama_cpp, tmp_path):
    weights, cfg, tok = _tiny(variant)
    report = export_gguf(weights, cfg, tmp_path / "m.gguf", source=tok, context_length=64)
    assert report["arch"] == "deci"
    # layer 0 attention, layer 1 and 3 MLPs; with biases also layer 2 (its o and down biases are not 0)
    assert len(report["stand_ins"]) == 3 + 2 * (variant == "flap_biases")
    ids = tok.encode(TEXT).ids[:40]
    # Measured 2026-12-03: max |Δ log p| 2e-6 to 3e-6 over the variants pruned, 5e-6 to 1.4e-5 dense (fp32).
    np.testing.assert_allclose(_llama_cpp_logprobs(llama_cpp, tmp_path / "m.gguf", ids),
                               _tyr_logprobs(weights, cfg, ids), atol=1e-4)


def test_tiny_dense_model_exports_as_llama(llama_cpp, tmp_path):
    weights, cfg, tok = _tiny("qwen2_biases", keep=None)
    assert export_gguf(weights, cfg, tmp_path / "m.gguf", source=tok, context_length=64)["arch"] == "llama"
    ids = tok.encode(TEXT).ids[:40]
    np.testing.assert_allclose(_llama_cpp_logprobs(llama_cpp, tmp_path / "m.gguf", ids),
                               _tyr_logprobs(weights, cfg, ids), atol=1e-4)


def test_cli_exports_a_remote_code_export_directory(llama_cpp, tmp_path, capsys):
    """`tyr-jax export --model OUT/model` on a per-layer export (model_type tyr, modeling_tyr.py for
    transformers) writes a deci file with the same log-likelihoods."""
    weights, cfg, tok = _tiny("flap_biases")
    assert export_model(weights, cfg, tmp_path / "model", tokenizer=tok)["trust_remote_code"]
    assert cli_main(["export", "--model", str(tmp_path / "model"), "--gguf", str(tmp_path / "m.gguf"),
                     "--context-length", "64"]) == 0
    assert "llama.cpp architecture deci" in capsys.readouterr().out
    ids = tok.encode(TEXT).ids[:40]
    np.testing.assert_allclose(_llama_cpp_logprobs(llama_cpp, tmp_path / "m.gguf", ids),
                               _tyr_logprobs(weights, cfg, ids), atol=1e-4)


def test_llama_cpp_tokenizes_like_tyr_jax(llama_cpp, tmp_path):
    weights, cfg, tok = _tiny("llama")
    export_gguf(weights, cfg, tmp_path / "m.gguf", source=tok, context_length=64)
    text = "The river Severn flows, 12 mills  near\ntown!"
    out = subprocess.run([str(llama_cpp / "llama-tokenize"), "-m", str(tmp_path / "m.gguf"), "-p", text, "--ids",
                          "--no-bos", "--log-disable"], capture_output=True, text=True, check=True).stdout
    assert eval(out.strip().splitlines()[-1]) == tok.encode(text).ids


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def _smollm2_pruned(model, fraction, seed=0):
    """SmolLM2 with `fraction` of its KV groups and MLP channels removed, spread unevenly over layers."""
    cfg, rng = model.cfg, np.random.default_rng(seed)
    kv = np.zeros((cfg.num_layers, cfg.num_kv_heads))
    mlp = np.zeros((cfg.num_layers, cfg.intermediate_size))
    kv.flat[rng.permutation(kv.size)[:round(kv.size * (1 - fraction))]] = 1
    mlp.flat[rng.permutation(mlp.size)[:round(mlp.size * (1 - fraction))]] = 1
    masks = llama.UnitMasks(kv_lk=jnp.asarray(kv, jnp.float32), mlp_lf=jnp.asarray(mlp, jnp.float32))
    return llama.apply_masks(model.weights, cfg, masks)


@pytest.mark.parametrize("fraction", [0.0, 0.25])
def test_smollm2_runs_in_llama_cpp_with_tyr_jax_log_likelihoods(fraction, smollm2, llama_cpp, tmp_path):
    weights, cfg = _smollm2_pruned(smollm2, fraction) if fraction else (smollm2.weights, smollm2.cfg)
    report = export_gguf(weights, cfg, tmp_path / "m.gguf", source="smollm2-135m")
    assert report["arch"] == ("deci" if fraction else "llama")
    ids = smollm2.tokenizer.encode(TEXT).ids[:64]
    # Measured 2026-12-03: max |Δ log p| 1.5e-5 dense, 6.9e-5 at 25% and 8.6e-5 at 50% pruned (fp32, 64 tokens).
    np.testing.assert_allclose(_llama_cpp_logprobs(llama_cpp, tmp_path / "m.gguf", ids),
                               _tyr_logprobs(weights, cfg, ids), atol=1e-3)
    if fraction:
        for qtype in ("Q8_0", "Q4_K_M"):
            subprocess.run([str(llama_cpp / "llama-quantize"), str(tmp_path / "m.gguf"),
                            str(tmp_path / f"{qtype}.gguf"), qtype, "2"], capture_output=True, check=True)
            assert np.all(np.isfinite(_llama_cpp_logprobs(llama_cpp, tmp_path / f"{qtype}.gguf", ids[:16])))


# -- fast unit tests ----------------------------------------------------------------------------


def test_permute_rows_is_the_inverse_of_the_readers_unpermute():
    # One head of size 4: HF's halves (r0, r1 | r2, r3) become llama.cpp's rotary pairs (r0, r2), (r1, r3).
    np.testing.assert_array_equal(permute_rows(np.arange(4), 1), [0, 2, 1, 3])
    w = np.arange(48 * 3, dtype=np.float32).reshape(48, 3)
    np.testing.assert_array_equal(_unpermute_rows(permute_rows(w, 6), 6), w)


@pytest.mark.parametrize("keep", [None, ([[0], [1], [0], [1]], [np.arange(24)] * 4)])
def test_dense_and_uniform_exports_round_trip_through_our_reader(keep, tmp_path):
    weights, cfg, tok = _tiny("llama", keep=keep)
    assert export_gguf(weights, cfg, tmp_path / "m.gguf", source=tok, context_length=64)["arch"] == "llama"
    model = load_model(tmp_path / "m.gguf")
    ids = tok.encode(TEXT).ids[:32]
    np.testing.assert_allclose(_tyr_logprobs(model.weights, model.cfg, ids), _tyr_logprobs(weights, cfg, ids),
                               atol=1e-5)
    assert model.tokenizer.encode(TEXT).ids == tok.encode(TEXT).ids


def test_f16_and_bf16_store_matrices_in_that_type(tmp_path):
    import gguf

    weights, cfg, tok = _tiny("llama", keep=None)
    for type_, qtype in (("f16", gguf.GGMLQuantizationType.F16), ("bf16", gguf.GGMLQuantizationType.BF16)):
        export_gguf(weights, cfg, tmp_path / f"{type_}.gguf", source=tok, type=type_, context_length=64)
        kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / f"{type_}.gguf").tensors}
        assert kinds["blk.0.attn_q.weight"] == qtype and kinds["blk.0.attn_norm.weight"].name == "F32"


def test_tokenizer_of_the_gguf_source_is_copied_and_rebuilt_alike():
    from tyr_jax.loading import load_tokenizer

    cfg = ModelConfig(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                      intermediate_size=1536, bos_token_id=1, eos_token_id=2)
    copied = {k: v for k, v, *_ in tokenizer_fields(smollm2_path(), cfg)}
    rebuilt = {k: v for k, v, *_ in tokenizer_fields(load_tokenizer("smollm2-135m"), cfg)}
    assert rebuilt["tokenizer.ggml.pre"] == copied["tokenizer.ggml.pre"] == "smollm"
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert list(np.atleast_1d(rebuilt[key])) == list(np.atleast_1d(copied[key])), key


def test_sliding_window_and_unknown_types_are_refused_by_name(tmp_path):
    weights, cfg, tok = _tiny("mistral")
    with pytest.raises(ValueError, match="sliding_window=5"):
        export_gguf(weights, dataclasses.replace(cfg, sliding_window=5), tmp_path / "m.gguf", source=tok,
                    context_length=64)
    with pytest.raises(ValueError, match="q4_0.*f32, f16, bf16"):
        export_gguf(weights, cfg, tmp_path / "m.gguf", source=tok, type="q4_0", context_length=64)
    with pytest.raises(ValueError, match="context_length"):
        export_gguf(weights, cfg, tmp_path / "m.gguf", source=tok)
    assert not (tmp_path / "m.gguf").exists()
    assert gguf_blockers(cfg) == []


def test_cli_export_never_overwrites_without_the_flag(tmp_path, capsys):
    weights, cfg, tok = _tiny("llama")
    export_model(weights, cfg, tmp_path / "model", tokenizer=tok)
    args = ["export", "--model", str(tmp_path / "model"), "--gguf", str(tmp_path / "m.gguf"), "--context-length", "64"]
    assert cli_main(args) == 0
    first = (tmp_path / "m.gguf").stat().st_mtime_ns
    assert cli_main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "m.gguf").stat().st_mtime_ns == first
    assert cli_main(args + ["--overwrite", "--type", "f16"]) == 0


def test_prune_config_refuses_gguf_for_pbs2p():
    from tyr_jax.runconfig import load_run_config

    with pytest.raises(ValueError, match="pbs2p.*GGUF"):
        load_run_config(None, ["method=pbs2p", "export.gguf=true"])
    assert load_run_config(None, ["export.gguf=true", "export.gguf_type=f16"]).export.gguf_type == "f16"


def test_work_stored_before_the_export_section_is_found_only_for_its_defaults(tmp_path):
    """A summary (or an ablation result) stored before the `export` section existed holds none: it is the
    finished run of the default export settings, not of `export.gguf=true` (which has a file to write)."""
    from tyr_jax.pipeline import finished_summary
    from tyr_jax.runconfig import load_run_config, result_key, to_dict

    rc = load_run_config(None, [f"out={tmp_path}"])
    stored = to_dict(rc)
    del stored["export"]
    (tmp_path / "summary.json").write_text(json.dumps({"config": stored, "ppl": 1.0}))
    assert finished_summary(rc)["ppl"] == 1.0
    assert json.dumps(result_key(to_dict(rc))) == json.dumps(result_key(stored))   # an ablation's result key
    gguf = load_run_config(None, [f"out={tmp_path}", "export.gguf=true"])
    assert finished_summary(gguf) is None
    assert result_key(to_dict(gguf)) != result_key(stored)


def test_prune_with_export_gguf_writes_a_model_llama_cpp_runs(tiny_hf_dir, llama_cpp, tmp_path):
    model_dir, corpus = tiny_hf_dir
    out = tmp_path / "run"
    assert cli_main(["prune", "--out", str(out), "--config", str(REPO / "configs/smoke.yaml"), f"model={model_dir}",
                     "method=flap", "supernet.target_sparsity=0.5", "supernet.min_step_channels=4",
                     "supernet.mlp_round_size=4", f"calibration.corpus={corpus}", "calibration.num_sequences=4",
                     "calibration.seq_len=32", "calibration.batch_size=2", f"eval.corpus={corpus}",
                     "eval.ood_corpus=null", "eval.seq_len=32", "eval.max_tokens=256", "eval.tasks=[]",
                     "mesh.data=1", "export.gguf=true", "export.gguf_type=f32"]) == 0
    pruned = load_model(out / "model")
    ids = pruned.tokenizer.encode(TEXT).ids[:32]
    np.testing.assert_allclose(_llama_cpp_logprobs(llama_cpp, out / "model.gguf", ids),
                               _tyr_logprobs(pruned.weights, pruned.cfg, ids), atol=1e-4)
