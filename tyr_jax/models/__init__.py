"""Llama-family decoders: configuration and the pure-function forward pass."""

from tyr_jax.models.config import ModelConfig, RopeConfig
from tyr_jax.models.llama import (Attention, Block, Mlp, UnitMasks, Weights, abstract_weights, apply_masks,
                                  forward, init_weights, token_logprobs)

__all__ = ["Attention", "Block", "Mlp", "ModelConfig", "RopeConfig", "UnitMasks", "Weights", "abstract_weights",
           "apply_masks", "forward", "init_weights", "token_logprobs"]
