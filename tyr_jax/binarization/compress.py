"""PBS²P over a whole model (ALGORITHMS.md §3): every linear of every decoder block → 1-bit weights with
N:M sparsity, block after block in GPTQ order, resumable.

Block ℓ's calibration inputs are the outputs of the blocks before it, already compressed. Inside the
block a linear is compressed once its input is known: q/k/v (one H from the normed input), then o
(H of the attention context), then gate/up, then down (`linear.compress_linear` for each). Every
finished block is saved packed (`packed.pack`) with Orbax under `<out>/pbs2p/block_###`; a killed run
replays the saved blocks and continues after them.

Coarse stage (CFS): with `cfs` on (variant `pbs2p`), block ℓ keeps N_ℓ of M from its importance
1 / cos(x_in, x_out) on the dense model's calibration activations (`nm.cfs_block_n`); the N per block
is fixed at the first run and stored in `plan.json`, so a resumed run uses the same.

Bits per weight, reported three ways: `paper_convention` N/M × 1.1 (the papers count the ~1.1 bits of
BiLLM-style binarization times the kept fraction, signs and scales but no mask positions);
`signs_and_scales` (bits of the stored signs, α and μ); `file` (every byte the projections take in the
exported file, masks included) — all over the number of weights compressed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from tyr_jax.binarization import nm, packed
from tyr_jax.binarization.linear import (SPBO_METRICS, VARIANTS, BinaryLinear, check_pattern, check_settings,
                                         compress_linear)
from tyr_jax.checkpointing import BlockStore
from tyr_jax.distributed import is_primary
from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig
from tyr_jax.pruning import SublayerStats, accumulate_stats
from tyr_jax.sharding import logical_sharding, put_batch, replicated
from tyr_jax.supernet import calibration_batches, tokens_sha256


@dataclasses.dataclass(frozen=True)
class Pbs2pConfig:
    """The `pbs2p:` section of a run config (`method: pbs2p`)."""

    variant: str = "pbs2p"          # pbs2p | nm_then_binarize (baseline) | binarize (no pruning, baseline)
    n: int = 6                      # N:M target: keep N of every M consecutive inputs of a row
    m: int = 8
    block_size: int = 128           # input columns per α, μ and per error-feedback step
    damp: float = 0.01
    arb_iters: int = 15             # ARB refinement rounds per binarization
    spbo_steps: int | None = None   # SPBO steps to reach N:M (default, and at most, M − N; 1: all at once)
    spbo_metric: str = "error"      # what each SPBO step prunes next: error | saliency (linear.py)
    cfs: bool = True                # coarse stage: N per block from its importance (variant pbs2p)
    cfs_low: int | None = None      # bounds of a block's N (default N − 1 and N + 1, within [1, M])
    cfs_high: int | None = None
    dense_blocks: tuple[int, ...] = ()   # blocks left in full precision (default none: every block)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"pbs2p.variant {self.variant!r} is unknown; choose one of {', '.join(VARIANTS)}")
        if self.spbo_metric not in SPBO_METRICS:
            raise ValueError(f"pbs2p.spbo_metric {self.spbo_metric!r} is unknown; choose one of "
                             f"{', '.join(SPBO_METRICS)}")
        check_pattern(self.n, self.m, self.block_size)
        if self.arb_iters < 0 or not self.damp >= 0:
            raise ValueError("pbs2p.arb_iters and pbs2p.damp must not be negative")
        if self.spbo_steps is not None and not 1 <= self.spbo_steps <= max(self.m - self.n, 1):
            raise ValueError(f"pbs2p.spbo_steps must lie in [1, M − N = {self.m - self.n}], got {self.spbo_steps}")
        if any(not isinstance(b, int) or isinstance(b, bool) or b < 0 for b in self.dense_blocks):
            raise ValueError(f"pbs2p.dense_blocks must be block indices (integers >= 0), got {self.dense_blocks}")
        low, high = self.bounds
        if not 1 <= low <= self.n <= high <= self.m:
            raise ValueError(f"pbs2p.cfs_low / cfs_high must satisfy 1 <= low <= N <= high <= M, got "
                             f"[{low}, {high}] for {self.n}:{self.m}")

    @property
    def bounds(self) -> tuple[int, int]:
        low = max(self.n - 1, 1) if self.cfs_low is None else self.cfs_low
        high = min(self.n + 1, self.m) if self.cfs_high is None else self.cfs_high
        return low, high

    @property
    def target_n(self) -> int:
        """N every compressed block takes without CFS (M for `binarize`: nothing pruned)."""
        return self.m if self.variant == "binarize" else self.n

    @property
    def uses_cfs(self) -> bool:
        return self.variant == "pbs2p" and self.cfs and self.n < self.m

    def linear_args(self, n: int) -> dict:
        """Keyword arguments of `compress_linear` for a block with N = `n` (SPBO takes at most M − N steps:
        a block that CFS gives a larger N takes fewer)."""
        n = self.m if self.variant == "binarize" else n
        steps = None if self.spbo_steps is None or n == self.m else min(self.spbo_steps, self.m - n)
        return {"variant": self.variant, "n": n, "m": self.m, "block_size": self.block_size, "damp": self.damp,
                "arb_iters": self.arb_iters, "spbo_steps": steps, "spbo_metric": self.spbo_metric}


class Pbs2pStore(BlockStore):
    """Per block {proj: packed arrays}; `plan.json` holds the N of every block."""

    holds = "a PBS²P compression built"


def fingerprint(cfg: ModelConfig, pcfg: Pbs2pConfig, calib_tokens: np.ndarray, model_name: str, dtype) -> dict:
    return {"model": model_name, "model_config": cfg.to_hf(), "num_layers": cfg.num_layers,
            "dtype": jnp.dtype(dtype).name, "calibration_sha256": tokens_sha256(calib_tokens),
            "calibration_shape": list(calib_tokens.shape), "pbs2p": dataclasses.asdict(pcfg)}


# -- the block's linears in [O, I] layout ------------------------------------------------------------

# The linears of a block by their input, in GPTQ order (each group shares one H).
INPUT_GROUPS = (("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")), ("o", ("self_attn.o_proj",)),
                ("gate_up", ("mlp.gate_proj", "mlp.up_proj")), ("down", ("mlp.down_proj",)))


def block_linears(blk: llama.Block) -> dict:
    """The block's 7 weights by HF name, in [O, I] layout."""
    a, m = blk.attn, blk.mlp
    d = a.norm_d.shape[0]
    return {"self_attn.q_proj": a.q_dkgh.reshape(d, -1).T, "self_attn.k_proj": a.k_dkh.reshape(d, -1).T,
            "self_attn.v_proj": a.v_dkh.reshape(d, -1).T, "self_attn.o_proj": a.o_kghd.reshape(-1, d).T,
            "mlp.gate_proj": m.gate_df.T, "mlp.up_proj": m.up_df.T, "mlp.down_proj": m.down_fd.T}


def _with_linears(blk: llama.Block, new: dict) -> llama.Block:
    """`blk` with the given [O, I] weights (in the block's dtype) put back in our layouts."""
    a, m = blk.attn, blk.mlp
    put = lambda name, like: jnp.asarray(new[name].T, like.dtype).reshape(like.shape) if name in new else like  # noqa: E731
    attn = dataclasses.replace(a, q_dkgh=put("self_attn.q_proj", a.q_dkgh), k_dkh=put("self_attn.k_proj", a.k_dkh),
                               v_dkh=put("self_attn.v_proj", a.v_dkh), o_kghd=put("self_attn.o_proj", a.o_kghd))
    mlp_w = dataclasses.replace(m, gate_df=put("mlp.gate_proj", m.gate_df), up_df=put("mlp.up_proj", m.up_df),
                                down_fd=put("mlp.down_proj", m.down_fd))
    return llama.Block(attn=attn, mlp=mlp_w)


# -- jitted steps ----------------------------------------------------------------------------------


def _inputs(blk: llama.Block, x, rope, cfg: ModelConfig, where: str):
    """The inputs [N, I] of the linears at `where` for block inputs x [B, T, D]."""
    if where == "qkv":
        h = llama.rms_norm(x, blk.attn.norm_d, cfg.rms_norm_eps)
    elif where == "o":
        h = llama.attention_context(blk.attn, x, cfg, rope)
    elif where == "gate_up":
        h = llama.rms_norm(x, blk.mlp.norm_d, cfg.rms_norm_eps)
    else:
        h = llama.mlp_hidden(blk.mlp, x, cfg)
    return h.reshape(-1, int(np.prod(h.shape[2:])))


@functools.partial(jax.jit, static_argnames=("cfg", "where"), donate_argnums=2)
def input_stats(blk, x, stats, rope, cfg, where):
    return accumulate_stats(stats, _inputs(blk, x, rope, cfg, where))


@functools.partial(jax.jit, static_argnames="cfg", donate_argnums=1)
def _attn_step(blk, x, rope, cfg):
    return x + llama.attention(blk.attn, x, cfg, rope)


@functools.partial(jax.jit, static_argnames="cfg", donate_argnums=1)
def _mlp_step(blk, x, cfg):
    return x + llama.mlp(blk.mlp, x, cfg)


@functools.partial(jax.jit, static_argnames="cfg")
def _block_cosine(blk, x, rope, cfg):
    """Σ over tokens of cos(x_in, x_out) for one block, and x_out."""
    y = llama.block(blk, x, cfg, rope)
    a, b = x.astype(jnp.float32), y.astype(jnp.float32)
    cos = jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)
    return jnp.sum(cos), y


def block_importance(weights: llama.Weights, cfg: ModelConfig, xs: list, rope) -> np.ndarray:
    """1 / mean cos(x_in, x_out) of every block on the dense model's calibration activations."""
    tokens = sum(x.shape[0] * x.shape[1] for x in xs)
    importance = []
    for blk in weights.blocks:
        total, outs = 0.0, []
        for x in xs:
            s, y = _block_cosine(blk, x, rope, cfg)
            total, outs = total + float(s), outs + [y]
        xs = outs
        importance.append(tokens / total)
    return np.asarray(importance)


# -- the whole model -------------------------------------------------------------------------------


def block_n(weights: llama.Weights, cfg: ModelConfig, xs: list, rope, pcfg: Pbs2pConfig,
            store: Pbs2pStore) -> list[int | None]:
    """N of every block (None: left dense): fixed at the first run (`plan.json` in the store), from CFS
    over the compressed blocks or the target."""
    path = store.root / "plan.json"
    if path.exists():
        return json.loads(path.read_text())["n_per_layer"]
    importance = None
    compressed = [i for i in range(cfg.num_layers) if i not in pcfg.dense_blocks]
    ns: list[int | None] = [None] * cfg.num_layers
    if pcfg.uses_cfs:
        importance = block_importance(weights, cfg, xs, rope)
        for i, n in zip(compressed, nm.cfs_block_n(importance[compressed], pcfg.n, *pcfg.bounds)):
            ns[i] = n
    else:
        for i in compressed:
            ns[i] = pcfg.target_n
    if is_primary():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"n_per_layer": ns, "importance": None if importance is None else
                                   [float(v) for v in importance]}, indent=1))
        tmp.replace(path)
    return ns


def compress_model(weights: llama.Weights, cfg: ModelConfig, calib_tokens: np.ndarray, pcfg: Pbs2pConfig,
                   store: Pbs2pStore, *, batch_size: int = 8, progress: bool = True, mesh=None,
                   timings: dict | None = None):
    """Compresses every block (or finishes a killed run) into `store`.

    Returns (weights with every linear replaced by its binary reconstruction, packed blocks
    [{proj: arrays}, None for a dense block] for `packed.export_binary`, N per block (None: dense)). With
    a `mesh`, calibration batches are split over `data` and each weight's rows (outputs, independent in
    GPTQ) over every device.
    `timings`, if given, accumulates seconds in statistics + propagation (`stats_s`), in the compressor
    (`compress_s`), in Orbax writes (`save_s`) and in total (`total_s`)."""
    if cfg.is_pruned:
        raise ValueError("PBS²P compresses a dense-shaped model; got one with pruned layer sizes")
    if any(b >= cfg.num_layers for b in pcfg.dense_blocks):
        raise ValueError(f"pbs2p.dense_blocks {list(pcfg.dense_blocks)}: the model has blocks 0-{cfg.num_layers - 1}")
    for name, w in block_linears(weights.blocks[0]).items():
        try:
            check_settings(w.shape[1], pcfg.n, pcfg.m, pcfg.block_size)
        except ValueError as e:
            raise ValueError(f"{e} ({name} has {w.shape[1]} inputs)") from None
    timings = {} if timings is None else timings
    for key in ("stats_s", "compress_s", "save_s", "total_s"):
        timings.setdefault(key, 0.0)
    chunks = calibration_batches(cfg, calib_tokens, batch_size)
    rope = llama.rope_tables(cfg, llama.default_positions(put_batch(chunks[0], mesh)))
    xs = [llama.embed(weights, put_batch(c, mesh)) for c in chunks]
    ns = block_n(weights, cfg, xs, rope, pcfg, store)
    done = store.finished_blocks()
    if done and progress:
        print(f"pbs2p: all {done} blocks saved in {store.root}; replaying them" if done == cfg.num_layers else
              f"pbs2p: resuming at block {done + 1}/{cfg.num_layers} ({done} saved in {store.root})")
    blocks, packed_layers = [], []
    bar = tqdm(range(cfg.num_layers), desc=f"pbs2p ({pcfg.variant})", unit="block", disable=not progress)
    for i in bar:
        start = time.perf_counter()
        blk = weights.blocks[i]
        stored = store.load_block(i) if store.has_block(i) else None
        if ns[i] is not None and stored is None:
            stored = {}
            blk, xs = _compress_block(blk, xs, rope, cfg, pcfg.linear_args(ns[i]), stored, mesh, timings)
            t0 = time.perf_counter()
            store.save_block(i, stored)
            timings["save_s"] += time.perf_counter() - t0
        else:                        # a saved block, or one left dense: replayed
            if ns[i] is None:
                if stored is None:   # saved all the same, so a resumed run counts it done
                    store.save_block(i, {"dense": np.ones((1,), np.int8)})
                stored = None
            else:
                blk = _with_linears(blk, {p: packed.unpack(stored[p], packed.projection_shape(cfg, i, p)).dense(
                    pcfg.block_size) for p in packed.PROJECTIONS})
            xs = [_mlp_step(blk, _attn_step(blk, x, rope, cfg), cfg) for x in xs]
        blocks.append(blk)
        packed_layers.append(stored)
        jax.block_until_ready(xs)
        timings["total_s"] += time.perf_counter() - start
        bar.set_postfix(N="dense" if ns[i] is None else f"{ns[i]}:{pcfg.m}",
                        block_s=f"{time.perf_counter() - start:.1f}")
    return dataclasses.replace(weights, blocks=blocks), packed_layers, ns


def _compress_block(blk, xs, rope, cfg, args: dict, stored: dict, mesh, timings: dict):
    """Compresses one block's linears in GPTQ order on its inputs xs; fills `stored` with packed arrays.
    Returns (the compressed block, its outputs).

    Linears that share an input (q/k/v, gate/up) are compressed as one matrix of stacked rows: GPTQ,
    ARB and N:M all act row by row given the one H, so this equals compressing each alone, with one
    factorisation of H and larger kernels."""
    dense = block_linears(blk)     # no group's weights change before the group is compressed
    for where, names in INPUT_GROUPS:
        if where == "gate_up":   # the MLP sees the output of the compressed attention sublayer
            xs = [_attn_step(blk, x, rope, cfg) for x in xs]
        t0 = time.perf_counter()
        ws = [dense[name] for name in names]
        stats = SublayerStats.zeros(ws[0].shape[1])
        for x in xs:
            stats = input_stats(blk, x, stats, rope, cfg, where)
        hessian = stats.hessian_ii if mesh is None else jax.device_put(stats.hessian_ii, replicated(mesh))
        jax.block_until_ready(hessian)
        t1 = time.perf_counter()
        timings["stats_s"] += t1 - t0
        w = jnp.concatenate(ws, axis=0)
        if mesh is not None:   # GPTQ rows are independent: split them over every device
            w = jax.device_put(w, logical_sharding(mesh, ("hessian", None), w.shape))
        lin = compress_linear(w, hessian, **args)
        ends = np.cumsum([x.shape[0] for x in ws])
        new = {}
        for name, start, end in zip(names, [0, *ends[:-1]], ends):
            rows = BinaryLinear(*(a[start:end] for a in lin))
            new[name] = rows.dense(args["block_size"])
            stored[name] = packed.pack(rows)
        blk = _with_linears(blk, new)
        timings["compress_s"] += time.perf_counter() - t1
    return blk, [_mlp_step(blk, x, cfg) for x in xs]
