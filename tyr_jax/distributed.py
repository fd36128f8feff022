"""Several processes (hosts) driving one mesh: start-up, which process writes, and barriers.

Every process runs the same program on the same inputs (calibration windows, fitness pool and
mutations are reproducible from seeds), so every process holds the same host-side state and issues
the same computations; only process 0 writes files that are not Orbax checkpoints (meta.json,
run_config.json, summary.json, plots, the exported model). Orbax checkpoints are written by all
processes together (Orbax coordinates them). The output directory must be one filesystem that every
host mounts at the same path.
"""

from __future__ import annotations

import json
import pathlib

import jax
from jax.experimental import multihost_utils


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """`jax.distributed.initialize`, before anything else touches the devices.

    Without arguments JAX finds the cluster itself (SLURM, Open MPI, Kubernetes, Cloud TPU pods);
    elsewhere give the coordinator's `host:port` (or set JAX_COORDINATOR_ADDRESS), the number of
    processes and this process's index."""
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process got here (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def claim_directory(root: pathlib.Path, fingerprint: dict, holds: str) -> None:
    """Makes `root` the home of the work `fingerprint` describes, or refuses it.

    Process 0 writes `root/meta.json` the first time (atomically); every process then checks it, so a
    directory holding other work (`holds`, e.g. "a supernet built") is refused, never overwritten."""
    fingerprint = json.loads(json.dumps(fingerprint))  # tuples → lists, as they read back
    meta = root / "meta.json"
    if is_primary() and not meta.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
        tmp.replace(meta)
    barrier(f"claim {root}")
    try:
        existing = json.loads(meta.read_text())
    except json.JSONDecodeError:
        raise ValueError(f"{meta} is corrupt; delete {root} to start again") from None
    if existing != fingerprint:
        diff = "; ".join(f"{key}: stored {_show(a)}, requested {_show(b)}"
                         for key, a, b in differences(existing, fingerprint))
        raise ValueError(f"{root} holds {holds} with other settings ({diff}); use another output directory "
                         "or delete it to start again")


_MISSING = object()


def differences(stored, requested, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, stored, requested) of every leaf where two JSON trees differ, nested dicts descended."""
    if isinstance(stored, dict) and isinstance(requested, dict):
        out = []
        for k in sorted(set(stored) | set(requested)):
            out += differences(stored.get(k, _MISSING), requested.get(k, _MISSING), f"{prefix}{k}.")
        return out
    return [] if stored == requested else [(prefix.rstrip("."), stored, requested)]


def _show(value, limit: int = 60) -> str:
    text = "(absent)" if value is _MISSING else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
