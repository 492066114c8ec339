"""Logical axis names -> device mesh axes.

Parameters carry logical axis names (`logical_axes` metadata: "vocab", "embed", "heads", "kv_heads", "mlp",
"norm"); activations are constrained with names ("batch", "heads", "mlp"). A `MeshConfig` builds a mesh with
axes (data, fsdp, tensor) and a rule table maps each logical name to mesh axes. A dimension that the mapped
mesh axes do not divide evenly is replicated instead (tiny models on big meshes keep working).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (a tuple shards one dim over several mesh axes)
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "norm": (),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape; -1 in one axis takes all remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def make_mesh(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        """Build a `jax.sharding.Mesh` with axes (data, fsdp, tensor) over `devices` (default: all)."""
        devs = list(devices if devices is not None else jax.devices())
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"MeshConfig {self}: at most one axis may be -1.")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if len(devs) % known:
                raise ValueError(f"MeshConfig {self}: {len(devs)} devices are not divisible by {known}.")
            sizes[sizes.index(-1)] = len(devs) // known
        if math.prod(sizes) != len(devs):
            raise ValueError(f"MeshConfig {self}: mesh of {math.prod(sizes)} devices, but {len(devs)} are available.")
        arr = np.asarray(devs, dtype=object).reshape(sizes)
        return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _spec_for(shape: Sequence[int], axes: Sequence[str | None] | None, mesh_shape: Mapping[str, int],
              rules: Mapping[str, tuple[str, ...]]) -> P:
    if not axes:
        return P()
    out: list[Any] = []
    used: set[str] = set()
    for dim, name in zip(shape, axes):
        mesh_axes = tuple(a for a in rules.get(name, ()) if a in mesh_shape and a not in used) if name else ()
        size = math.prod(mesh_shape[a] for a in mesh_axes) if mesh_axes else 1
        if not mesh_axes or size == 1 or dim % size:
            out.append(None)
            continue
        used.update(mesh_axes)
        out.append(mesh_axes if len(mesh_axes) > 1 else mesh_axes[0])
    return P(*out)


def logical_to_sharding(shape: Sequence[int], axes: Sequence[str | None] | None, mesh: Mesh,
                        rules: Mapping[str, tuple[str, ...]] | None = None) -> NamedSharding:
    """NamedSharding for an array of `shape` whose dims carry logical names `axes`."""
    return NamedSharding(mesh, _spec_for(shape, axes, dict(mesh.shape), rules or DEFAULT_RULES))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, tuple[str, ...]] | None = None) -> Any:
    """A pytree of NamedShardings matching `state` (abstract or concrete), from each leaf's logical axes."""

    def one(var: Any) -> Any:
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
        sharding = logical_to_sharding(value.shape, axes, mesh, rules)
        return var.replace(sharding) if isinstance(var, nnx.Variable) else sharding

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping[str, tuple[str, ...]] | None = None) -> nnx.Module:
    """Place every parameter of `model` on `mesh` by its logical axes (in place); returns the model."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op unless a mesh is set (`jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = _spec_for(x.shape, axes, dict(zip(mesh.axis_names, mesh.axis_sizes)), DEFAULT_RULES)
    return jax.lax.with_sharding_constraint(x, spec)
