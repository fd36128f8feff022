"""Device meshes and the one table that maps logical array axes to mesh axes.

Every weight field declares its logical axes (`tyr_jax.models.llama`, field metadata `axes`); this
module turns them into `NamedSharding`s for a mesh with axes `data` and `model`. A dimension that the
mesh axis does not divide (a pruned layer with 3 KV groups on 2 devices) stays replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Logical axis → mesh axis. Tokens go over `data`; heads, KV groups, MLP channels and vocab over `model`.
LOGICAL_RULES: Mapping[str, str | None] = {
    "batch": "data",
    "embed": None,
    "kv": "model",
    "head_dim": None,
    "mlp": "model",
    "vocab": "model",
}


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh; `data` defaults to all remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    if data is None:
        data = len(devices) // model
    if data < 1 or data * model > len(devices):
        raise ValueError(f"mesh data={data} × model={model} needs {data * model} devices, "
                         f"but {len(devices)} are available")
    grid = np.asarray(devices[: data * model]).reshape(data, model)
    return Mesh(grid, ("data", "model"))


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
             rules: Mapping[str, str | None] = LOGICAL_RULES) -> P:
    """PartitionSpec for an array with logical `axes`; undividable dimensions are replicated."""
    spec = []
    for name, size in zip(axes, shape):
        mesh_axis = rules.get(name) if name else None
        if mesh_axis is not None and (mesh_axis not in mesh.shape or size % mesh.shape[mesh_axis]):
            mesh_axis = None
        spec.append(mesh_axis)
    return P(*spec)


def weight_shardings(weights, mesh: Mesh, rules: Mapping[str, str | None] = LOGICAL_RULES):
    """A pytree of `NamedSharding`s matching `weights` (real or abstract), from the fields' axes."""

    def visit(node):
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            out = {}
            for field in dataclasses.fields(node):
                value = getattr(node, field.name)
                if value is None:
                    out[field.name] = None
                elif "axes" in field.metadata and hasattr(value, "shape"):
                    out[field.name] = NamedSharding(mesh, spec_for(field.metadata["axes"], value.shape, mesh, rules))
                else:
                    out[field.name] = visit(value)
            return dataclasses.replace(node, **out)
        if isinstance(node, (list, tuple)):
            return type(node)(visit(n) for n in node)
        raise TypeError(f"unexpected node {type(node).__name__} in weights")

    return visit(weights)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over `data`, the rest replicated."""
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
