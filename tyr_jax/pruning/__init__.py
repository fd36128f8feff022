"""Local pruners of one sublayer's output projection, registered by name (see `base`)."""

from tyr_jax.pruning import baselines, tyr  # noqa: F401  (registers the pruners)
from tyr_jax.pruning.base import (PRUNERS, LevelResult, SublayerStats, accumulate_stats, get_pruner,
                                  register)

__all__ = ["PRUNERS", "LevelResult", "SublayerStats", "accumulate_stats", "get_pruner", "register"]
