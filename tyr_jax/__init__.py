"""tyr-jax: structural pruning of Llama-family LLMs in JAX (Týr-the-Pruner and relatives)."""

from tyr_jax.binarization import Pbs2pConfig, compress_model
from tyr_jax.coarse_to_fine import coarse_to_fine
from tyr_jax.evaluation.perplexity import perplexity
from tyr_jax.loading import LoadedModel, load_model
from tyr_jax.models import ModelConfig, UnitMasks, Weights, apply_masks, forward, init_weights, token_logprobs
from tyr_jax.pruning import PRUNERS, LevelResult, SublayerStats, get_pruner
from tyr_jax.supernet import LevelPlan, SupernetConfig, SupernetStore, assemble, build_supernet, build_supernets

__version__ = "0.1.0"

__all__ = ["PRUNERS", "LevelPlan", "LevelResult", "LoadedModel", "ModelConfig", "Pbs2pConfig", "SublayerStats",
           "SupernetConfig", "SupernetStore", "UnitMasks", "Weights", "apply_masks", "assemble", "build_supernet",
           "build_supernets", "coarse_to_fine", "compress_model", "forward", "get_pruner", "init_weights", "load_model",
           "perplexity", "token_logprobs"]
