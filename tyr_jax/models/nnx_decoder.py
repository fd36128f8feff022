"""The decoder as a Flax NNX module, for training loops (optax, Tunix) and anyone who holds models as NNX.

The equations stay in `llama.py`; this module only holds the weights as `nnx.Param`s and calls
`llama.forward` on them. A model whose layers all have one shape (a dense model, or one pruned uniformly)
keeps its blocks stacked on a leading layer axis, and its forward pass scans over them: one compiled block
whatever the depth. A physically pruned model with per-layer sizes keeps a list of blocks of their own
sizes. Hot loops stay pure functions under `jax.jit`: `nnx.split` / `nnx.merge` at the boundary, or
`Decoder.weights()` for the `llama.Weights` pytree the rest of tyr-jax takes.

    model = Decoder.from_pretrained("runs/smollm2-25/model")       # any export, HF directory or GGUF
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from tyr_jax.models import llama
from tyr_jax.models.config import ModelConfig


class Decoder(nnx.Module):
    """A Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2; pruned or not) as an NNX module."""

    def __init__(self, weights: llama.Weights, cfg: ModelConfig, *, stack: bool | None = None):
        """`stack`: hold the blocks on a leading layer axis (default: whenever they all have one shape)."""
        blocks = weights.blocks
        if stack is None:
            stack = llama.stackable(blocks)
        if stack:
            weights = dataclasses.replace(weights, blocks=llama.stack_blocks(blocks))
        self.cfg = cfg
        self.params = nnx.data(jax.tree.map(nnx.Param, weights))

    @classmethod
    def from_pretrained(cls, spec: str | os.PathLike, *, dtype=jnp.float32, stack: bool | None = None) -> Decoder:
        """An HF directory (tyr-jax exports included), a GGUF file or a built-in name."""
        from tyr_jax.loading import load_model

        loaded = load_model(spec, dtype=dtype)
        return cls(loaded.weights, loaded.cfg, stack=stack)

    @property
    def stacked(self) -> bool:
        return isinstance(self.params.blocks, llama.Block)

    def _arrays(self) -> llama.Weights:
        return jax.tree.map(lambda p: p[...], self.params, is_leaf=lambda v: isinstance(v, nnx.Variable))

    def weights(self) -> llama.Weights:
        """The weights as tyr-jax's pytree, blocks as a list (what pruning, export and decoding take)."""
        w = self._arrays()
        return dataclasses.replace(w, blocks=llama.unstack_blocks(w.blocks)) if self.stacked else w

    def __call__(self, tokens_bt: Int[Array, "B T"], *, positions_bt: Array | None = None,
                 masks: llama.UnitMasks | None = None) -> Float[Array, "B T V"]:
        """Next-token logits in fp32."""
        return llama.forward(self._arrays(), tokens_bt, self.cfg, positions_bt=positions_bt, masks=masks)
