"""The Týr supernet (ALGORITHMS.md §1.2): E pruned copies of every sublayer, built block by block with
expectation error accumulation, stored compactly with Orbax and resumable.

For block ℓ the calibration activations X pass through the attention sublayer, whose output
projection is pruned at E sparsities S_e; the activations handed on are the expectation over the copies

    X_{ℓ+1} = Σ_e w_e X_{ℓ+1,e},   w_e = (1 − S_e) / Σ_e' (1 − S_e')                    (Eq. 5)

which, the projection being linear, is one pass with the averaged weights W̄ = Σ_e w_e W_e. The MLP
sublayer follows on those activations. `expectation=False` hands on the dense output instead (the
ablation, and what the reference code does by accident).

One loop builds them, `build_supernets`, for V configs at once that differ only in `damp` and
`expectation` (`tyr-jax ablate`), vmapped over a leading variant axis; a run's build is V = 1
(`build_supernet`). The removal counts reach the pruner as data (int32 [E], `prune_step`), so one compiled
pruner serves every block and every coarse-to-fine iteration, whatever their counts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from tyr_jax.checkpointing import BlockStore
from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig
from tyr_jax.pruning import LevelResult, SublayerStats, accumulate_stats, get_pruner
from tyr_jax.pruning.tyr import REFITS
from tyr_jax.sharding import logical_sharding, put_batch, replicated, to_host

# SupernetConfig fields in which the configs of one build may differ (`build_supernets`), and the pruner
# hyper-parameters among them that are traced numbers (the others are static: round sizes, refit).
VARIANT_FIELDS = ("damp", "expectation")
_TRACED_HPARAMS = ("damp",)


@dataclasses.dataclass(frozen=True)
class SupernetConfig:
    """How the copies are made. Sparsities are fractions of a sublayer's units (KV groups, channels)."""

    method: str = "tyr"                    # the local pruner (a run config sets it from its `method`)
    target_sparsity: float = 0.5           # centre level of every sublayer (first iteration)
    step: float = 0.125                    # Δ between levels
    num_levels: int = 9
    min_step_kv_groups: int = 1
    min_step_channels: int = 32
    attn_round_size: int = 1               # units per progressive round (Týr only)
    mlp_round_size: int = 16
    damp: float = 0.01
    refit: str = "towards_w0"              # Týr's final refit: towards_w0 (reference), towards_zero, exact (tyr.py)
    expectation: bool = True               # Eq. 5; False propagates the dense output
    # FLAP, Wanda-sp, magnitude (a run config applies it): "dense" (as published: one level at the target,
    # statistics of the dense model's activations) or "expectation" (the 9-level expectation stream, "+EA")
    baseline_stream: str = "dense"

    def __post_init__(self):
        if not 0.0 <= self.target_sparsity <= 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1], got {self.target_sparsity}")
        if not 0.0 < self.step <= 1.0:
            raise ValueError(f"step must be in (0, 1], got {self.step}")
        if self.num_levels < 1 or self.num_levels % 2 == 0:
            raise ValueError(f"num_levels must be odd and positive (levels centre ± k·step), got {self.num_levels}")
        get_pruner(self.method)
        if self.baseline_stream not in ("dense", "expectation"):
            raise ValueError(f"baseline_stream must be dense or expectation, got {self.baseline_stream!r}")
        if self.refit not in REFITS:
            raise ValueError(f"refit must be one of {', '.join(REFITS)}, got {self.refit!r}")

    def hparams(self, kind: str) -> dict:
        if self.method != "tyr":
            return {}
        return {"damp": self.damp, "round_size": self.attn_round_size if kind == "attn" else self.mlp_round_size,
                "refit": self.refit}


def level_removals(num_units: int, centre: float, step: float, num_levels: int, min_step: int) -> tuple[int, ...]:
    """Units removed at each level: centre ± e·step in whole units (step ≥ min_step), clipped to [0, U]."""
    step_units = max(min(min_step, num_units), int(np.floor(step * num_units + 0.5)))
    centre_units = int(np.floor(centre * num_units + 0.5))
    half = num_levels // 2
    return tuple(int(np.clip(centre_units + e * step_units, 0, num_units)) for e in range(-half, half + 1))


def balanced_centres(num_layers: int, num_units: int, sparsity: float) -> list[float]:
    """Per-layer sparsities whose removed units add up to round(sparsity · L · U) exactly, as even as
    whole units allow (3 KV groups at 50% over 30 layers: 15 layers lose 1, 15 lose 2)."""
    total = int(np.floor(sparsity * num_layers * num_units + 0.5))
    base, extra = divmod(total, num_layers)
    more = set(np.floor((np.arange(extra) + 0.5) * num_layers / extra).astype(int)) if extra else set()
    return [(base + (i in more)) / num_units for i in range(num_layers)]


@dataclasses.dataclass(frozen=True)
class LevelPlan:
    """Removal counts of every sublayer: attn[l][e] KV groups and mlp[l][e] channels."""

    attn: tuple[tuple[int, ...], ...]
    mlp: tuple[tuple[int, ...], ...]

    @classmethod
    def centred(cls, cfg: ModelConfig, scfg: SupernetConfig, attn_centres=None, mlp_centres=None):
        """Levels around per-sublayer centre sparsities (default: the target, balanced over layers)."""
        n = cfg.num_layers
        if attn_centres is None:
            attn_centres = balanced_centres(n, cfg.num_kv_heads, scfg.target_sparsity)
        if mlp_centres is None:
            mlp_centres = balanced_centres(n, cfg.intermediate_size, scfg.target_sparsity)
        attn = tuple(level_removals(cfg.num_kv_heads, c, scfg.step, scfg.num_levels, scfg.min_step_kv_groups)
                     for c in attn_centres)
        mlp = tuple(level_removals(cfg.intermediate_size, c, scfg.step, scfg.num_levels, scfg.min_step_channels)
                    for c in mlp_centres)
        return cls(attn, mlp)

    def to_json(self) -> dict:
        """The removal counts as JSON lists (for fingerprints)."""
        return {"attn": [list(r) for r in self.attn], "mlp": [list(r) for r in self.mlp]}

    def level_arrays(self, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
        """The counts as int32 arrays [L, E] (attention, MLP), checked against `cfg`'s unit counts: what
        `prune_step` takes as data, row by row (traced counts cannot be checked there)."""
        out = []
        for kind, rows, units in (("attn", self.attn, cfg.num_kv_heads), ("mlp", self.mlp, cfg.intermediate_size)):
            counts = np.asarray(rows, np.int64)
            if counts.ndim != 2 or counts.shape[0] != cfg.num_layers:
                raise ValueError(f"the {kind} plan needs one row of counts per layer ({cfg.num_layers}), "
                                 f"got shape {counts.shape}")
            if counts.min() < 0 or counts.max() > units:
                raise ValueError(f"the {kind} plan's removal counts must lie in [0, {units}]")
            out.append(counts.astype(np.int32))
        return out[0], out[1]


def tokens_sha256(tokens: np.ndarray) -> str:
    """Digest of token windows (int32 bytes): what a fingerprint records of its calibration or fitness text."""
    return hashlib.sha256(np.ascontiguousarray(tokens, np.int32).tobytes()).hexdigest()


def expectation_weights(removals: tuple[int, ...], num_units: int) -> np.ndarray:
    """w_e = (1 − S_e) / Σ (1 − S_e'), all zero when every copy removes everything."""
    keep = 1.0 - np.asarray(removals, np.float64) / num_units
    return (keep / keep.sum() if keep.sum() > 0 else keep).astype(np.float32)


# -- jitted steps, each vmapped over a leading variant axis V ------------------------------------------
# A build makes the supernets of V configs that differ only in `VARIANT_FIELDS` in one pass (V = 1 for a
# plain run): activations are [V, B, T, D], statistics [V, I, I], and each step is one compiled call.


def _constrain(stats, shardings):
    return stats if shardings is None else jax.lax.with_sharding_constraint(stats, shardings)


@functools.partial(jax.jit, static_argnames=("cfg", "shardings"), donate_argnums=2)
def attn_stats_step(attn, x_vbtd, stats_v, rope, cfg, shardings=None):
    """Adds one batch's o_proj inputs of every variant to its statistics."""
    def one(x_btd, stats):
        ctx = llama.attention_context(attn, x_btd, cfg, rope)
        return accumulate_stats(stats, ctx.reshape(-1, ctx.shape[2] * ctx.shape[3] * ctx.shape[4]))

    return _constrain(jax.vmap(one)(x_vbtd, stats_v), shardings)


@functools.partial(jax.jit, static_argnames=("cfg", "shardings"), donate_argnums=2)
def mlp_stats_step(mlp_w, x_vbtd, stats_v, cfg, shardings=None):
    """Adds one batch's down_proj inputs of every variant to its statistics."""
    def one(x_btd, stats):
        hidden = llama.mlp_hidden(mlp_w, x_btd, cfg)
        return accumulate_stats(stats, hidden.reshape(-1, hidden.shape[-1]))

    return _constrain(jax.vmap(one)(x_vbtd, stats_v), shardings)


@functools.partial(jax.jit, static_argnames="cfg", donate_argnums=1)
def _attn_apply(attn, x_vbtd, w_vio, bias_vd, rope, cfg):
    """x + ctx · W (+ bias) with each variant's (averaged) output projection."""
    def one(x_btd, w_io, bias_d):
        ctx = llama.attention_context(attn, x_btd, cfg, rope)
        out = jnp.einsum("btc,cd->btd", ctx.reshape(ctx.shape[:2] + (-1,)), w_io)
        return x_btd + (out + bias_d).astype(x_btd.dtype)

    return jax.vmap(one)(x_vbtd, w_vio, bias_vd)


@functools.partial(jax.jit, static_argnames="cfg", donate_argnums=1)
def _mlp_apply(mlp_w, x_vbtd, w_vio, bias_vd, cfg):
    def one(x_btd, w_io, bias_d):
        hidden = llama.mlp_hidden(mlp_w, x_btd, cfg)
        return x_btd + (jnp.einsum("btf,fd->btd", hidden, w_io) + bias_d).astype(x_btd.dtype)

    return jax.vmap(one)(x_vbtd, w_vio, bias_vd)


@functools.partial(jax.jit, static_argnames=("method", "unit_size", "hparams"))
def prune_step(w_io, stats_v, traced_v, method, unit_size, removals_e, hparams):
    """The pruner on every variant's statistics, with its traced hyper-parameters `traced_v` ({name: [V]})
    and the shared static ones `hparams` ((name, value), ...): a LevelResult with a leading V axis.

    The removal counts `removals_e` (int32 [E], shared by the variants) are data, not part of the program:
    one compilation serves every layer and every coarse-to-fine iteration (`level_arrays`)."""
    pruner = get_pruner(method)

    def one(stats, traced):
        return pruner(w_io, stats, unit_size=unit_size, removals=removals_e, **traced, **dict(hparams))

    if stats_v.count.shape[0] == 1:   # one config: no batch axis inside the pruner (XLA's buffers as unbatched)
        return jax.tree.map(lambda a: a[None], one(*jax.tree.map(lambda a: a[0], (stats_v, traced_v))))
    return jax.vmap(one)(stats_v, traced_v)


def split_hparams(scfgs, kind: str) -> tuple[dict, tuple]:
    """The pruner hyper-parameters of the variants for `prune_step`: ({name: [V] fp32} traced (`damp`),
    ((name, value), ...) static, which every variant must share)."""
    hps = [s.hparams(kind) for s in scfgs]
    traced = {k: jnp.asarray([hp[k] for hp in hps], jnp.float32) for k in _TRACED_HPARAMS if k in hps[0]}
    static = [tuple(sorted((k, v) for k, v in hp.items() if k not in traced)) for hp in hps]
    if len(set(static)) != 1:
        raise ValueError(f"variants differ in static {kind} hyper-parameters; they cannot share one build")
    return traced, static[0]


def stats_shardings(mesh, d_in: int, variants: int | None = None) -> SublayerStats | None:
    """Where a sublayer's statistics live: Hessian rows over every device (`hessian` in the table), after
    a leading axis of `variants` when given."""
    if mesh is None:
        return None
    lead = () if variants is None else (variants,)
    hessian = logical_sharding(mesh, (None,) * len(lead) + ("hessian", None), lead + (d_in, d_in))
    return SublayerStats(hessian, replicated(mesh), replicated(mesh))


def zero_stats(d_in: int, mesh=None, variants: int | None = None) -> SublayerStats:
    """Zero statistics (with a leading axis of `variants` when given), created already sharded
    (`stats_shardings`) when a mesh is given."""
    def zeros():
        stats = SublayerStats.zeros(d_in)
        return stats if variants is None else jax.tree.map(lambda a: jnp.zeros((variants,) + a.shape, a.dtype), stats)

    if mesh is None:
        return zeros()
    return jax.jit(zeros, out_shardings=stats_shardings(mesh, d_in, variants))()


# -- compact copies -------------------------------------------------------------------------------


def compact_levels(result, unit_size: int) -> dict:
    """LevelResult → {"level_e": {"keep": bool[U], "w": kept rows, "bias"?}} on the host.

    A copy with no unit left stores only its mask (Orbax cannot store empty arrays)."""
    keep_eu, w_eio = to_host(result.keep_eu), to_host(result.w_eio)   # one transfer, no per-level programs
    out = {}
    for e, keep in enumerate(keep_eu):
        entry = {"keep": keep}
        rows = np.flatnonzero(np.repeat(keep, unit_size))
        if rows.size:
            entry["w"] = w_eio[e][rows]
        if result.bias_eo is not None:
            entry["bias"] = to_host(result.bias_eo[e])
        out[f"level_{e}"] = entry
    return out


def expand_level(entry: dict, unit_size: int, d_out: int, dtype) -> np.ndarray:
    """A stored copy back to the full [d_in, d_out] projection with zero rows for removed units."""
    rows = np.repeat(np.asarray(entry["keep"]), unit_size)
    w = np.zeros((rows.size, d_out), dtype)
    if "w" in entry:
        w[rows] = np.asarray(entry["w"])
    return w


def stacked_copies(levels: dict, unit_size: int, d_out: int, dtype) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored copies back in the pruner's layout: every level's full projection [E, I, O] (removed rows
    0) and its bias [E, O] (None without)."""
    entries = [levels[f"level_{e}"] for e in range(len(levels))]
    w_eio = np.stack([expand_level(entry, unit_size, d_out, dtype) for entry in entries])
    bias_eo = np.stack([np.asarray(e["bias"], dtype) for e in entries]) if "bias" in entries[0] else None
    return w_eio, bias_eo


@jax.jit
def _weighted_mean(x_e, weights_e):
    """Σ_e w_e x_e over the leading level axis, in fp32 (an elementwise sum, not a dot that could run in
    TF32), in the dtype of x."""
    w = weights_e.reshape((-1,) + (1,) * (x_e.ndim - 1))
    return jnp.sum(w * x_e.astype(jnp.float32), axis=0).astype(x_e.dtype)


# -- the store ------------------------------------------------------------------------------------


class SupernetStore(BlockStore):
    """The supernet's copies: per block {"attn": levels, "mlp": levels} (see `compact_levels`)."""

    holds = "a supernet built"


def fingerprint(cfg: ModelConfig, scfg: SupernetConfig, plan: LevelPlan, calib_tokens: np.ndarray,
                model_name: str, dtype) -> dict:
    return {
        "model": model_name,
        "model_config": cfg.to_hf(),
        "num_layers": cfg.num_layers,
        "dtype": jnp.dtype(dtype).name,
        "calibration_sha256": tokens_sha256(calib_tokens),
        "calibration_shape": list(calib_tokens.shape),
        "supernet": dataclasses.asdict(scfg),
        "levels": plan.to_json(),
    }


# -- building -------------------------------------------------------------------------------------


def calibration_batches(cfg: ModelConfig, calib_tokens: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The calibration sequences as int32 batches of `batch_size` (they must split evenly), after
    checking that `cfg` is a dense model (the supernet is built from it)."""
    if cfg.is_pruned:
        raise ValueError("the supernet is built from the dense model; got a model with pruned layer sizes")
    calib_tokens = np.asarray(calib_tokens, np.int32)
    if len(calib_tokens) == 0 or len(calib_tokens) % batch_size:
        raise ValueError(f"{len(calib_tokens)} calibration sequences do not split into batches of {batch_size}: "
                         "make calibration.num_sequences a positive multiple of calibration.batch_size")
    return [calib_tokens[i: i + batch_size] for i in range(0, len(calib_tokens), batch_size)]


def build_supernets(weights: llama.Weights, cfg: ModelConfig, calib_tokens: np.ndarray,
                    scfgs: Sequence[SupernetConfig], plan: LevelPlan, stores: Sequence[SupernetStore], *,
                    batch_size: int = 8, progress: bool = True, mesh=None,
                    timings: dict | None = None) -> list[SupernetStore]:
    """Builds (or finishes) every block's copies of V configs into their V stores, in one pass over the
    blocks; blocks that every store holds are replayed, not rebuilt.

    The configs may differ only in `VARIANT_FIELDS` (`damp`, a traced number inside the pruner, and
    `expectation`, which only chooses what a variant hands on): activations carry a leading variant axis
    and each block's statistics, pruner call and propagation are one compiled call vmapped over it.
    Variant v's statistics come from its own Eq. 5 propagation, so store v ends up holding what building
    config v alone writes (same fingerprint; up to fp32 rounding of batched matmuls). `build_supernet`
    is the case V = 1.

    With a `mesh` (weights already placed by `sharding.weight_shardings`), the calibration sequences of
    every batch are split over `data` (`batch_size` must be a multiple of its size) and the weights'
    heads and channels over `model`; a sublayer's statistics are summed across all devices and kept with
    their rows split over every device (`stats_shardings`), and the pruner runs on those row shards
    (XLA partitions its row updates; the Cholesky refits gather the matrix). The copies are the same
    as on one device up to floating-point summation order.

    `timings`, if given, accumulates seconds the host waits for the pruners' copies and compacts them
    (`prune_s`; the device propagates meanwhile), spends in Orbax writes (`save_s`) and in total
    (`total_s`)."""
    num = len(scfgs)
    if num < 1 or len(stores) != num:
        raise ValueError(f"{num} configs but {len(stores)} stores")
    neutral = {name: getattr(SupernetConfig(), name) for name in VARIANT_FIELDS}
    if len({dataclasses.replace(s, **neutral) for s in scfgs}) != 1:
        raise ValueError(f"the configs of one build may differ only in {', '.join(VARIANT_FIELDS)}")
    timings = {} if timings is None else timings
    for name in ("prune_s", "save_s", "total_s"):
        timings.setdefault(name, 0.0)
    chunks = calibration_batches(cfg, calib_tokens, batch_size)
    d, g, h = cfg.hidden_size, cfg.q_per_kv, cfg.head_dim
    if mesh is not None and batch_size % mesh.shape["data"]:
        raise ValueError(f"calibration batch size {batch_size} is not a multiple of mesh.data = {mesh.shape['data']}")
    attn_in, mlp_in, attn_unit = cfg.num_kv_heads * g * h, cfg.intermediate_size, g * h
    dtype = weights.blocks[0].mlp.down_fd.dtype
    method = scfgs[0].method
    attn_hp, mlp_hp = split_hparams(scfgs, "attn"), split_hparams(scfgs, "mlp")
    expectations = [s.expectation for s in scfgs]
    attn_removals, mlp_removals = plan.level_arrays(cfg)   # data for prune_step: one program for every layer
    rope = llama.rope_tables(cfg, llama.default_positions(put_batch(chunks[0], mesh)))
    xs = [_variants(llama.embed(weights, put_batch(c, mesh)), num, mesh) for c in chunks]  # batch over `data`
    done = min(store.finished_blocks() for store in stores)
    if done and progress:
        print(f"resuming supernet at block {done + 1}/{cfg.num_layers}" if done < cfg.num_layers else
              f"supernet complete ({done}/{done} blocks stored): replaying its propagation")
    bar = tqdm(range(cfg.num_layers), desc="supernet" if num == 1 else f"supernet ×{num} (vmap)", unit="block",
               disable=not progress)
    for i in bar:
        start = time.perf_counter()
        blk = weights.blocks[i]
        missing = [v for v in range(num) if not stores[v].has_block(i)]
        stored = [{} if v in missing else stores[v].load_block(i) for v in range(num)]
        # Attention: statistics of the o_proj inputs, copies, then hand on the expectation. The device
        # propagates while the host compacts the copies and writes them (`_compact`, Orbax).
        result = None
        if missing:
            stats = zero_stats(attn_in, mesh, num)
            for x in xs:
                stats = attn_stats_step(blk.attn, x, stats, rope, cfg, stats_shardings(mesh, attn_in, num))
            result = _pruned(blk.attn.o_kghd.reshape(-1, d), stats, attn_hp, method, attn_unit, attn_removals[i])
        copies = _copies(result, stored, missing, expectations, "attn", attn_unit, d, dtype)
        xs = propagate_attention(blk, copies, plan.attn[i], xs, rope, cfg, expectations)
        if missing:
            t0 = time.perf_counter()
            for v, levels in _compact(result, attn_unit, missing):
                stored[v]["attn"] = levels
            timings["prune_s"] += time.perf_counter() - t0
        # MLP, on the activations the attention sublayer handed on.
        if missing:
            stats = zero_stats(mlp_in, mesh, num)
            for x in xs:
                stats = mlp_stats_step(blk.mlp, x, stats, cfg, stats_shardings(mesh, mlp_in, num))
            result = _pruned(blk.mlp.down_fd, stats, mlp_hp, method, 1, mlp_removals[i])
        copies = _copies(result, stored, missing, expectations, "mlp", 1, d, dtype)
        xs = propagate_mlp(blk, copies, plan.mlp[i], xs, cfg, expectations)
        if missing:
            t0 = time.perf_counter()
            for v, levels in _compact(result, 1, missing):
                stored[v]["mlp"] = levels
            timings["prune_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            for v in missing:
                stores[v].save_block(i, stored[v])
            timings["save_s"] += time.perf_counter() - t0
        jax.block_until_ready(xs)
        timings["total_s"] += time.perf_counter() - start
        bar.set_postfix(block_s=f"{time.perf_counter() - start:.1f}")
    return list(stores)


def build_supernet(weights: llama.Weights, cfg: ModelConfig, calib_tokens: np.ndarray, scfg: SupernetConfig,
                   plan: LevelPlan, store: SupernetStore, **kwargs) -> SupernetStore:
    """Builds (or finishes) one config's supernet into `store`: `build_supernets` with V = 1 (same
    keyword arguments)."""
    return build_supernets(weights, cfg, calib_tokens, [scfg], plan, [store], **kwargs)[0]


def _variants(x_btd, num: int, mesh):
    """Activations [B, T, D] → [V, B, T, D], the batch still split over `data`."""
    x_vbtd = jnp.broadcast_to(x_btd[None], (num,) + x_btd.shape)
    return x_vbtd if mesh is None else jax.device_put(x_vbtd, NamedSharding(mesh, P(None, "data", None, None)))


def _pruned(w_io, stats, hparams, method, unit_size, removals_e):
    """`prune_step`, with the copies' transfer to the host started as soon as they exist, so that it
    overlaps the propagation that follows."""
    result = prune_step(w_io, stats, hparams[0], method, unit_size, removals_e, hparams[1])
    for a in jax.tree.leaves(result):
        if a.is_fully_addressable:
            a.copy_to_host_async()
    return result


def _copies(result, stored, missing, expectations, kind: str, unit_size: int, d_out: int, dtype) -> list:
    """Every variant's copies of one sublayer, (W [E, I, O], bias [E, O] or None): the pruner's `result`
    for the variants it built (`missing`), the stored copies for the others; None for a variant that
    propagates the dense output (its copies are not read)."""
    def one(v):
        if not expectations[v]:
            return None
        if v in missing:
            return result.w_eio[v], None if result.bias_eo is None else result.bias_eo[v]
        return stacked_copies(stored[v][kind], unit_size, d_out, dtype)

    return [one(v) for v in range(len(stored))]


def _compact(result, unit_size: int, variants: list[int]):
    """(v, `compact_levels` of variant v) for the given variants of a LevelResult with a leading V axis
    (one transfer to the host)."""
    host = LevelResult(to_host(result.keep_eu), to_host(result.w_eio),
                       None if result.bias_eo is None else to_host(result.bias_eo))
    for v in variants:
        yield v, compact_levels(jax.tree.map(lambda a: a[v], host), unit_size)


def propagate_attention(blk: llama.Block, copies_v: Sequence[tuple], removals, xs, rope, cfg: ModelConfig,
                        expectation_v: Sequence[bool]):
    """Hands on X + attn(X) of every variant v (activations [V, B, T, D]) with the expectation over its
    copies `copies_v[v]` = (W [E, I, O], bias [E, O] or None) (Eq. 5), or dense where `expectation_v[v]` is
    False (its copies may be None)."""
    w_vio, b_vd = _propagation_weights(copies_v, blk.attn.o_kghd.reshape(-1, cfg.hidden_size), blk.attn.o_bias_d,
                                       removals, cfg.num_kv_heads, expectation_v)
    return [_attn_apply(blk.attn, x, w_vio, b_vd, rope, cfg) for x in xs]


def propagate_mlp(blk: llama.Block, copies_v: Sequence[tuple], removals, xs, cfg: ModelConfig,
                  expectation_v: Sequence[bool]):
    """Hands on X + mlp(X) of every variant v with the expectation over its copies (Eq. 5), or dense."""
    w_vio, b_vd = _propagation_weights(copies_v, blk.mlp.down_fd, blk.mlp.down_bias_d, removals,
                                       cfg.intermediate_size, expectation_v)
    return [_mlp_apply(blk.mlp, x, w_vio, b_vd, cfg) for x in xs]


def _propagation_weights(copies_v, w_dense, bias_dense, removals, num_units, expectation_v):
    """Every variant's (W̄, b̄), stacked ([V, I, O], [V, O]): the expectation over its copies on the
    device, W̄ = Σ_e w_e W_e, b̄ = Σ_e w_e b_e (+ the dense bias), or the dense projection for the
    ablation."""
    weights_e = jnp.asarray(expectation_weights(removals, num_units))
    spread = len(w_dense.sharding.device_set) > 1
    dense_bias = jnp.zeros((w_dense.shape[1],), w_dense.dtype) if bias_dense is None else bias_dense
    w_v, b_v = [], []
    for copies, expectation in zip(copies_v, expectation_v, strict=True):
        if not expectation:
            w_v.append(w_dense)
            b_v.append(dense_bias)
            continue
        w_eio, bias_eo = copies
        w_bar = _weighted_mean(jnp.asarray(w_eio), weights_e)
        # W̄ is placed once like the projection it stands in for (not re-sent with every batch).
        w_v.append(jax.device_put(w_bar, w_dense.sharding) if spread else w_bar)
        b_v.append(dense_bias if bias_eo is None else _weighted_mean(jnp.asarray(bias_eo), weights_e) + dense_bias)
    return jnp.stack(w_v), jnp.stack(b_v)


# -- assembling a model from chosen copies ----------------------------------------------------------


def assemble(weights: llama.Weights, cfg: ModelConfig, store: SupernetStore, attn_level: list[int],
             mlp_level: list[int]) -> tuple[llama.Weights, ModelConfig]:
    """The physically smaller model that uses copy attn_level[l] / mlp_level[l] of every sublayer."""
    g, h, d = cfg.q_per_kv, cfg.head_dim, cfg.hidden_size
    blocks, kv_sizes, mlp_sizes = [], [], []
    for i, blk in enumerate(weights.blocks):
        stored = store.load_block(i)
        a, m = stored["attn"][f"level_{attn_level[i]}"], stored["mlp"][f"level_{mlp_level[i]}"]
        kv_keep, mlp_keep = np.flatnonzero(a["keep"]), np.flatnonzero(m["keep"])
        small = llama.slice_block(blk, kv_keep, mlp_keep)
        dtype = blk.attn.o_kghd.dtype
        o = jnp.asarray(a["w"], dtype).reshape(-1, g, h, d) if "w" in a else small.attn.o_kghd
        down = jnp.asarray(m["w"], dtype) if "w" in m else small.mlp.down_fd
        attn = dataclasses.replace(small.attn, o_kghd=o, o_bias_d=_add_bias(small.attn.o_bias_d, a.get("bias"), d, dtype))
        mlp_w = dataclasses.replace(small.mlp, down_fd=down,
                                    down_bias_d=_add_bias(small.mlp.down_bias_d, m.get("bias"), d, dtype))
        blocks.append(llama.Block(attn=attn, mlp=mlp_w))
        kv_sizes.append(len(kv_keep))
        mlp_sizes.append(len(mlp_keep))
    new_cfg = cfg.with_layer_sizes(kv_sizes, mlp_sizes)
    if any(b.attn.o_bias_d is not None for b in blocks) and not new_cfg.o_bias:
        new_cfg = dataclasses.replace(new_cfg, o_bias=True)
    if any(b.mlp.down_bias_d is not None for b in blocks) and not (new_cfg.mlp_bias or new_cfg.down_bias):
        new_cfg = dataclasses.replace(new_cfg, down_bias=True)
    return dataclasses.replace(weights, blocks=blocks), new_cfg


def _add_bias(bias, extra, d, dtype):
    if extra is None:
        return bias
    extra = jnp.asarray(extra, dtype)
    return extra if bias is None else bias + extra
