"""Resumable per-block work on disk: one Orbax checkpoint per decoder block under a fingerprinted directory.

Both block-by-block builders use it: the Týr supernet (`tyr_jax.supernet`) and the PBS²P compressor
(`tyr_jax.binarization.compress`). `meta.json` fingerprints what the blocks depend on (model,
calibration, settings); opening a directory built with anything else is refused, never overwritten.
"""

from __future__ import annotations

import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from tyr_jax.distributed import barrier, claim_directory, is_primary


class BlockStore:
    """A directory of Orbax checkpoints, one per block (`block_007/`), plus `meta.json`."""

    holds = "blocks built"   # how a refusal names the directory's contents

    def __init__(self, root: str | pathlib.Path, fingerprint: dict):
        self.root = pathlib.Path(root).absolute()  # Orbax wants absolute paths
        self.fingerprint = fingerprint
        claim_directory(self.root, fingerprint, self.holds)
        self._ckpt = ocp.StandardCheckpointer()

    def block_dir(self, i: int) -> pathlib.Path:
        return self.root / f"block_{i:03d}"

    def has_block(self, i: int) -> bool:
        return (self.block_dir(i) / "_CHECKPOINT_METADATA").exists()

    def finished_blocks(self) -> int:
        """How many blocks from the first are saved (a resumed build starts after them)."""
        done = 0
        while done < self.num_blocks() and self.has_block(done):
            done += 1
        return done

    def save_block(self, i: int, tree: dict) -> None:
        path = self.block_dir(i)
        if path.exists() and is_primary():  # a leftover of a killed save of this very block
            shutil.rmtree(path)
        barrier(f"block-save {path}")
        self._ckpt.save(path, tree)   # every process calls it; Orbax writes once
        self._ckpt.wait_until_finished()

    def load_block(self, i: int) -> dict:
        if not self.has_block(i):
            raise FileNotFoundError(f"{self.block_dir(i)} is missing: the build is incomplete; run the same "
                                    "command again to finish it")
        tree = self._ckpt.restore(self.block_dir(i))
        return jax.tree.map(np.asarray, tree)

    def num_blocks(self) -> int:
        return self.fingerprint["num_layers"]
