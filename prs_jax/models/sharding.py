"""Logical axis names -> device mesh axes.

Parameters carry logical axis names (`logical_axes` metadata: "vocab", "embed", "heads", "kv_heads", "mlp",
"norm", and "layers" for the leading layer axis of a `scan_layers` model's stacked decoder layers, which the
default rules never shard); activations are constrained with names ("batch", "heads", "kv_heads", "mlp",
"embed_act"). A `MeshConfig` builds a mesh with axes (data, fsdp, tensor) and holds the rule table that maps
each logical name to mesh axes (`rules`, merged over DEFAULT_RULES; config files override single names, e.g.
`trainer.mesh.rules.batch=[data]`). A dimension that the mapped mesh axes do not divide evenly is replicated
instead (tiny models on big meshes keep working).

`constrain` takes effect only inside a `MeshContext` (`with MeshConfig(...).context().activate(): ...`), which
sets the jax mesh (`jax.set_mesh`) and the rule table together for the code traced and run inside it; outside
one it is a no-op. The rules live in a `contextvars.ContextVar` scoped by that context manager: nothing leaks
between runs. Jitted functions shared between callers that may use different rules (the tree engine's and the
scorer's programs) take the rules as a static argument and enter `use_rules` inside, so a cached program never
carries another caller's rules.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from prs_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Mapping[str, tuple[str, ...]]

LAYER_AXIS = "layers"  # logical name of the leading layer axis of stacked decoder layers (scan_layers)

# logical name -> mesh axes (a tuple shards one dim over several mesh axes)
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "embed_act": (),  # the hidden dimension of activations: replicated (sequence/tensor sharding is opt-in)
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "norm": (),
    LAYER_AXIS: (),  # the layer axis of stacked layers is never split: the layer scan takes one layer per step
}


def frozen_rules(rules: Rules | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A hashable form of a rule table (sorted (name, mesh axes) pairs), e.g. for a jit static argument."""
    return tuple(sorted((k, tuple(v)) for k, v in (rules if rules is not None else DEFAULT_RULES).items()))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape (-1 in one axis takes all remaining devices) and the logical-axis rules.

    `rules` maps logical names to mesh axes; the names given replace those of DEFAULT_RULES, the others keep
    their default (map a name to [] to replicate it).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES), hash=False)

    def __post_init__(self) -> None:
        merged = dict(DEFAULT_RULES)
        for name, axes in dict(self.rules).items():
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            bad = [a for a in axes if a not in MESH_AXES]
            if bad:
                raise ConfigError(f"mesh.rules.{name}: unknown mesh axis {bad[0]!r}; mesh axes are "
                                  f"{list(MESH_AXES)} (use [] to replicate).")
            if len(set(axes)) != len(axes):
                raise ConfigError(f"mesh.rules.{name}: mesh axes {list(axes)} repeat an axis.")
            merged[name] = axes
        object.__setattr__(self, "rules", merged)
        for name in ("data", "fsdp", "tensor"):
            v = getattr(self, name)
            if v != -1 and v < 1:
                raise ConfigError(f"mesh.{name} must be >= 1 or -1 (all remaining devices), got {v!r}.")

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

    def context(self, devices: Sequence[jax.Device] | None = None) -> "MeshContext":
        """The mesh over `devices` together with this config's rules."""
        return MeshContext(self.make_mesh(devices), self.rules)


_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("prs_jax_sharding_rules", default=None)


@contextlib.contextmanager
def use_rules(rules: Rules | tuple[tuple[str, tuple[str, ...]], ...] | None) -> Iterator[None]:
    """Make `constrain` use `rules` inside the block (None: keep the enclosing ones)."""
    if rules is None:
        yield
        return
    token = _RULES.set(dict(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def current_rules() -> Rules:
    """The rules `constrain` applies now: those of the innermost `MeshContext` / `use_rules`, else the default."""
    rules = _RULES.get()
    return DEFAULT_RULES if rules is None else rules


@dataclasses.dataclass(frozen=True)
class MeshContext:
    """A device mesh plus the logical-axis rules that go with it; `activate()` enters both."""

    mesh: Mesh
    rules: Rules = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))

    @property
    def frozen_rules(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return frozen_rules(self.rules)

    @contextlib.contextmanager
    def activate(self) -> Iterator["MeshContext"]:
        """Trace and run inside the mesh (`jax.set_mesh`) with these rules for `constrain`."""
        with jax.set_mesh(self.mesh), use_rules(self.rules):
            yield self

    def shard(self, model: nnx.Module) -> nnx.Module:
        """Place `model`'s parameters on the mesh by these rules (in place); returns the model."""
        return shard_model(model, self.mesh, self.rules)

    def batch_sharding(self, shape: Sequence[int]) -> NamedSharding:
        """Sharding of a host batch array: the leading dim on the rules' "batch" axes, the rest replicated."""
        return logical_to_sharding(shape, ("batch",) + (None,) * (len(shape) - 1), self.mesh, self.rules)


def mesh_context_of(module: nnx.Module, rules: Rules | None = None) -> MeshContext | None:
    """The MeshContext a module's parameters were placed on (None when they are on one device or not named)."""
    for _, leaf in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        sharding = getattr(value, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return MeshContext(sharding.mesh, dict(rules) if rules is not None else dict(DEFAULT_RULES))
    return None


def _spec_for(shape: Sequence[int], axes: Sequence[str | None] | None, mesh_shape: Mapping[str, int],
              rules: Rules) -> P:
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
                        rules: Rules | None = None) -> NamedSharding:
    """NamedSharding for an array of `shape` whose dims carry logical names `axes`."""
    return NamedSharding(mesh, _spec_for(shape, axes, dict(mesh.shape), DEFAULT_RULES if rules is None else rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | None = None) -> Any:
    """A pytree of NamedShardings matching `state` (abstract or concrete), from each leaf's logical axes."""

    def one(var: Any) -> Any:
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
        sharding = logical_to_sharding(value.shape, axes, mesh, rules)
        return var.replace(sharding) if isinstance(var, nnx.Variable) else sharding

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules | None = None) -> nnx.Module:
    """Place every parameter of `model` on `mesh` by its logical axes (in place); returns the model."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names, with the active rules (`MeshContext.activate`);
    a no-op unless a mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = _spec_for(x.shape, axes, dict(zip(mesh.axis_names, mesh.axis_sizes)), current_rules())
    return jax.lax.with_sharding_constraint(x, spec)
