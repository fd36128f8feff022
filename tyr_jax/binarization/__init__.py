"""PBS²P: 1-bit binarization with N:M semi-structured pruning of every linear (ALGORITHMS.md §3).

Unlike the structural pruners of `tyr_jax.pruning`, which remove whole heads and channels through an
output projection, this acts on every weight of every decoder linear:

  arb       ARB binarization of a block of columns over its kept entries
  nm        N:M masks by Hessian saliency, the SPBO schedule, CFS's coarse per-block N
  linear    one linear in GPTQ order: column blocks, SPBO, error feedback
  compress  the whole model, block after block, resumable (Orbax)
  packed    the packed export (signs and masks as bits, α and μ in float16) and its loader
"""

from tyr_jax.binarization.compress import Pbs2pConfig, Pbs2pStore, compress_model
from tyr_jax.binarization.linear import VARIANTS, BinaryLinear, compress_linear, output_error

__all__ = ["VARIANTS", "BinaryLinear", "Pbs2pConfig", "Pbs2pStore", "compress_linear", "compress_model",
           "output_error"]
