"""Policy-gradient mask learning with forward passes only (ALGORITHMS.md §2; Gao et al. 2024, "Bypass
Back-propagation: Optimization-based Structural Pruning for LLMs via Policy Gradient").

Every prunable unit (a KV group: one KV head with its query heads; an MLP channel) has a keep-probability
s ∈ [0, 1]. Each step draws K independent masks m_k ~ Bernoulli(s), takes the cross-entropy L_k of each
masked model on one batch of calibration text (all K in one compiled call: vmap over k) and moves s along
the normalised score-function estimate

    ĝ = 1/(K−1) · Σ_k (L_k − δ) · (m_k − s) / sqrt(s(1 − s) + ε)
    s ← Π(s − η_t ĝ)

with δ the moving-average baseline, η_t a cosine schedule (optax SGD: the reference's update) and Π the
projection onto the keep budget, s ← clip(s − v, 0, 1) with v found by bisection so that Σ s = #kept units.
One pool holds every layer's KV groups, another every layer's MLP channels. No gradient flows through the
model.

What ĝ estimates. Since ∂ log p(m)/∂s = (m − s) / (s(1 − s)) for independent Bernoulli variables, for a
baseline δ that does not depend on the step's samples

    E[ĝ] = K/(K−1) · s(1 − s) / sqrt(s(1 − s) + ε) ⊙ ∇_s E_{m~Bern(s)}[L(m)]:

the exact gradient rescaled per unit by a positive factor (each unit's score term has unit variance), so a
descent direction. So δ must not depend on the step's samples: δ used at step t averages the mean losses
of steps < t, an exponential moving average with weight 1/`baseline_window` (what the reference calls a
window of 5): δ ← δ + (L̄ − δ)/w after the step; step 0, with no history, uses its own mean loss. (The
reference folds the current mean in before using δ, which shrinks the estimate by about 1/(wK).)

Whole sublayers (`prune_sublayers`, off by default). Each attention and MLP sublayer gets a gate
probability too, sampled like the units; a sampled gate of 0 multiplies all the sublayer's unit masks,
which is its output (`llama.attention` / `llama.mlp` then add only an output bias, as the sliced model
with no unit left does). The budget stays exact because units are what is counted: the projection keeps
the expected number of kept units, Σ_u g_l(u) · s_u, at the budget (bisection on the same v), gates are
only clipped to [0, 1], and the final mask keeps the top-k units of g_l(u) · s_u (each unit's keep
probability): exactly k units per pool; a sublayer whose gate falls is dropped by losing all its units.
With the option off the gates stay at 1: every sample keeps them and nothing moves them.

Initialisation. `uniform`: s = keep. `wanda_sp`: the Wanda-sp metric |W| · ‖X_j‖ of the o_proj / down_proj
inputs summed per unit (`baselines.wanda_sp_scores`; statistics of the dense model on the calibration
windows), standardised within each layer as the reference does (the metric's scale differs across layers),
s = sigmoid(zscore) + (keep − mean), clipped to [0, 1], then projected. The final mask is the top-k of s
in each pool (k = round(keep · #units)); the model is then physically sliced (`llama.apply_masks`), with no
weight reconstruction.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from tyr_jax.data import sampler
from tyr_jax.distributed import claim_directory
from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig
from tyr_jax.pruning.baselines import wanda_sp_scores
from tyr_jax.sharding import put_batch, replicated, stack_layers, to_host

INITS = ("wanda_sp", "uniform")


@dataclasses.dataclass(frozen=True)
class PolicyGradientConfig:
    """Hyper-parameters of a policy-gradient run (reference: 15,000 steps of 8 × 128 tokens, K = 2,
    lr 2e-3 for Llama-2-7B and 6e-3 for Llama-3-8B, seed 42). The target comes from `supernet.target_sparsity`."""

    steps: int = 2000
    samples: int = 2                  # K masks per step, evaluated in one compiled call
    batch_size: int = 8               # training windows per step ...
    seq_len: int = 128                # ... of this many input tokens (each with its next-token target)
    learning_rate: float = 6e-3       # peak of the cosine schedule (decays to 0 at `steps`)
    init: str = "wanda_sp"
    baseline_window: int = 5
    eps: float = 1e-7
    prune_sublayers: bool = False
    sublayer_init: float = 0.95       # starting keep-probability of each sublayer gate (prune_sublayers)
    seed: int = 42
    checkpoint_every: int = 100
    log_every: int = 50               # steps between pulls to the host (losses, progress bar); changes no result

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "baseline_window", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"policy_gradient.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.samples, int) or self.samples < 2:
            raise ValueError(f"policy_gradient.samples must be an integer >= 2 (the estimate divides by K − 1), "
                             f"got {self.samples!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"policy_gradient.seed must be an integer, got {self.seed!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"policy_gradient.learning_rate must be positive, got {self.learning_rate!r}")
        if not self.eps > 0:
            raise ValueError(f"policy_gradient.eps must be positive, got {self.eps!r}")
        if self.init not in INITS:
            raise ValueError(f"policy_gradient.init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not isinstance(self.prune_sublayers, bool):
            raise ValueError(f"policy_gradient.prune_sublayers must be true or false, got {self.prune_sublayers!r}")
        if not 0.0 < self.sublayer_init <= 1.0:
            raise ValueError(f"policy_gradient.sublayer_init must be in (0, 1], got {self.sublayer_init!r}")


class KeepProbs(NamedTuple):
    """Keep-probabilities of every unit and sublayer gate; a sampled mask has the same structure (0/1)."""

    attn_lk: Float[Array, "*S L K"]   # KV groups
    mlp_lf: Float[Array, "*S L F"]    # MLP channels
    attn_gate_l: Float[Array, "*S L"]  # whole attention sublayers (1 unless prune_sublayers)
    mlp_gate_l: Float[Array, "*S L"]   # whole MLP sublayers


class Budget(NamedTuple):
    """Units kept in each pool: round(keep · #units), as the other methods round."""

    attn: int
    mlp: int


class PGState(NamedTuple):
    probs: KeepProbs
    opt_state: optax.OptState
    baseline: Float[Array, ""]   # δ: moving average of the mean loss of the steps so far
    step: Int[Array, ""]
    key: Array                   # raw key data (uint32) of the run's key, so checkpoints hold the RNG


class PolicyGradient(NamedTuple):
    """The algorithm as pure functions (optax-style): `init` and `sample`, then `update` with the losses."""

    init: Callable[..., PGState]                         # (probs, *, key) -> state, probs projected
    sample: Callable[..., KeepProbs]                     # (probs, *, key) -> K masks [K, ...]
    update: Callable[[PGState, KeepProbs, Array], PGState]  # (state, masks, losses_k) -> next state


def keep_budget(cfg: ModelConfig, target_sparsity: float) -> Budget:
    """Kept units per pool; removed = round(sparsity · #units) as in `supernet.balanced_centres`."""
    if cfg.is_pruned:
        raise ValueError("policy-gradient pruning starts from the dense model; got pruned layer sizes")
    if not 0.0 <= target_sparsity <= 1.0:
        raise ValueError(f"target_sparsity must be in [0, 1], got {target_sparsity}")
    n_attn, n_mlp = cfg.num_layers * cfg.num_kv_heads, cfg.num_layers * cfg.intermediate_size
    removed = lambda n: int(np.floor(target_sparsity * n + 0.5))  # noqa: E731
    return Budget(n_attn - removed(n_attn), n_mlp - removed(n_mlp))


# -- the estimator, the projection, sampling ------------------------------------------------------


def score_function_estimate(losses_k: Float[Array, " K"], masks: KeepProbs, probs: KeepProbs,
                            baseline: Float[Array, ""], eps: float) -> KeepProbs:
    """ĝ = 1/(K−1) · Σ_k (L_k − δ) · (m_k − s) / sqrt(s(1 − s) + ε), for every leaf of `probs`.

    Unbiased for K/(K−1) · s(1 − s)/sqrt(s(1 − s) + ε) ⊙ ∇_s E[L] when δ does not depend on the samples
    (module docstring). `masks` has the leaves of `probs` with a leading K axis."""
    advantage_k = losses_k - baseline
    scale = 1.0 / (losses_k.shape[0] - 1)

    def leaf(m_k, s):
        return scale * jnp.einsum("k,k...->...", advantage_k, (m_k - s) / jnp.sqrt(s * (1 - s) + eps))

    return jax.tree.map(leaf, masks, probs)


def project_to_budget(s: Float[Array, "..."], weight: Float[Array, "..."], budget: float, *,
                      iterations: int = 64) -> Float[Array, "..."]:
    """Π(s) = clip(s − v, 0, 1) with Σ weight · Π(s) = budget; v by bisection.

    The excess f(v) = Σ w · clip(s − v, 0, 1) − budget falls monotonically from Σ w − budget at
    v = min s − 2 (a margin fp32 rounding cannot eat) to −budget at v = max s; 64 halvings of that bracket
    reach fp32 resolution. v may be negative (the reference only lowers s), so the sum meets the budget
    whenever Σ w ≥ budget; otherwise every s ends at 1. `weight`: the gate probability of each unit's
    sublayer (1 without gates)."""
    weight = jnp.broadcast_to(weight, s.shape)

    def excess(v):
        return jnp.sum(weight * jnp.clip(s - v, 0.0, 1.0)) - budget

    def halve(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        above = excess(mid) > 0
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    # v = lo, the side with Σ ≥ budget: within fp32 resolution of the root, and exactly all ones when
    # the budget cannot be met (lo then never moves).
    lo, _ = jax.lax.fori_loop(0, iterations, halve, (jnp.min(s) - 2.0, jnp.max(s)))
    return jnp.clip(s - lo, 0.0, 1.0)


def project(probs: KeepProbs, budget: Budget) -> KeepProbs:
    """Both unit pools onto their budgets (expected kept units, gates included); gates clipped to [0, 1]."""
    attn_gate, mlp_gate = jnp.clip(probs.attn_gate_l, 0.0, 1.0), jnp.clip(probs.mlp_gate_l, 0.0, 1.0)
    return KeepProbs(project_to_budget(probs.attn_lk, attn_gate[:, None], budget.attn),
                     project_to_budget(probs.mlp_lf, mlp_gate[:, None], budget.mlp), attn_gate, mlp_gate)


def sample_masks(probs: KeepProbs, num: int, *, key: jax.Array) -> KeepProbs:
    """`num` independent 0/1 masks ~ Bernoulli(probs): every leaf gets a leading axis of size `num`."""
    leaves, treedef = jax.tree.flatten(probs)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.bernoulli(k, p, (num,) + p.shape).astype(p.dtype)
                              for k, p in zip(keys, leaves)])


def unit_masks(masks: KeepProbs) -> llama.UnitMasks:
    """Sampled units and gates → the model's per-unit masks (a closed gate zeroes all its units)."""
    return llama.UnitMasks(kv_lk=masks.attn_lk * masks.attn_gate_l[..., None],
                           mlp_lf=masks.mlp_lf * masks.mlp_gate_l[..., None])


def hard_masks(probs: KeepProbs, budget: Budget) -> llama.UnitMasks:
    """The final mask: the top-k units of gate · s in each pool (ties: lower layer, then lower index)."""

    def top(score, k):
        flat = np.asarray(score, np.float64).ravel()
        keep = np.zeros(flat.shape, np.float32)
        keep[np.argsort(-flat, kind="stable")[:k]] = 1.0
        return keep.reshape(score.shape)

    p = jax.tree.map(np.asarray, probs)
    return llama.UnitMasks(kv_lk=top(p.attn_lk * p.attn_gate_l[:, None], budget.attn),
                           mlp_lf=top(p.mlp_lf * p.mlp_gate_l[:, None], budget.mlp))


# -- the algorithm ---------------------------------------------------------------------------------


@functools.cache  # one object per setting, so that `compile_step` compiles once per setting
def policy_gradient(pcfg: PolicyGradientConfig, budget: Budget) -> PolicyGradient:
    """The factory: init / sample / update for the given hyper-parameters and keep budget."""
    cosine = optax.cosine_decay_schedule(pcfg.learning_rate, pcfg.steps)
    schedule = lambda count: cosine(count.astype(jnp.float32))  # noqa: E731  (optax mixes int and float)
    optimizer = optax.sgd(schedule)  # s ← s − η_t ĝ, as the reference updates (it never steps its Adam)

    def fix_gates(probs: KeepProbs) -> KeepProbs:
        if pcfg.prune_sublayers:
            return probs
        return probs._replace(attn_gate_l=jnp.ones_like(probs.attn_gate_l), mlp_gate_l=jnp.ones_like(probs.mlp_gate_l))

    def init(probs: KeepProbs, *, key: jax.Array) -> PGState:
        probs = project(fix_gates(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), probs)), budget)
        return PGState(probs, optimizer.init(probs), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
                       jax.random.key_data(key))

    def sample(probs: KeepProbs, *, key: jax.Array) -> KeepProbs:
        return sample_masks(probs, pcfg.samples, key=key)

    def update(state: PGState, masks: KeepProbs, losses_k: Array) -> PGState:
        mean = jnp.mean(losses_k)
        baseline = jnp.where(state.step == 0, mean, state.baseline)
        grads = score_function_estimate(losses_k, masks, state.probs, baseline, pcfg.eps)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.probs)
        probs = project(fix_gates(optax.apply_updates(state.probs, updates)), budget)
        baseline = baseline + (mean - baseline) / pcfg.baseline_window
        # A non-finite loss would turn every probability into NaN: such a step changes nothing but the
        # step count (the driver reports how many were skipped).
        finite = jnp.all(jnp.isfinite(losses_k))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        return PGState(keep(probs, state.probs), keep(opt_state, state.opt_state), keep(baseline, state.baseline),
                       state.step + 1, state.key)

    return PolicyGradient(init, sample, update)


def masked_losses(weights: llama.Weights, tokens_bt: Int[Array, "B T"], masks: llama.UnitMasks,
                  cfg: ModelConfig) -> Float[Array, " K"]:
    """Mean next-token cross-entropy of the model under each of K masks (leading axis), vmapped over k."""
    inputs_bt, targets_bt = tokens_bt[:, :-1], tokens_bt[:, 1:]

    def one(m: llama.UnitMasks):
        return -jnp.mean(llama.token_logprobs(weights, inputs_bt, targets_bt, cfg, masks=m))

    return jax.vmap(one)(masks)


def step_keys(key_data: Array, step) -> tuple[jax.Array, jax.Array]:
    """(data key, mask key) of one step: fold_in(run key, step), split into named subkeys."""
    data_key, mask_key = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(key_data), step))
    return data_key, mask_key


def train_step(pg: PolicyGradient, state: PGState, weights: llama.Weights, tokens_bt: Int[Array, "B T"],
               cfg: ModelConfig) -> tuple[PGState, Float[Array, " K"]]:
    """Sample K masks, their losses on one batch (one vmapped forward), update: the step to jit once."""
    _, mask_key = step_keys(state.key, state.step)
    masks = pg.sample(state.probs, key=mask_key)
    losses_k = masked_losses(weights, tokens_bt, unit_masks(masks), cfg)
    return pg.update(state, masks, losses_k), losses_k


@functools.cache
def compile_step(pg: PolicyGradient, cfg: ModelConfig):
    """`train_step` jitted once, the state donated: (state, weights, tokens_bt) -> (state, losses_k)."""
    return jax.jit(functools.partial(train_step, pg, cfg=cfg), donate_argnums=0)


# -- initialisation ----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="cfg")
def _block_input_sq_norms(blk: llama.Block, x_btd: Array, rope, cfg: ModelConfig):
    """Σ over tokens of the squared o_proj inputs [K·G·H] and down_proj inputs [F], and the block's output."""
    ctx = llama.attention_context(blk.attn, x_btd, cfg, rope)
    attn_sq = jnp.sum(jnp.square(ctx.astype(jnp.float32)), axis=(0, 1)).reshape(-1)
    x_btd = x_btd + llama.attention(blk.attn, x_btd, cfg, rope)
    mlp_sq = jnp.sum(jnp.square(llama.mlp_hidden(blk.mlp, x_btd, cfg).astype(jnp.float32)), axis=(0, 1))
    return attn_sq, mlp_sq, x_btd + llama.mlp(blk.mlp, x_btd, cfg)


def wanda_sp_metric(weights: llama.Weights, cfg: ModelConfig, calib_bt: np.ndarray, *,
                    batch_size: int, mesh=None) -> tuple[Float[Array, "L K"], Float[Array, "L F"]]:
    """Wanda-sp scores of every KV group and MLP channel from the dense model on the calibration windows
    (each batch split over the mesh's `data` axis where it divides)."""
    calib_bt = np.asarray(calib_bt, np.int32)
    chunks = [put_batch(calib_bt[i: i + batch_size], mesh) for i in range(0, len(calib_bt), batch_size)]
    ropes = [llama.rope_tables(cfg, llama.default_positions(c)) for c in chunks]
    xs = [llama.embed(weights, c) for c in chunks]
    attn, mlp_scores = [], []
    for blk in weights.blocks:
        attn_sq, mlp_sq = 0.0, 0.0
        for j, (x, rope) in enumerate(zip(xs, ropes)):
            a, m, xs[j] = _block_input_sq_norms(blk, x, rope, cfg)
            attn_sq, mlp_sq = attn_sq + a, mlp_sq + m
        d = cfg.hidden_size
        attn.append(wanda_sp_scores(blk.attn.o_kghd.reshape(-1, d), jnp.sqrt(attn_sq), cfg.q_per_kv * cfg.head_dim))
        mlp_scores.append(wanda_sp_scores(blk.mlp.down_fd, jnp.sqrt(mlp_sq), 1))
    return jnp.stack(attn), jnp.stack(mlp_scores)


def probs_from_metric(metric_lu: Float[Array, "L U"], keep: float) -> Float[Array, "L U"]:
    """s = sigmoid(zscore(metric)) + (keep − mean), per layer, clipped to [0, 1] (the reference's `sigmap`)."""
    z = (metric_lu - metric_lu.mean(axis=1, keepdims=True)) / (metric_lu.std(axis=1, keepdims=True) + 1e-8)
    s = jax.nn.sigmoid(z)
    return jnp.clip(s + (keep - s.mean(axis=1, keepdims=True)), 0.0, 1.0)


def initial_probs(pcfg: PolicyGradientConfig, cfg: ModelConfig, target_sparsity: float,
                  metric: tuple[Array, Array] | None = None) -> KeepProbs:
    """Starting keep-probabilities (before projection): uniform `keep`, or from the Wanda-sp `metric`."""
    keep = 1.0 - target_sparsity
    n, k, f = cfg.num_layers, cfg.num_kv_heads, cfg.intermediate_size
    gate = jnp.full((n,), pcfg.sublayer_init if pcfg.prune_sublayers else 1.0, jnp.float32)
    if pcfg.init == "uniform":
        return KeepProbs(jnp.full((n, k), keep, jnp.float32), jnp.full((n, f), keep, jnp.float32), gate, gate)
    if metric is None:
        raise ValueError("init wanda_sp needs the Wanda-sp metric (see `wanda_sp_metric`)")
    return KeepProbs(probs_from_metric(metric[0], keep), probs_from_metric(metric[1], keep), gate, gate)


# -- the driver: checkpointed, resumable, with a progress bar -----------------------------------------


def _batches(stream: np.ndarray, pcfg: PolicyGradientConfig, key_data, steps: range) -> np.ndarray:
    """The training windows of `steps` [S, B, seq_len + 1] (inputs and targets), each step's from its data
    key, drawn in one call."""
    data_keys = jax.vmap(lambda t: step_keys(key_data, t)[0])(jnp.arange(steps.start, steps.stop, dtype=jnp.int32))
    return sampler.sample_window_batches(stream, pcfg.batch_size, pcfg.seq_len + 1, keys=data_keys)


def _log(bar, steps: range, losses: np.ndarray, losses_k: list, state: PGState) -> None:
    """The host's look at `steps`, once they ran: their mean losses into `losses` (one transfer), a note
    for every non-finite one, the progress bar moved on with the baseline δ as its loss."""
    means = to_host(jnp.stack([jnp.mean(loss_k) for loss_k in losses_k]))
    losses[steps.start: steps.stop] = means
    for t in np.flatnonzero(~np.isfinite(means)):
        tqdm.write(f"policy gradient step {steps.start + t}: a sampled mask's loss is not finite; the step is skipped")
    bar.update(len(steps))
    bar.set_postfix(loss=f"{float(to_host(state.baseline)):.4f}")


def state_fingerprint(cfg: ModelConfig, pcfg: PolicyGradientConfig, target_sparsity: float,
                      extra: dict | None = None) -> dict:
    """What a learning run's state depends on (its directory's `meta.json`; `log_every` changes nothing);
    `extra` adds the caller's."""
    settings = {k: v for k, v in dataclasses.asdict(pcfg).items() if k != "log_every"}
    return {"policy_gradient": settings, "target_sparsity": target_sparsity, "model_config": cfg.to_hf(),
            **(extra or {})}


def learn_probs(weights: llama.Weights, cfg: ModelConfig, stream: np.ndarray, pcfg: PolicyGradientConfig,
                target_sparsity: float, state_dir: str | pathlib.Path, *, calib_bt: np.ndarray | None = None,
                calib_batch_size: int = 8, fingerprint: dict | None = None, mesh=None,
                progress: bool = True) -> tuple[KeepProbs, np.ndarray]:
    """Runs (or resumes) the training loop; returns the final probabilities and the mean loss of every step.

    `stream` is the calibration corpus as one token stream (step t's batch is what `sampler.sample_windows`
    draws from it with key fold_in(run key, t), a span of steps at a time); `calib_bt` are the windows for the Wanda-sp
    statistics. The state is saved with Orbax under `state_dir` every `checkpoint_every` steps and at the
    end; a directory written with other settings (`fingerprint`) is refused. The host waits for the device
    only every `log_every` steps (and at checkpoints), to read the losses and move the progress bar. The step
    runs on a copy of the weights with the layers stacked (`sharding.stack_layers`): one compiled block in a
    scan, whatever the depth, for the price of holding the weights twice while training.

    With a `mesh` (weights already placed by `sharding.weight_shardings`), every step's windows are split
    over `data` (when `batch_size` is a multiple of its size) and the state is kept on every device: the K
    masked forward passes run data- and model-parallel in the one compiled step, every device draws the
    same masks from the same key, and the result equals one device's up to floating-point summation order
    (so a run may resume on another mesh)."""
    state_dir = pathlib.Path(state_dir).absolute()  # Orbax wants absolute paths
    budget = keep_budget(cfg, target_sparsity)
    pg = policy_gradient(pcfg, budget)
    claim_directory(state_dir, state_fingerprint(cfg, pcfg, target_sparsity, fingerprint), "a policy-gradient run")
    manager = ocp.CheckpointManager(state_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2))
    key = jax.random.key(pcfg.seed)
    losses = np.zeros(pcfg.steps, np.float32)
    start = manager.latest_step()
    if start is None:
        start = 0
        metric = None
        if pcfg.init == "wanda_sp":
            if calib_bt is None:
                raise ValueError("init wanda_sp needs calibration windows (calib_bt)")
            metric = wanda_sp_metric(weights, cfg, calib_bt, batch_size=calib_batch_size, mesh=mesh)
        state = pg.init(initial_probs(pcfg, cfg, target_sparsity, metric), key=key)
        if mesh is not None:
            state = jax.device_put(state, replicated(mesh))
    else:  # the state's shapes (and placement) give the restore its tree structure
        zeros = KeepProbs(*(jnp.zeros(s, jnp.float32) for s in _prob_shapes(cfg)))
        template = jax.eval_shape(lambda: pg.init(zeros, key=key))
        if mesh is not None:
            template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)),
                                    template)
        restored = manager.restore(start, args=ocp.args.StandardRestore({"state": template, "losses": losses}))
        state, losses = restored["state"], np.array(restored["losses"])
        if progress:
            print(f"resuming policy gradient at step {start}/{pcfg.steps}")
    step_fn = compile_step(pg, cfg)
    stacked = stack_layers(weights, mesh)   # one compiled block scanned over the layers, whatever the depth
    key_data = to_host(state.key)   # the run's key: every step's batch is drawn from it on the host
    bar = tqdm(desc="policy gradient", unit="step", disable=not progress, initial=start, total=pcfg.steps)
    # Steps run in spans that end at every `log_every` and `checkpoint_every` multiple: within a span the
    # steps are dispatched back to back, and the host waits for the device only at the span's end.
    t = start
    while t < pcfg.steps:
        end = min(_next_multiple(t, pcfg.log_every), _next_multiple(t, pcfg.checkpoint_every), pcfg.steps)
        span, losses_k = range(t, end), []
        for tokens in _batches(stream, pcfg, key_data, span):
            state, step_losses = step_fn(state, stacked, put_batch(tokens, mesh))
            losses_k.append(step_losses)
        _log(bar, span, losses, losses_k, state)
        t = end
        if t % pcfg.checkpoint_every == 0 or t == pcfg.steps:
            manager.save(t, args=ocp.args.StandardSave({"state": state, "losses": losses}))
            manager.wait_until_finished()
    bar.close()
    manager.close()
    return state.probs, losses


def _next_multiple(t: int, every: int) -> int:
    return (t // every + 1) * every


def _prob_shapes(cfg: ModelConfig) -> KeepProbs:
    n = cfg.num_layers
    return KeepProbs((n, cfg.num_kv_heads), (n, cfg.intermediate_size), (n,), (n,))


def prune(weights: llama.Weights, cfg: ModelConfig, stream: np.ndarray, pcfg: PolicyGradientConfig,
          target_sparsity: float, state_dir: str | pathlib.Path, **kwargs) -> tuple[llama.Weights, ModelConfig, dict]:
    """Learns the probabilities (`learn_probs`, same keyword arguments), keeps the top-k units of each pool
    and slices them out: the physically smaller model, its config, and a report for the run summary."""
    probs, losses = learn_probs(weights, cfg, stream, pcfg, target_sparsity, state_dir, **kwargs)
    masks = hard_masks(probs, keep_budget(cfg, target_sparsity))
    pruned, pruned_cfg = llama.apply_masks(weights, cfg, masks)
    finite = np.isfinite(losses)
    if not finite.any():
        raise ValueError("every policy-gradient step had a non-finite loss, so nothing was learned; check the "
                         "model's weights and dtype (float32 avoids overflow)")
    curve = [float(c[np.isfinite(c)].mean()) if np.isfinite(c).any() else None
             for c in np.array_split(losses, min(100, len(losses)))]
    report = {"steps": pcfg.steps, "samples": pcfg.samples, "init": pcfg.init, "loss_curve": curve,
              "skipped_steps": int((~finite).sum()),
              "sublayers_removed": {"attn": sum(k == 0 for k in pruned_cfg.kv_groups),
                                    "mlp": sum(f == 0 for f in pruned_cfg.mlp_widths)}}
    return pruned, pruned_cfg, report
