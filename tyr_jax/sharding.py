"""Device meshes and the one table that maps logical array axes to mesh axes.

Every weight field declares its logical axes (`tyr_jax.models.llama`, field metadata `axes`; the
search's `LevelBank` likewise); this module turns them into `NamedSharding`s for a mesh with axes
`data` and `model`. A dimension that its mesh axes do not divide (a pruned layer with 3 KV groups on
2 devices) stays replicated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tyr_jax.models import llama

# Logical axis → mesh axis (or axes). Tokens and sequences go over `data`; heads, KV groups, MLP
# channels and vocab over `model`. The rows of a sublayer's Hessian (and of the pruner's working
# matrices, which inherit them) go over every device: statistics are reduce-scattered, and the
# pruner's row updates run in parallel.
LOGICAL_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": "data",
    "embed": None,
    "kv": "model",
    "head_dim": None,
    "mlp": "model",
    "vocab": "model",
    "hessian": ("data", "model"),
}


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh; `data` defaults to all devices not used by `model`."""
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or (data is not None and data < 1):
        raise ValueError(f"mesh sizes must be >= 1, got data={data}, model={model}")
    if data is None:
        if len(devices) % model:
            raise ValueError(f"mesh.model={model} does not divide the {len(devices)} devices; set mesh.data too")
        data = len(devices) // model
    if data * model > len(devices):
        raise ValueError(f"mesh data={data} × model={model} needs {data * model} devices, but only "
                         f"{len(devices)} are available")
    if jax.process_count() > 1 and data * model != len(devices):
        raise ValueError(f"with {jax.process_count()} processes the mesh must use all {len(devices)} devices, "
                         f"got data={data} × model={model}")
    # `model` innermost: its devices are neighbours (one host, NVLink / ICI), as its collectives are frequent.
    grid = np.asarray(devices[: data * model]).reshape(data, model)
    return Mesh(grid, ("data", "model"))


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
             rules: Mapping[str, str | tuple[str, ...] | None] = LOGICAL_RULES) -> P:
    """PartitionSpec for an array with logical `axes`; undividable dimensions are replicated."""
    spec = []
    for name, size in zip(axes, shape):
        mesh_axes = rules.get(name) if name else None
        if mesh_axes is not None:
            names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            if any(n not in mesh.shape for n in names) or size % math.prod(mesh.shape[n] for n in names):
                mesh_axes = None
        spec.append(mesh_axes)
    return P(*spec)


def weight_shardings(weights, mesh: Mesh, rules: Mapping[str, str | tuple[str, ...] | None] = LOGICAL_RULES):
    """A pytree of `NamedSharding`s matching `weights` (real or abstract), from the fields' axes.

    A field with `axes` may hold one array or a list of arrays (one per layer) of those axes, or an array
    with leading axes beyond them (stacked layers, `llama.stack_blocks`), which stay whole."""

    def visit(node):
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            out = {}
            for field in dataclasses.fields(node):
                value = getattr(node, field.name)
                if value is None:
                    out[field.name] = None
                elif "axes" in field.metadata:
                    out[field.name] = jax.tree.map(
                        lambda a, axes=field.metadata["axes"]: NamedSharding(mesh, spec_for(
                            (None,) * (len(a.shape) - len(axes)) + tuple(axes), a.shape, mesh, rules)),
                        value)
                else:
                    out[field.name] = visit(value)
            return dataclasses.replace(node, **out)
        if isinstance(node, (list, tuple)):
            return type(node)(visit(n) for n in node)
        raise TypeError(f"unexpected node {type(node).__name__} in weights")

    return visit(weights)


def stack_layers(weights, mesh: Mesh | None = None):
    """`weights` with its blocks stacked on a leading layer axis (`llama.stack_blocks`), placed by the table
    on `mesh`, so a forward pass scans one compiled block; a model whose layers differ in size is returned
    as it is. The stacked copy is new memory: the caller's list of blocks stays."""
    if isinstance(weights.blocks, llama.Block) or not llama.stackable(weights.blocks):
        return weights
    stack = lambda w: dataclasses.replace(w, blocks=llama.stack_blocks(w.blocks))  # noqa: E731
    if mesh is None:
        return jax.jit(stack)(weights)
    return jax.jit(stack, out_shardings=weight_shardings(jax.eval_shape(stack, weights), mesh))(weights)


def logical_sharding(mesh: Mesh, axes: tuple[str | None, ...], shape: tuple[int, ...]) -> NamedSharding:
    """`NamedSharding` of one array with logical `axes` (the table's rule, replicated where undividable)."""
    return NamedSharding(mesh, spec_for(axes, shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over `data`, the rest replicated."""
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def put_batch(a: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """Host windows on the mesh: split over `data` along the first axis when it divides, else on every
    device (no mesh: the default device)."""
    if mesh is None:
        return jax.numpy.asarray(a)
    split = len(a) % data_size(mesh) == 0
    return jax.device_put(a, batch_sharding(mesh, a.ndim) if split else replicated(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_size(mesh: Mesh | None) -> int:
    """Devices on the mesh's `data` axis (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape["data"]


def to_host(x) -> np.ndarray:
    """The whole value of a (possibly multi-host) array as NumPy; every process must call it."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
