"""Stages of a pruning run, each a function of a `RunConfig`: calibration data, supernet, evaluation."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from tyr_jax.data import corpora, sampler
from tyr_jax.evaluation.perplexity import perplexity
from tyr_jax.loading import LoadedModel, load_model
from tyr_jax.runconfig import CalibrationConfig, RunConfig, to_dict
from tyr_jax.supernet import LevelPlan, SupernetStore, assemble, build_supernet, fingerprint


def model_dtype(rc: RunConfig):
    return jnp.bfloat16 if rc.dtype == "bfloat16" else jnp.float32


def calibration_tokens(tokenizer, ccfg: CalibrationConfig) -> np.ndarray:
    """N random windows of T tokens from the calibration corpus, reproducible from `seed`."""
    tokens = sampler.tokenize(tokenizer, corpora.load_text(ccfg.corpus))
    return sampler.sample_windows(tokens, ccfg.num_sequences, ccfg.seq_len, key=jax.random.key(ccfg.seed))


def eval_windows(tokenizer, rc: RunConfig) -> np.ndarray:
    tokens = sampler.tokenize(tokenizer, corpora.load_text(rc.eval.corpus))
    return sampler.token_windows(tokens, rc.eval.seq_len, rc.eval.max_tokens)


def run_supernet(rc: RunConfig, model: LoadedModel | None = None, *, calib: np.ndarray | None = None,
                 progress: bool = True):
    """Builds (or resumes) the supernet of `rc` under `<out>/supernet`; returns (model, store, plan).

    `calib` overrides the calibration windows that `rc.calibration` would sample."""
    model = model or load_model(rc.model, dtype=model_dtype(rc))
    if calib is None:
        if model.tokenizer is None:
            raise ValueError(f"{rc.model} has no tokenizer; calibration text cannot be tokenized")
        calib = calibration_tokens(model.tokenizer, rc.calibration)
    plan = LevelPlan.uniform_centres(model.cfg, rc.supernet)
    out = pathlib.Path(rc.out)
    store = SupernetStore(out / "supernet", fingerprint(model.cfg, rc.supernet, plan, calib, rc.model,
                                                        model.weights.embed_vd.dtype))
    (out / "run_config.json").write_text(json.dumps(to_dict(rc), indent=1))
    build_supernet(model.weights, model.cfg, calib, rc.supernet, plan, store,
                   batch_size=rc.calibration.batch_size, progress=progress)
    return model, store, plan


def evaluate_levels(model: LoadedModel, store: SupernetStore, attn_level, mlp_level, windows, *,
                    batch_size: int = 8, progress: bool = True) -> dict:
    """Perplexity and parameter counts of the model assembled from the chosen copies."""
    weights, cfg = assemble(model.weights, model.cfg, store, list(attn_level), list(mlp_level))
    stats = perplexity(weights, cfg, windows, batch_size=batch_size, progress=progress)
    return {"ppl": stats["ppl"], "tokens_scored": stats["tokens_scored"], "params": cfg.num_params(),
            "kv_groups": list(cfg.kv_groups), "mlp_widths": list(cfg.mlp_widths)}
