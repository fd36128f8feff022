"""Evolutionary search of the sparsity distribution (ALGORITHMS.md §1.3).

State: one level index per sublayer. A "sparsity shift" moves one sublayer a level down and another of
the same type a level up, and is kept only if the unit count of that type is unchanged, so every
candidate has exactly the parameter budget of the parent. (1+λ) with the parent kept; staged
selection, each stage on a fresh random minibatch of the fitness pool:

    λ offspring on n₁ tokens → best k₂ on n₂ tokens → best k₃ + parent on n₃ tokens → next parent.

Fitness: KL(dense ‖ candidate) over the dense model's top-k next-token logits (log-softmax over those k
for both; mean over tokens; the last position of a window is not scored). The dense top-k of the pool
is computed once. Candidates are evaluated many per compiled call: each sublayer gathers its copy from
stacked levels (`LevelBank`, [L, E, ...]) by its layer and the candidate's level index, and the layers are
a `lax.scan` over the layer index with the dense layers stacked (`search_weights`), so the compiled
program is one layer whatever the depth. An offspring differs from its parent in a
few sublayers, so it is run only from its first changed sublayer on, starting from the parent's
residual stream there (`candidates_kl`); on Llama-3.1-8B shapes a generation took 0.76 of the time of
running every candidate in full with the layers unrolled (BENCHMARKS.md, search speed). The lm_head runs over chunks of
`logit_chunk` tokens (`over_token_chunks`), each chunk reduced to its top-k entries (the dense top-k, or a
candidate's KL) before the next: a call holds chunk × vocab fp32 logits per candidate, never
tokens × vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from tyr_jax.distributed import claim_directory
from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig
from tyr_jax.sharding import batch_sharding, data_size, replicated, stack_layers, to_host, weight_shardings
from tyr_jax.supernet import LevelPlan, SupernetStore, expand_level, tokens_sha256


# Tokens whose logits the fitness holds at once, per candidate (`SearchConfig.logit_chunk`): 512 × a 128k
# vocabulary is 0.26 GB of fp32 logits (a whole 2,048-token window: 1.05 GB), and a [512, D] × [D, V]
# matmul per chunk is still a large one. Not measured for speed on an accelerator yet.
LOGIT_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    generations: int = 50
    offspring: int = 128
    stage_candidates: tuple[int, int] = (16, 4)          # survivors of stage 1 and stage 2
    stage_tokens: tuple[int, int, int] = (2048, 16384, 131072)
    top_k: int = 8192
    pool_sequences: int = 512                            # fitness pool (windows of `seq_len`)
    seq_len: int = 512
    token_batch: int = 4                                 # a compiled call holds candidate_batch × token_batch
    candidate_batch: int = 16                            # (candidate, window) pairs: the memory budget
    logit_chunk: int = LOGIT_CHUNK                       # tokens per lm_head chunk: chunk × vocab fp32 logits
    max_flips: int = 4
    iterations: int = 4                                  # coarse-to-fine iterations (Δ halves each time)
    seed: int = 0

    def __post_init__(self):
        if self.offspring < self.stage_candidates[0] or self.stage_candidates[0] < self.stage_candidates[1]:
            raise ValueError("search needs offspring >= stage_candidates[0] >= stage_candidates[1]")
        for n in self.stage_tokens:
            if n % self.seq_len or n == 0:
                raise ValueError(f"stage_tokens {n} must be a positive multiple of seq_len = {self.seq_len}")
        if max(self.stage_tokens) > self.pool_sequences * self.seq_len:
            raise ValueError(f"the fitness pool ({self.pool_sequences} × {self.seq_len} tokens) is smaller than "
                             f"the last stage ({max(self.stage_tokens)} tokens)")
        if self.generations < 0 or self.top_k < 1 or self.iterations < 0:
            raise ValueError("generations and iterations must be >= 0, top_k >= 1")
        if self.logit_chunk < 1:
            raise ValueError(f"search.logit_chunk must be a positive number of tokens, got {self.logit_chunk}")


# -- the copies, stacked for gathering ---------------------------------------------------------


def _bank_axes(*names):
    return dataclasses.field(metadata={"axes": names})


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["o_le", "attn_keep_le", "attn_bias_le", "down_le", "mlp_keep_le", "mlp_bias_le"],
                   meta_fields=[])
@dataclasses.dataclass
class LevelBank:
    """Every copy of every sublayer at full (dense) shape, removed rows zero, stacked [L, E, ...] (layer,
    copy), with logical axes for `sharding.weight_shardings` (rows split over `model` like the projection
    they replace; layers and copies whole)."""

    o_le: jax.Array = _bank_axes("kv", "embed")          # [L, E, K·G·H, D]
    attn_keep_le: jax.Array = _bank_axes("kv")           # [L, E, K]
    attn_bias_le: jax.Array = _bank_axes("embed")        # [L, E, D] (zeros unless the pruner adds one)
    down_le: jax.Array = _bank_axes("mlp", "embed")      # [L, E, F, D]
    mlp_keep_le: jax.Array = _bank_axes("mlp")           # [L, E, F]
    mlp_bias_le: jax.Array = _bank_axes("embed")         # [L, E, D]


def abstract_bank(cfg: ModelConfig, num_levels: int, dtype) -> LevelBank:
    """`jax.ShapeDtypeStruct`s of the bank of a dense `cfg` (for `jax.eval_shape` and memory plans)."""
    le, d, f = (cfg.num_layers, num_levels), cfg.hidden_size, cfg.intermediate_size
    k, kgh = cfg.num_kv_heads, cfg.num_kv_heads * cfg.q_per_kv * cfg.head_dim
    s = lambda *shape, t=dtype: jax.ShapeDtypeStruct(le + shape, t)  # noqa: E731
    return LevelBank(s(kgh, d), s(k, t=jnp.float32), s(d), s(f, d), s(f, t=jnp.float32), s(d))


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(bank: LevelBank, layer: LevelBank, i):
    return jax.tree.map(lambda b, x: b.at[i].set(x), bank, layer)


def load_bank(store: SupernetStore, cfg: ModelConfig, num_levels: int, dtype, mesh=None) -> LevelBank:
    """The stored copies, expanded to dense shape one layer at a time into the stacked bank (placed on
    `mesh` by the table; the bank is written in place, one layer's copies on the host at a time)."""
    g_h, d = cfg.q_per_kv * cfg.head_dim, cfg.hidden_size
    shapes = abstract_bank(cfg, num_levels, dtype)
    shardings = None if mesh is None else weight_shardings(shapes, mesh)
    bank = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes), out_shardings=shardings)()
    for i in range(cfg.num_layers):
        blk = store.load_block(i)
        levels = [(blk["attn"][f"level_{e}"], blk["mlp"][f"level_{e}"]) for e in range(num_levels)]
        layer = {"o_le": [expand_level(a, g_h, d, np.float32) for a, _ in levels],
                 "attn_keep_le": [a["keep"] for a, _ in levels],
                 "attn_bias_le": [a.get("bias", np.zeros(d, np.float32)) for a, _ in levels],
                 "down_le": [expand_level(m, 1, d, np.float32) for _, m in levels],
                 "mlp_keep_le": [m["keep"] for _, m in levels],
                 "mlp_bias_le": [m.get("bias", np.zeros(d, np.float32)) for _, m in levels]}
        layer = LevelBank(**{name: np.asarray(v).astype(getattr(shapes, name).dtype) for name, v in layer.items()})
        bank = _set_layer(bank, layer, jnp.int32(i))
    return bank


def search_weights(weights: llama.Weights, mesh=None) -> llama.Weights:
    """The dense weights as the search reads them: layers stacked for its scan, without o_proj and
    down_proj (every candidate takes those from the bank). A copy of about 2/3 of the blocks (placed on
    `mesh` by the table), held beside the weights while a search runs; already stacked blocks are trimmed
    in place of a copy."""
    trim = lambda b: dataclasses.replace(b, attn=dataclasses.replace(b.attn, o_kghd=None),  # noqa: E731
                                         mlp=dataclasses.replace(b.mlp, down_fd=None))
    blocks = weights.blocks
    blocks = trim(blocks) if isinstance(blocks, llama.Block) else [trim(b) for b in blocks]
    return stack_layers(dataclasses.replace(weights, blocks=blocks), mesh)


def _stacked(weights: llama.Weights) -> llama.Block:
    if not isinstance(weights.blocks, llama.Block):
        raise ValueError("the search scans stacked layers: pass search.search_weights(weights)")
    return weights.blocks


def _sublayer(weights: llama.Weights, bank: LevelBank, layer, cfg: ModelConfig, rope, kind: int, x, level):
    """x plus attention (kind 0) or MLP (kind 1) of `layer`, built from its copy `level`: the layer's dense
    block from the stacked `weights`, o_proj / down_proj and the keep mask from the stacked bank [L, E, ...].

    Both are indexed here, from the whole arrays: a scan over the bank would hand each layer all E copies,
    and XLA copies that slice before a `lax.cond` that reads it (9 copies of o_proj and down_proj per layer
    and call, found in the compiled search); indexed here, only the chosen copies are read."""
    blk = jax.tree.map(lambda w: w[layer], _stacked(weights))
    pick = lambda a: a[layer, level]  # noqa: E731
    if kind == 0:
        k, g, h, d = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim, cfg.hidden_size
        bias = pick(bank.attn_bias_le) + (0 if blk.attn.o_bias_d is None else blk.attn.o_bias_d)
        attn = dataclasses.replace(blk.attn, o_kghd=pick(bank.o_le).reshape(k, g, h, d), o_bias_d=bias)
        return x + llama.attention(attn, x, cfg, rope, kv_mask_k=pick(bank.attn_keep_le))
    bias = pick(bank.mlp_bias_le) + (0 if blk.mlp.down_bias_d is None else blk.mlp.down_bias_d)
    mlp_w = dataclasses.replace(blk.mlp, down_fd=pick(bank.down_le), down_bias_d=bias)
    return x + llama.mlp(mlp_w, x, cfg, mask_f=pick(bank.mlp_keep_le))


def _scan_layers(levels_2l, layer_fn, carry):
    """`carry` through the layers with `lax.scan`: layer_fn(carry, layer index, its levels [2]) for each
    layer in turn (the body indexes the stacked weights and bank itself, `_sublayer`). One compiled layer,
    whatever the depth."""
    def step(carry, xs):
        return layer_fn(carry, *xs), None

    carry, _ = jax.lax.scan(step, carry, (jnp.arange(levels_2l.shape[-1]), levels_2l.T))
    return carry


def candidate_logits(weights: llama.Weights, bank: LevelBank, levels_2l, tokens_bt, cfg: ModelConfig):
    """Logits of the model that uses copy levels_2l[0, l] / levels_2l[1, l] of attention / MLP l
    (`weights` with stacked layers)."""
    rope = llama.rope_tables(cfg, llama.default_positions(tokens_bt))

    def layer(x, l, levels):
        for kind in (0, 1):
            x = _sublayer(weights, bank, l, cfg, rope, kind, x, levels[kind])
        return x

    return llama.unembed(weights, _scan_layers(levels_2l, layer, llama.embed(weights, tokens_bt)), cfg)


def first_change(levels_c2l, parent_2l):
    """Per candidate [C, 2, L], the first sublayer (2·layer + kind) whose copy is not the parent's; 2L
    if none. Works on NumPy and JAX arrays."""
    changed = (levels_c2l != parent_2l).transpose(0, 2, 1).reshape(len(levels_c2l), -1)
    return changed.argmax(axis=1).astype("int32") + (~changed.any(axis=1)).astype("int32") * changed.shape[1]


def over_token_chunks(fn, chunk: int, *arrays_bt):
    """fn of one token's slices (x[b, t], ...) for every token of [B, T, ...] arrays: its outputs [B, T, ...].

    The B·T tokens run `chunk` at a time (vmapped within a chunk, one chunk after another; the tokens
    left over, fewer than `chunk`, in one smaller chunk), so what fn makes per token — a row of logits —
    exists for one chunk at a time."""
    b, t = arrays_bt[0].shape[:2]
    flat = tuple(a.reshape(b * t, *a.shape[2:]) for a in arrays_bt)
    out = jax.lax.map(lambda args: fn(*args), flat, batch_size=min(chunk, b * t))
    return jax.tree.map(lambda a: a.reshape(b, t, *a.shape[1:]), out)


def _token_logits(weights, x_d, cfg: ModelConfig):
    """The fp32 logits [V] of one position of the residual stream (final norm and lm_head)."""
    return llama.unembed(weights, x_d[None, None], cfg)[0, 0]


def dense_topk(weights, tokens_bt, cfg: ModelConfig, k: int, *, chunk: int = LOGIT_CHUNK):
    """Indices and log-probabilities (renormalised over the k) of the dense model's top-k, positions 0..T-2:
    [B, T-1, k] twice, the lm_head and the top-k `chunk` tokens at a time (`over_token_chunks`)."""
    x_btd = llama.hidden_states(weights, tokens_bt, cfg)[:, :-1]

    def one(x_d):
        values, idx = jax.lax.top_k(_token_logits(weights, x_d, cfg), k)
        return idx.astype(jnp.int32), jax.nn.log_softmax(values)

    return over_token_chunks(one, chunk, x_btd)


@functools.partial(jax.jit, static_argnames=("cfg", "k", "batch", "mesh", "chunk"))
def pool_topk(weights, tokens_nt, cfg: ModelConfig, k: int, batch: int, mesh=None, chunk: int = LOGIT_CHUNK):
    """`dense_topk` of every pool window, `batch` windows at a time (the lm_head `chunk` tokens at a time):
    [N, T-1, k] twice.

    With a mesh, every `data` device computes and keeps its own N/D windows (the cache never moves)."""

    def local(weights, tokens):
        n, t = tokens.shape
        idx, logp = jax.lax.map(lambda tok: dense_topk(weights, tok, cfg, k, chunk=chunk),
                                tokens.reshape(n // batch, batch, t))
        return idx.reshape(n, t - 1, k), logp.reshape(n, t - 1, k)

    if mesh is None:
        return local(weights, tokens_nt)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"),
                         axis_names={"data"})(weights, tokens_nt)


def topk_kl(logits_btv, idx_btk, logp_btk):
    """KL(p ‖ q) summed over the positions of each sequence: [B]; p and q the dense and candidate
    distributions over the dense top-k. From whole logits [B, T, V]; the search uses `stream_topk_kl`."""
    picked = jnp.take_along_axis(logits_btv[:, :-1], idx_btk, axis=-1)
    logq = jax.nn.log_softmax(picked, axis=-1)
    return jnp.sum(jnp.exp(logp_btk) * (logp_btk - logq), axis=(1, 2))


def stream_topk_kl(weights, x_btd, idx_btk, logp_btk, cfg: ModelConfig, *, chunk: int = LOGIT_CHUNK):
    """`topk_kl` of the logits of the residual stream x_btd (after the last block): [B], the lm_head, the
    gather of the k columns and the log-sum-exp `chunk` tokens at a time (`over_token_chunks`).

    KL_t = Σ_k p_tk (log p_tk − log q_tk),  log q_tk = z_t[idx_tk] − logsumexp_k' z_t[idx_tk'].
    """
    def one(x_d, idx_k, logp_k):
        logq = jax.nn.log_softmax(_token_logits(weights, x_d, cfg)[idx_k])
        return jnp.sum(jnp.exp(logp_k) * (logp_k - logq))

    return jnp.sum(over_token_chunks(one, chunk, x_btd[:, :-1], idx_btk, logp_btk), axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "group", "mesh", "over", "chunk"))
def candidates_kl(weights, bank, parent_2l, levels_c2l, tokens_bt, idx_ntk, logp_ntk, rows_b, cfg, group,
                  mesh=None, over="tokens", chunk: int = LOGIT_CHUNK):
    """Per-sequence top-k KL on the pool windows `rows_b` of the parent [2, L] and of C candidates
    [C, 2, L]: ([B], [C, B]).

    Shared prefix: a candidate equals the parent up to its first changed sublayer. The parent runs once
    (its own KL comes with it), leaving its residual stream where each group of `group` candidates
    (consecutive, vmapped together) first changes; the group runs on from there. Candidates sorted by
    `first_change` make groups that share most; C must be a multiple of `group` (per device).

    The dense top-k rows are gathered from the pool's cache, which stays split over `data`: each device
    picks the requested rows it holds and one all-reduce of the B picked rows (B × T × k, never the whole
    cache) assembles them (XLA's partitioning of the gather, read off the compiled program). With a
    mesh, `over` says what the `data` devices split: the token batch (every device evaluates all
    candidates on B/D windows) or the candidates (each device its C/D on all B windows); either way the
    evaluation itself needs no collective. Each KL comes from the final residual stream `chunk` tokens
    at a time (`stream_topk_kl`): a group holds group × chunk × vocab fp32 logits, not group × B·T × vocab.
    """
    idx_btk, logp_btk = jnp.take(idx_ntk, rows_b, axis=0), jnp.take(logp_ntk, rows_b, axis=0)

    def local(weights, bank, parent, levels, tokens, idx, logp):
        rope = llama.rope_tables(cfg, llama.default_positions(tokens))
        groups = levels.reshape(-1, group, *levels.shape[1:])
        starts = first_change(levels, parent).reshape(len(groups), group).min(axis=1)

        def keep_entry(entry, s, x):
            """The parent's stream where each group starts: x, for the groups that start at sublayer s."""
            return jnp.where((starts == s)[:, None, None, None], x, entry)

        def parent_layer(carry, l, levels_2):
            x, entry = carry
            for kind in (0, 1):
                x = _sublayer(weights, bank, l, cfg, rope, kind, x, levels_2[kind])
                entry = keep_entry(entry, 2 * l + kind + 1, x)
            return x, entry

        x = llama.embed(weights, tokens)
        entry = keep_entry(jnp.zeros((len(groups), *x.shape), x.dtype), 0, x)
        x, entry = _scan_layers(parent, parent_layer, (x, entry))
        parent_kl = stream_topk_kl(weights, x, idx, logp, cfg, chunk=chunk)

        def candidate_kl(levels_2l, start, x):
            """One candidate's KL, run from the parent's stream x at sublayer `start` on."""
            def layer(x, l, levels_2):
                for kind in (0, 1):
                    run = functools.partial(_sublayer, weights, bank, l, cfg, rope, kind, level=levels_2[kind])
                    x = jax.lax.cond(2 * l + kind >= start, run, lambda y: y, x)
                return x

            return stream_topk_kl(weights, _scan_layers(levels_2l, layer, x), idx, logp, cfg,
                                  chunk=chunk)

        def group_kl(args):
            group_levels, start, x = args
            return jax.vmap(candidate_kl, in_axes=(0, None, None))(group_levels, start, x)

        return parent_kl, jax.lax.map(group_kl, (groups, starts, entry)).reshape(len(levels), -1)

    if mesh is None:
        return local(weights, bank, parent_2l, levels_c2l, tokens_bt, idx_btk, logp_btk)
    cand, tok = (P("data"), P()) if over == "candidates" else (P(), P("data"))
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), cand, tok, tok, tok),
                         out_specs=(P(), P("data", None)) if over == "candidates" else (P("data"), P(None, "data")),
                         axis_names={"data"})(weights, bank, parent_2l, levels_c2l, tokens_bt, idx_btk, logp_btk)


# -- mutation ------------------------------------------------------------------------------------


def unit_counts(plan: LevelPlan, attn_level, mlp_level) -> tuple[int, int]:
    """Units removed in total: (KV groups, MLP channels)."""
    return (sum(plan.attn[i][e] for i, e in enumerate(attn_level)),
            sum(plan.mlp[i][e] for i, e in enumerate(mlp_level)))


def mutate(parent: np.ndarray, plan: LevelPlan, rng: np.random.Generator, num: int, max_flips: int,
           max_tries: int = 10_000) -> np.ndarray:
    """`num` distinct offspring [num, 2, L] of `parent` [2, L] (row 0 attention, row 1 MLP), each made of
    min(randint(1, max_flips), randint(1, max_flips)) sparsity shifts that keep both unit counts."""
    tables = [np.asarray(plan.attn), np.asarray(plan.mlp)]
    num_levels = tables[0].shape[1]
    if parent.shape[1] < 2:
        raise ValueError("a sparsity shift moves units between two layers; the model has only one")
    seen = {parent.tobytes()}
    out = []
    for _ in range(max_tries):
        if len(out) == num:
            break
        child = parent.copy()
        flips = min(rng.integers(1, max_flips + 1), rng.integers(1, max_flips + 1))
        for _ in range(flips):
            kind = rng.integers(2)
            down, up = rng.choice(child.shape[1], size=2, replace=False)
            if child[kind, down] == 0 or child[kind, up] == num_levels - 1:
                continue
            table = tables[kind]
            freed = table[down, child[kind, down]] - table[down, child[kind, down] - 1]
            taken = table[up, child[kind, up] + 1] - table[up, child[kind, up]]
            if freed != taken or freed == 0:      # clipped levels would change the budget
                continue
            child[kind, down] -= 1
            child[kind, up] += 1
        key = child.tobytes()
        if key not in seen:
            seen.add(key)
            out.append(child)
    if not out:
        raise ValueError("no budget-preserving sparsity shift exists for this level plan")
    return np.stack(out)


# -- the search loop -------------------------------------------------------------------------------


class FitnessPool:
    """Fitness windows (on the host) and their dense top-k, computed once and kept on the devices,
    split over `data` by window."""

    def __init__(self, weights, cfg: ModelConfig, tokens: np.ndarray, scfg: SearchConfig, *, mesh=None,
                 progress: bool = True):
        self.tokens, self.mesh = np.asarray(tokens, np.int32), mesh
        if self.tokens.ndim != 2 or self.tokens.shape[1] != scfg.seq_len:
            raise ValueError(f"fitness windows must be [N, search.seq_len = {scfg.seq_len}], got {self.tokens.shape}")
        if scfg.top_k > cfg.vocab_size:
            raise ValueError(f"search.top_k = {scfg.top_k} exceeds the vocabulary ({cfg.vocab_size} tokens); lower it")
        # Padded with copies of the first window to whole calls on every device; those rows are never drawn.
        padded = np.concatenate([self.tokens, np.repeat(self.tokens[:1], -len(self.tokens) % (
            scfg.token_batch * data_size(mesh)), axis=0)])
        if progress:
            print(f"dense top-{scfg.top_k} of {len(self.tokens)} fitness windows")
        tokens_nt = jnp.asarray(padded) if mesh is None else jax.device_put(padded, batch_sharding(mesh))
        self.idx, self.logp = pool_topk(weights, tokens_nt, cfg, scfg.top_k, scfg.token_batch, mesh,
                                        scfg.logit_chunk)


class CallLayout(NamedTuple):
    over: str        # what the `data` devices split: "tokens" or "candidates"
    windows: int     # windows per call (all devices)
    group: int       # candidates vmapped together
    padded: int      # candidates after padding to whole groups on every device


def call_layout(scfg: SearchConfig, num_candidates: int, num_windows: int, devices: int) -> CallLayout:
    """How `evaluate` cuts C candidates × N windows into compiled calls on D `data` devices.

    A call holds candidate_batch × token_batch (candidate, window) pairs per device: as many windows as
    divide the stage's, the rest filled with candidates vmapped together (a group runs from the first
    change of its earliest member, so the fewer candidates a group holds, the less work: a lone candidate
    runs from its own first change). A lone candidate costs memory, as XLA then keeps an activation per
    sublayer (`memory.memory_plan` on 70B shapes: 15.4 GB per search call against 6.6 GB with groups of two),
    and saves time (on 8B shapes, the same two generations in 23.3 s each against 24.7 s; BENCHMARKS.md).
    The windows are split over `data` when D divides them; otherwise the candidates are."""
    over = "tokens" if num_windows % devices == 0 else "candidates"
    per_device = num_candidates if over == "tokens" else -(-num_candidates // devices)
    per_call = scfg.candidate_batch * scfg.token_batch
    windows = math.gcd(num_windows // devices if over == "tokens" else num_windows, per_call)
    group = min(per_call // windows, per_device)
    padded = -(-per_device // group) * group * (devices if over == "candidates" else 1)
    return CallLayout(over, windows * (devices if over == "tokens" else 1), group, padded)


def stage_layouts(scfg: SearchConfig, devices: int) -> list[CallLayout]:
    """The call layouts of a generation's three stages."""
    stages = zip((scfg.offspring, *scfg.stage_candidates), scfg.stage_tokens)
    return [call_layout(scfg, c, n // scfg.seq_len, devices) for c, n in stages]


def evaluate(weights, bank, cfg, scfg: SearchConfig, pool: FitnessPool, parent: np.ndarray, candidates: np.ndarray,
             sequences: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean top-k KL on the pool windows `sequences` of `parent` [2, L] and of each candidate [C, 2, L]
    (mutated from the parent, whose prefix they share; any parent gives the same candidates' KL).

    Calls as `call_layout`; the candidates sorted by `first_change` (so a group shares most) and padded
    with copies of the parent (which cost only the lm_head); when the candidates are split over `data`,
    dealt out in turn so that every device gets early and late changes alike. Per-window KLs are summed
    on the host in window order, so the result does not depend on the split."""
    mesh, num = pool.mesh, len(candidates)
    d = data_size(mesh)
    over, b, group, total = call_layout(scfg, num, len(sequences), d)
    order = np.argsort(np.asarray(first_change(candidates, parent)), kind="stable")
    order = np.concatenate([order, np.full(total - num, -1)])        # -1: a copy of the parent
    if over == "candidates":
        order = order.reshape(-1, d).T.reshape(-1)                    # device j: sorted j, j + D, ...
    levels = np.where((order < 0)[:, None, None], parent, candidates[np.maximum(order, 0)]).astype(np.int32)

    def put(a, split: bool):
        """On the mesh: split over `data` along the first axis, or on every device."""
        if mesh is None:
            return jnp.asarray(a)
        return jax.device_put(a, batch_sharding(mesh, a.ndim) if split else replicated(mesh))

    levels, parent_2l = put(levels, over == "candidates"), put(np.asarray(parent, np.int32), False)
    parent_kl, kl = np.zeros(len(sequences)), np.zeros((total, len(sequences)))
    for s in range(0, len(sequences), b):
        rows = np.asarray(sequences[s: s + b], np.int32)
        out = candidates_kl(weights, bank, parent_2l, levels, put(pool.tokens[rows], over == "tokens"), pool.idx,
                            pool.logp, put(rows, False), cfg, group, mesh, over, scfg.logit_chunk)
        parent_kl[s: s + b], kl[:, s: s + b] = map(to_host, out)
    fit = np.zeros(num)
    fit[order[order >= 0]] = kl[order >= 0].sum(axis=1)
    scored = len(sequences) * (scfg.seq_len - 1)
    return float(parent_kl.sum()) / scored, fit / scored


def generation_step(weights, bank, cfg, scfg: SearchConfig, plan: LevelPlan, pool: FitnessPool,
                    parent: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """One (1+λ) generation with staged selection; returns the next parent and its stage-3 fitness."""
    offspring = mutate(parent, plan, rng, scfg.offspring, scfg.max_flips)
    survivors = offspring
    n1, n2, n3 = (n // scfg.seq_len for n in scfg.stage_tokens)
    for keep, n in ((scfg.stage_candidates[0], n1), (scfg.stage_candidates[1], n2)):
        _, fit = evaluate(weights, bank, cfg, scfg, pool, parent, survivors,
                          rng.choice(len(pool.tokens), n, replace=False))
        survivors = survivors[np.argsort(fit, kind="stable")[:keep]]
    parent_fit, fit = evaluate(weights, bank, cfg, scfg, pool, parent, survivors,
                               rng.choice(len(pool.tokens), n3, replace=False))
    if fit.min() < parent_fit:   # ties keep the parent
        return survivors[int(np.argmin(fit))], float(fit.min())
    return parent, parent_fit


def run_search(weights, cfg: ModelConfig, plan: LevelPlan, bank: LevelBank, pool: FitnessPool,
               scfg: SearchConfig, state_dir: pathlib.Path, *, iteration: int = 0, progress: bool = True):
    """Searches from the centre level of every sublayer; checkpoints every generation, resumes if killed.

    Returns (best [2, L] level indices, history of the parent's fitness per generation)."""
    num_levels = len(plan.attn[0])
    parent = np.full((2, cfg.num_layers), num_levels // 2, np.int32)
    target = unit_counts(plan, *parent)
    history: list[float] = []
    state_dir = pathlib.Path(state_dir).absolute()  # Orbax wants absolute paths
    claim_directory(state_dir, search_fingerprint(scfg, plan, pool, iteration), "a search run")
    manager = ocp.CheckpointManager(state_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2))
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        if start > scfg.generations:
            raise ValueError(f"{state_dir} holds {start} generations, more than search.generations = "
                             f"{scfg.generations}; raise it or use another output directory")
        state = manager.restore(start, args=ocp.args.StandardRestore())
        parent, history = np.asarray(state["parent"], np.int32), list(np.asarray(state["history"]))
        if parent.shape != (2, cfg.num_layers):  # directories from before the fingerprint
            raise ValueError(f"{state_dir} holds a search of another model; delete it or use another --out")
        if progress:
            print(f"resuming search (iteration {iteration + 1}) at generation {start}/{scfg.generations}")
    bar = tqdm(range(start, scfg.generations), desc=f"search it{iteration}", unit="gen", disable=not progress,
               initial=start, total=scfg.generations)
    for gen in bar:
        rng = np.random.default_rng([scfg.seed, iteration, gen])
        parent, fitness = generation_step(weights, bank, cfg, scfg, plan, pool, parent, rng)
        if unit_counts(plan, *parent) != target:
            raise RuntimeError(f"generation {gen}: the search broke the parameter budget (a bug; please report it)")
        history.append(fitness)
        manager.save(gen + 1, args=ocp.args.StandardSave({"parent": parent, "history": np.asarray(history)}))
        manager.wait_until_finished()
        bar.set_postfix(kl=f"{fitness:.4f}")
    manager.close()
    return parent, history


def search_fingerprint(scfg: SearchConfig, plan: LevelPlan, pool: FitnessPool, iteration: int) -> dict:
    """What a search's result depends on: its settings (not the generation or iteration counts, which a
    re-run may raise, nor the sizes of the compiled calls' batches and logit chunks), the level plan and the
    fitness windows."""
    settings = {k: v for k, v in dataclasses.asdict(scfg).items()
                if k not in ("generations", "iterations", "token_batch", "candidate_batch", "logit_chunk")}
    return {"search": settings, "iteration": iteration, "levels": plan.to_json(),
            "pool_sha256": tokens_sha256(pool.tokens)}


def removal_fractions(plan: LevelPlan, levels: np.ndarray, cfg: ModelConfig) -> tuple[list[float], list[float]]:
    """Per-sublayer sparsities of a level choice: the centres of the next, finer iteration."""
    attn = [plan.attn[i][e] / cfg.num_kv_heads for i, e in enumerate(levels[0])]
    mlp = [plan.mlp[i][e] / cfg.intermediate_size for i, e in enumerate(levels[1])]
    return attn, mlp


def step_for_iteration(first_step: float, iteration: int) -> float:
    """Δ halves every coarse-to-fine iteration: 12.5%, 6.25%, 3.125%, 1.5625%."""
    return first_step / math.pow(2, iteration)
