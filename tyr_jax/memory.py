"""Per-device memory of a pruning run on a mesh, from abstract shapes and the sharding table.

Nothing is allocated: shapes come from `jax.eval_shape` (or the abstract weight and bank tables),
placements from `tyr_jax.sharding`, and bytes per device from each array's shard shape. With
`compile_steps`, the working sets of the pruner and of one search call are XLA's own buffer assignment
of the partitioned programs (compiled for the local backend, never run; on CPU an upper bound, as
bf16 matmul operands are converted to fp32 there).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig, RopeConfig
from tyr_jax.pruning import SublayerStats
from tyr_jax.search import SearchConfig, abstract_bank, candidates_kl, pool_topk, search_weights, stage_layouts
from tyr_jax.sharding import batch_sharding, data_size, logical_sharding, replicated, weight_shardings
from tyr_jax.supernet import (SupernetConfig, attn_stats_step, level_removals, mlp_stats_step, prune_step,
                              split_hparams, stats_shardings)

LLAMA31_70B = ModelConfig(
    vocab_size=128256, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
    intermediate_size=28672, rms_norm_eps=1e-5, rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0,
    low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192))


def device_bytes(tree, shardings) -> int:
    """Bytes that one device holds of `tree` (arrays or ShapeDtypeStructs) placed with `shardings`."""
    leaves, placements = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    if len(leaves) != len(placements):
        raise ValueError(f"{len(leaves)} arrays but {len(placements)} shardings")
    return sum(int(np.prod(s.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize for x, s in zip(leaves, placements))


def total_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _placed(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings`, to lower a program as it would run."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _compiled_bytes(lowered) -> int:
    """Arguments + outputs + temporaries per device of a lowered program (XLA's buffer assignment)."""
    m = lowered.compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes


def pruner_bytes(mesh, d_in: int, d_out: int, unit_size: int, removals: tuple[int, ...], round_size: int,
                 dtype=jnp.bfloat16) -> int:
    """Working set per device of the Týr pruner on one sublayer, statistics and weight rows placed as
    `build_supernet` places them."""
    stats = _placed(_variant_stats(d_in), stats_shardings(mesh, d_in, 1))
    axis = "kv" if unit_size > 1 else "mlp"
    w = jax.ShapeDtypeStruct((d_in, d_out), dtype, sharding=logical_sharding(mesh, (axis, "embed"), (d_in, d_out)))
    kind = "attn" if unit_size > 1 else "mlp"
    traced, static = split_hparams([SupernetConfig(attn_round_size=round_size, mlp_round_size=round_size)], kind)
    return _compiled_bytes(prune_step.lower(w, stats, traced, "tyr", unit_size, np.asarray(removals, np.int32),
                                            static))


def _variant_stats(d_in: int):
    """Abstract statistics of one sublayer for a build of one config (a leading variant axis of 1)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((1,) + a.shape, a.dtype),
                        jax.eval_shape(functools.partial(SublayerStats.zeros, d_in)))


def _compiled_item(device: int, start: float) -> dict:
    """A plan item for compiled steps: `device` bytes per device, and the seconds since `start` (their
    compiles)."""
    return {"device": device, "total": None, "compile_s": time.perf_counter() - start}


def memory_plan(cfg: ModelConfig, mesh, *, dtype=jnp.bfloat16, num_levels: int = 9, calib_sequences: int = 2048,
                calib_seq_len: int = 2048, calib_batch: int = 8, search: SearchConfig = SearchConfig(),
                compile_steps: bool = False) -> dict[str, dict[str, int | None]]:
    """{item: {"device": bytes on one device, "total": bytes of the whole array(s)}}.

    Supernet: the weights, the calibration activations (all stay on the devices, split over `data`)
    and one sublayer's statistics (rows over every device); with `compile_steps`, the pruner's working
    set (`pruner_attn`, `pruner_mlp`, arguments included) and the temporaries of one statistics step
    on a batch of `calib_batch` windows (`stats_call`, the larger of attention and MLP). Search: the weights, the bank of `num_levels`
    dense-shaped copies of every sublayer and the fitness pool's dense top-k (split over `data`); with
    `compile_steps`, the largest of a generation's three `candidates_kl` call layouts (`search_call`,
    temporaries only); the search scans a stacked copy of the layers without o_proj and down_proj
    (`search_blocks`, `search.search_weights`), held beside the weights while it runs. `supernet` and
    `search` sum what one device holds at the peak of each phase. Compiled items also carry `compile_s`,
    the seconds their compiles took (the search call: all of a generation's layouts)."""
    weights = llama.abstract_weights(cfg, dtype)
    w_sh = weight_shardings(weights, mesh)
    plan: dict[str, dict[str, int | None]] = {}

    def add(name, tree, shardings):
        plan[name] = {"device": device_bytes(tree, shardings), "total": total_bytes(tree)}

    add("weights", weights, w_sh)
    add("calibration_activations", jax.ShapeDtypeStruct((calib_sequences, calib_seq_len, cfg.hidden_size), dtype),
        batch_sharding(mesh, 3))
    attn_in = cfg.num_kv_heads * cfg.q_per_kv * cfg.head_dim
    for name, d_in in (("hessian_attn", attn_in), ("hessian_mlp", cfg.intermediate_size)):
        add(name, jax.eval_shape(functools.partial(SublayerStats.zeros, d_in)), stats_shardings(mesh, d_in))
    stacked = jax.eval_shape(search_weights, weights)
    stacked_sh = weight_shardings(stacked, mesh)
    add("search_blocks", stacked.blocks, stacked_sh.blocks)
    bank = abstract_bank(cfg, num_levels, dtype)
    bank_sh = weight_shardings(bank, mesh)
    add("bank", bank, bank_sh)
    tokens = jax.ShapeDtypeStruct((search.pool_sequences, search.seq_len), jnp.int32)
    cache = jax.eval_shape(functools.partial(pool_topk, cfg=cfg, k=search.top_k, batch=1, chunk=search.logit_chunk),
                           weights, tokens)
    cache_sh = (batch_sharding(mesh, 3),) * 2
    add("topk_cache", cache, cache_sh)
    sublayer = "hessian_mlp"
    if compile_steps:
        mlp_levels = level_removals(cfg.intermediate_size, 0.5, 0.125, num_levels, 32)
        attn_levels = level_removals(cfg.num_kv_heads, 0.5, 0.125, num_levels, 1)
        start = time.perf_counter()
        plan["pruner_mlp"] = _compiled_item(pruner_bytes(mesh, cfg.intermediate_size, cfg.hidden_size, 1, mlp_levels,
                                                         16, dtype), start)
        start = time.perf_counter()
        plan["pruner_attn"] = _compiled_item(pruner_bytes(mesh, attn_in, cfg.hidden_size, cfg.q_per_kv * cfg.head_dim,
                                                          attn_levels, 1, dtype), start)
        sublayer = max(("pruner_attn", "pruner_mlp"), key=lambda n: plan[n]["device"])
        x = jax.ShapeDtypeStruct((1, calib_batch, calib_seq_len, cfg.hidden_size), dtype,
                                 sharding=NamedSharding(mesh, P(None, "data", None, None)))
        positions = jax.ShapeDtypeStruct((calib_batch, calib_seq_len), jnp.int32)
        rope = _placed(jax.eval_shape(functools.partial(llama.rope_tables, cfg), positions), (batch_sharding(mesh, 3),) * 2)
        blk = _placed(weights.blocks[0], w_sh.blocks[0])
        temps, start = [], time.perf_counter()
        for step, sub, d_in, extra in ((attn_stats_step, blk.attn, attn_in, (rope,)),
                                       (mlp_stats_step, blk.mlp, cfg.intermediate_size, ())):
            stats = _placed(_variant_stats(d_in), stats_shardings(mesh, d_in, 1))
            lowered = step.lower(sub, x, stats, *extra, cfg, stats_shardings(mesh, d_in, 1))
            temps.append(lowered.compile().memory_analysis().temp_size_in_bytes)
        plan["stats_call"] = _compiled_item(max(temps), start)
        levels = (2, cfg.num_layers)
        # The search call is compiled in fp32: in bf16, XLA on CPU converts every stacked operand (the
        # layers and the bank it indexes) to fp32 once ahead of the layer loop, which no GPU does; fp32
        # throughout bounds the bf16 program's temporaries from above and does not grow with depth.
        stacked32 = jax.eval_shape(search_weights, llama.abstract_weights(cfg, jnp.float32))
        bank32 = abstract_bank(cfg, num_levels, jnp.float32)
        temps, start = [], time.perf_counter()
        for call in stage_layouts(search, data_size(mesh)):
            cand = batch_sharding(mesh, 3) if call.over == "candidates" else replicated(mesh)
            tok = batch_sharding(mesh) if call.over == "tokens" else replicated(mesh)
            args = (_placed(stacked32, stacked_sh), _placed(bank32, bank_sh),
                    jax.ShapeDtypeStruct(levels, jnp.int32, sharding=replicated(mesh)),
                    jax.ShapeDtypeStruct((call.padded, *levels), jnp.int32, sharding=cand),
                    jax.ShapeDtypeStruct((call.windows, search.seq_len), jnp.int32, sharding=tok),
                    *_placed(cache, cache_sh), jax.ShapeDtypeStruct((call.windows,), jnp.int32, sharding=replicated(mesh)))
            lowered = candidates_kl.lower(*args, cfg, call.group, mesh, call.over, search.logit_chunk)
            temps.append(lowered.compile().memory_analysis().temp_size_in_bytes)
        plan["search_call"] = _compiled_item(max(temps), start)

    def peak(*names):
        return sum(plan[n]["device"] for n in names if n in plan)

    # Statistics steps and the pruner run one after the other: the larger of the two is live.
    step = max((sublayer, "stats_call"), key=lambda n: plan.get(n, {"device": 0})["device"])
    plan["supernet"] = {"device": peak("weights", "calibration_activations", step), "total": None}
    plan["search"] = {"device": peak("weights", "search_blocks", "bank", "topk_cache", "search_call"), "total": None}
    return plan
