"""Stages of a pruning run, each a function of a `RunConfig`: calibration data, pruning (Týr supernet +
search, a baseline's centre copies, or policy-gradient masks), export, evaluation."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from tyr_jax import binarization, plots
from tyr_jax.binarization.packed import export_binary
from tyr_jax.coarse_to_fine import coarse_to_fine, iteration_store
from tyr_jax.data import corpora, sampler
from tyr_jax.distributed import claim_directory, is_primary
from tyr_jax.evaluation import zeroshot
from tyr_jax.evaluation.perplexity import perplexity
from tyr_jax.export import check_gguf_export, export_gguf, export_model
from tyr_jax.loading import LoadedModel, load_model, load_tokenizer
from tyr_jax.models import llama
from tyr_jax.pruning import policy_gradient
from tyr_jax.results import load_keyed, save_keyed, weights_sha256
from tyr_jax.runconfig import CalibrationConfig, RunConfig, result_key, to_dict
from tyr_jax.sharding import batch_sharding, data_size, replicated, to_host, weight_shardings
from tyr_jax.supernet import LevelPlan, SupernetStore, assemble, build_supernet, fingerprint


def model_dtype(rc: RunConfig):
    return jnp.bfloat16 if rc.dtype == "bfloat16" else jnp.float32


def calibration_windows(stream: np.ndarray, ccfg: CalibrationConfig) -> np.ndarray:
    """N random windows of T tokens from the tokenized calibration corpus, reproducible from `seed`."""
    return sampler.sample_windows(stream, ccfg.num_sequences, ccfg.seq_len, key=jax.random.key(ccfg.seed))


def calibration_tokens(tokenizer, ccfg: CalibrationConfig) -> np.ndarray:
    """`calibration_windows` of the calibration corpus, tokenized with `tokenizer`."""
    return calibration_windows(sampler.tokenize(tokenizer, corpora.load_text(ccfg.corpus)), ccfg)


def eval_windows(tokenizer, rc: RunConfig, corpus: str | None = None) -> np.ndarray:
    """Windows of `rc.eval.seq_len` of the evaluation text (`corpus`, default `rc.eval.corpus`)."""
    tokens = sampler.tokenize(tokenizer, corpora.load_text(rc.eval.corpus if corpus is None else corpus))
    return sampler.token_windows(tokens, rc.eval.seq_len, rc.eval.max_tokens)


_CORPUS_FIX = (f"use a built-in corpus ({', '.join(corpora.BUILTIN_CORPORA)}) or a readable, non-empty UTF-8 "
               "text file")


def _checked(key: str, fix: str, fn):
    """fn(), with any error it raises about its input reported as a ValueError naming the config key."""
    try:
        return fn()
    except (OSError, ValueError, ImportError) as e:
        raise ValueError(f"{key}: {e} ({fix})") from None


def prepare_inputs(rc: RunConfig, tokenizer) -> dict:
    """Reads, tokenizes and cuts every text a run needs, and loads its zero-shot tasks, before any work: a
    bad corpus or task name fails in seconds, naming its config key. Returns {"calib", "eval", "ood"
    (None when eval.ood_corpus is null), "calib_stream"}."""
    if tokenizer is None:
        raise ValueError(f"{rc.model} has no tokenizer; calibration and evaluation text cannot be tokenized")
    ccfg = rc.calibration
    stream = _checked("calibration.corpus", _CORPUS_FIX,
                      lambda: sampler.tokenize(tokenizer, corpora.load_text(ccfg.corpus)))
    need = max(ccfg.seq_len, rc.search.seq_len if rc.searches else 0,
               rc.policy_gradient.seq_len if rc.method == "policy_gradient" else 0) + 1
    if len(stream) < need:
        raise ValueError(f"calibration.corpus: {ccfg.corpus!r} has {len(stream)} tokens, fewer than the "
                         f"{need} a window needs (calibration.seq_len, search.seq_len); use a longer text")
    calib = calibration_windows(stream, ccfg)
    fix_eval = _CORPUS_FIX + ", or lower eval.seq_len"
    windows = _checked("eval.corpus", fix_eval, lambda: eval_windows(tokenizer, rc))
    ood = None
    if rc.eval.ood_corpus is not None:
        ood = _checked("eval.ood_corpus", fix_eval + "; null skips it",
                       lambda: eval_windows(tokenizer, rc, rc.eval.ood_corpus))
    for task in rc.eval.tasks:
        _checked("eval.tasks", f"choose from {', '.join(zeroshot.TASKS)}",
                 lambda task=task: zeroshot.load_task(task, limit=rc.eval.limit))
    return {"calib": calib, "eval": windows, "ood": ood, "calib_stream": stream}


def build_mesh(rc: RunConfig):
    """The run's mesh (`rc.mesh`), checked against the batch sizes that must split over `data`."""
    mesh = rc.mesh.build()
    d = data_size(mesh)
    if rc.method != "policy_gradient" and rc.calibration.batch_size % d:   # the supernet splits its batches
        raise ValueError(f"calibration.batch_size ({rc.calibration.batch_size}) must be a multiple of the mesh's "
                         f"data axis ({d} devices); change it or set mesh.data")
    return mesh


def place(weights, mesh):
    """Weights placed on `mesh` by the sharding table (a no-op for weights already there)."""
    return jax.device_put(weights, weight_shardings(weights, mesh))


def write_json(path: pathlib.Path, value) -> None:
    """Writes a run file once: on process 0 only."""
    if is_primary():
        path.write_text(json.dumps(value, indent=1))


def run_supernet(rc: RunConfig, model: LoadedModel | None = None, *, calib: np.ndarray | None = None,
                 progress: bool = True):
    """Builds (or resumes) the supernet of `rc` under `<out>/supernet` on the mesh of `rc.mesh`;
    returns (model, store, plan), the model's weights placed on the mesh.

    `calib` overrides the calibration windows that `rc.calibration` would sample."""
    mesh = build_mesh(rc)
    if model is None:
        model = load_model(rc.model, dtype=model_dtype(rc), shardings=lambda w: weight_shardings(w, mesh))
    else:
        model = dataclasses.replace(model, weights=place(model.weights, mesh))
    if calib is None:
        if model.tokenizer is None:
            raise ValueError(f"{rc.model} has no tokenizer; calibration text cannot be tokenized")
        calib = calibration_tokens(model.tokenizer, rc.calibration)
    plan = LevelPlan.centred(model.cfg, rc.supernet)
    out = pathlib.Path(rc.out)
    store = SupernetStore(out / "supernet", fingerprint(model.cfg, rc.supernet, plan, calib, rc.model,
                                                        model.weights.embed_vd.dtype))
    write_json(out / "run_config.json", to_dict(rc))
    build_supernet(model.weights, model.cfg, calib, rc.supernet, plan, store,
                   batch_size=rc.calibration.batch_size, progress=progress, mesh=mesh)
    return model, store, plan


def evaluate_levels(model: LoadedModel, store: SupernetStore, attn_level, mlp_level, windows, *,
                    batch_size: int = 8, progress: bool = True) -> dict:
    """Perplexity and parameter counts of the model assembled from the chosen copies."""
    weights, cfg = assemble(model.weights, model.cfg, store, list(attn_level), list(mlp_level))
    stats = perplexity(weights, cfg, windows, batch_size=batch_size, progress=progress)
    return {"ppl": stats["ppl"], "tokens_scored": stats["tokens_scored"], "params": cfg.num_params(),
            "kv_groups": list(cfg.kv_groups), "mlp_widths": list(cfg.mlp_widths)}


def prunable_params(weights) -> int:
    """Parameters of all attention and MLP sublayers (projections and their biases; norms excluded)."""
    total = 0
    for blk in weights.blocks:
        for sub in (blk.attn, blk.mlp):
            total += sum(getattr(sub, f).size for f in vars(sub) if f != "norm_d" and getattr(sub, f) is not None)
    return total


def _evaluate(weights, cfg, tokenizer, rc: RunConfig, windows, progress: bool, mesh, path: pathlib.Path,
              key: dict, ood_windows=None) -> dict:
    """Perplexity (held-out, then out-of-domain on `ood_windows` when given) and zero-shot accuracy of
    weights placed on `mesh` (batches split over `data` where they divide). Each part (perplexity, the
    out-of-domain one, then every task) is saved to `path` under `key` as it finishes, so a re-run skips
    the parts already done: a killed evaluation resumes, a finished one is read back."""
    result = load_keyed(path, key) or {}
    split = rc.eval.batch_size % data_size(mesh) == 0
    parts = [("", windows)] + ([("_ood", ood_windows)] if ood_windows is not None else [])
    for suffix, part in parts:
        if f"ppl{suffix}" in result:
            continue
        stats = perplexity(weights, cfg, part, batch_size=rc.eval.batch_size, progress=progress,
                           data_sharding=batch_sharding(mesh) if split else replicated(mesh))
        result.update({f"ppl{suffix}": stats["ppl"], f"tokens_scored{suffix}": stats["tokens_scored"],
                       f"seq_len{suffix}": stats["seq_len"]})
        save_keyed(path, key, result)
    if rc.eval.tasks:
        logprobs = jax.jit(lambda w, tok, tgt: llama.token_logprobs(w, tok, tgt, cfg))
        score = lambda tok, tgt: to_host(logprobs(weights, tok, tgt))  # noqa: E731
        done = result.setdefault("zeroshot", {})
        for task in (t for t in rc.eval.tasks if t not in done):
            scores = zeroshot.evaluate(score, tokenizer, [task], limit=rc.eval.limit, batch_size=rc.eval.batch_size,
                                       progress=progress)
            done[task] = scores[task]["acc_norm"]
            save_keyed(path, key, result)
    return result


def pool_tokens(rc: RunConfig, stream: np.ndarray) -> np.ndarray:
    """The search's fitness pool: `search.pool_sequences` windows of the calibration corpus (key seed + 1)."""
    return sampler.sample_windows(stream, rc.search.pool_sequences, rc.search.seq_len,
                                  key=jax.random.key(rc.calibration.seed + 1))


def _supernet_and_search(rc: RunConfig, model: LoadedModel, calib: np.ndarray, stream: np.ndarray, mesh,
                         out: pathlib.Path, progress: bool):
    """Týr's coarse-to-fine supernets and searches, or the centre copies (`coarse_to_fine`)."""
    return coarse_to_fine(model.weights, model.cfg, calib, rc.supernet, rc.search if rc.searches else None, out,
                          model_name=rc.model, pool_tokens=pool_tokens(rc, stream) if rc.searches else None,
                          batch_size=rc.calibration.batch_size, mesh=mesh, progress=progress)


def _policy_gradient_fingerprint(rc: RunConfig, cfg) -> dict:
    return policy_gradient.state_fingerprint(cfg, rc.policy_gradient, rc.supernet.target_sparsity,
                                             {"model": rc.model, "dtype": rc.dtype,
                                              "calibration": to_dict(rc.calibration)})


def _policy_gradient(rc: RunConfig, model: LoadedModel, calib: np.ndarray, stream: np.ndarray, mesh,
                     out: pathlib.Path, progress: bool):
    """Keep-probabilities learned on the calibration corpus (ALGORITHMS.md §2; resumable under
    OUT/policy_gradient) on the run's mesh, top-k per pool, sliced. Returns (weights, config, report)."""
    return policy_gradient.prune(model.weights, model.cfg, stream, rc.policy_gradient, rc.supernet.target_sparsity,
                                 out / "policy_gradient", calib_bt=calib, calib_batch_size=rc.calibration.batch_size,
                                 fingerprint={"model": rc.model, "dtype": rc.dtype,
                                              "calibration": to_dict(rc.calibration)},
                                 mesh=mesh, progress=progress)


def _pbs2p_store(rc: RunConfig, model: LoadedModel, calib: np.ndarray, out: pathlib.Path):
    """The PBS²P store under OUT/pbs2p, claimed: one built with other settings is refused here."""
    return binarization.Pbs2pStore(out / "pbs2p", binarization.compress.fingerprint(
        model.cfg, rc.pbs2p, calib, rc.model, model.weights.embed_vd.dtype))


def _pbs2p(rc: RunConfig, model: LoadedModel, calib: np.ndarray, mesh, out: pathlib.Path, progress: bool):
    """Every linear binarized with N:M sparsity (ALGORITHMS.md §3; resumable under OUT/pbs2p).
    Returns (weights with the binary reconstructions, config, report, (packed blocks, export meta))."""
    pcfg = rc.pbs2p
    store = _pbs2p_store(rc, model, calib, out)
    weights, packed_layers, ns = binarization.compress_model(
        model.weights, model.cfg, calib, pcfg, store, batch_size=rc.calibration.batch_size, progress=progress,
        mesh=mesh)
    meta = {"variant": pcfg.variant, "m": pcfg.m, "block_size": pcfg.block_size, "n_per_layer": ns}
    kept = float(np.mean([pcfg.m if n is None else n for n in ns])) / pcfg.m
    return weights, model.cfg, meta | {"kept_fraction": kept}, (packed_layers, meta)


def finished_summary(rc: RunConfig) -> dict | None:
    """The summary.json of a finished run of this very config (the mesh and `runconfig.DISPLAY_ONLY` aside:
    they do not change the result; a `runconfig.LATER_SECTIONS` section at its defaults counts as absent),
    or None."""
    try:
        summary = json.loads((pathlib.Path(rc.out) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    # result_key: runs finished before the `export` section existed hold none, i.e. its defaults.
    same = lambda c: result_key({k: v for k, v in c.items() if k != "mesh"})  # noqa: E731
    stored = summary.get("config")
    return summary if isinstance(stored, dict) and same(stored) == same(json.loads(json.dumps(to_dict(rc)))) else None


def run_prune(rc: RunConfig, *, progress: bool = True) -> dict:
    """Calibration → pruning (`rc.method`) → export → evaluation on the mesh of `rc.mesh`; resumable.
    With several processes every one runs this; process 0 writes the files.

    Every input (corpora, zero-shot tasks) is checked before any work; a stored supernet or
    policy-gradient state built with other settings is refused before anything is written; a finished
    run of the same config is returned as it is (nothing re-exported, its wall time kept)."""
    start = time.perf_counter()
    mesh = build_mesh(rc)
    out = pathlib.Path(rc.out)
    done = finished_summary(rc)
    if done is not None:
        print(f"{out} already holds this run, finished: {out / 'summary.json'} (delete it to run again)")
        return done
    inputs = prepare_inputs(rc, load_tokenizer(rc.model))
    model = load_model(rc.model, dtype=model_dtype(rc), shardings=lambda w: weight_shardings(w, mesh))
    cfg, calib, stream = model.cfg, inputs["calib"], inputs["calib_stream"]
    if rc.export.gguf:  # tokenizer, context length and settings llama.cpp can run, before any work
        check_gguf_export(cfg, rc.model, type=rc.export.gguf_type)
    # Refuse stored work of other settings before writing anything (the first stage's directory; later
    # iterations and searches depend on earlier results and are checked when they start).
    if rc.method == "policy_gradient":
        claim_directory((out / "policy_gradient").absolute(), _policy_gradient_fingerprint(rc, cfg),
                        "a policy-gradient run")
    elif rc.method == "pbs2p":
        _pbs2p_store(rc, model, calib, out)
    else:
        iteration_store(model.weights, cfg, calib, rc.supernet, rc.model, out)
    write_json(out / "run_config.json", to_dict(rc))
    extra, history, binary = {}, [], None
    if rc.method == "policy_gradient":
        weights, pruned_cfg, extra["policy_gradient"] = _policy_gradient(rc, model, calib, stream, mesh, out,
                                                                         progress)
    elif rc.method == "pbs2p":
        weights, pruned_cfg, extra["pbs2p"], binary = _pbs2p(rc, model, calib, mesh, out, progress)
    else:
        weights, pruned_cfg, history = _supernet_and_search(rc, model, calib, stream, mesh, out, progress)
    weights = place(weights, mesh)
    # The run owns OUT/model: a resumed run rewrites the same model (gathered by all, written by one).
    host_weights = jax.tree.map(to_host, weights)
    report = None
    if is_primary() and binary is not None:
        report = export_binary(host_weights, pruned_cfg, *binary, out / "model", tokenizer=model.tokenizer,
                               overwrite=True)
    elif is_primary():
        report = export_model(host_weights, pruned_cfg, out / "model", tokenizer=model.tokenizer, overwrite=True)
        if rc.export.gguf:
            report["gguf"] = export_gguf(host_weights, pruned_cfg, out / "model.gguf", source=rc.model,
                                         type=rc.export.gguf_type, overwrite=True)
    windows, ood = inputs["eval"], inputs["ood"]
    eval_key = {"model": rc.model, "dtype": rc.dtype, "eval": to_dict(rc.eval)}
    dense = _evaluate(model.weights, cfg, model.tokenizer, rc, windows, progress, mesh, out / "dense_eval.json",
                      eval_key, ood)
    pruned = _evaluate(weights, pruned_cfg, model.tokenizer, rc, windows, progress, mesh, out / "pruned_eval.json",
                       eval_key | {"weights_sha256": weights_sha256(host_weights)}, ood)
    per_layer = [{"layer": i, "kv_groups_kept": int(pruned_cfg.layer_kv_groups(i)),
                  "mlp_channels_kept": int(pruned_cfg.layer_mlp_width(i))} for i in range(cfg.num_layers)]
    summary = {
        "method": rc.method, "label": rc.label, "model": rc.model, "target_sparsity": rc.supernet.target_sparsity,
        "params": {"dense": int(sum(x.size for x in jax.tree.leaves(model.weights))),
                   "pruned": int(sum(x.size for x in jax.tree.leaves(weights))),
                   "prunable_dense": prunable_params(model.weights), "prunable_pruned": prunable_params(weights)},
        "ppl": {"dense": dense["ppl"], "pruned": pruned["ppl"], "text": rc.eval.corpus, "seq_len": rc.eval.seq_len,
                "tokens_scored": pruned["tokens_scored"]},
        "ppl_ood": None if ood is None else {
            "dense": dense["ppl_ood"], "pruned": pruned["ppl_ood"], "text": rc.eval.ood_corpus,
            "seq_len": rc.eval.seq_len, "tokens_scored": pruned["tokens_scored_ood"]},
        "zeroshot": {"dense": dense.get("zeroshot", {}), "pruned": pruned.get("zeroshot", {})},
        "per_layer": per_layer,
        "search_history": history,
        "export": report,
        "wall_time_s": time.perf_counter() - start,
        "config": to_dict(rc),
        **extra,
    }
    write_json(out / "summary.json", summary)
    if is_primary() and rc.method != "pbs2p":   # PBS²P keeps every head and channel
        plots.plot_layers(per_layer, cfg.num_kv_heads, cfg.intermediate_size, out / "per_layer.png",
                          f"{rc.label} on {rc.model}: kept per layer")
        if history:
            plots.plot_fitness(history, out / "fitness.png")
    return summary
