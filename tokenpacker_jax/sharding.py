"""Device mesh and the one logical-axis rules table.

Every parameter is created with logical axis names (``nn.with_logical_partitioning``) and
large activations pass ``nn.with_logical_constraint``. The table below maps those names to
the three mesh axes:

- ``data``: pure data parallelism (parameters replicated).
- ``fsdp``: data parallelism whose parameters and optimizer state are split (ZeRO-3 style).
- ``tensor``: tensor parallelism over attention heads and MLP hidden units.

Use::

    mesh = make_mesh(config.mesh)                    # {"data": 2, "fsdp": -1, "tensor": 1}
    with use_mesh(mesh, config.sharding.rules):      # jax.set_mesh + flax axis rules
        abstract = jax.eval_shape(model.init, ...)
        shardings = logical_shardings(abstract, mesh)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Names prefixed ``activation_`` are for activations; the rest
# name parameter dimensions. A logical name absent here is replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("position", None),
    ("channels", None),
    ("patch_height", None),
    ("patch_width", None),
    ("levels", None),
    # after "embed": an adapter's rank takes the FSDP axis only where its layer leaves it free
    ("lora_rank", "fsdp"),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_region", None),
    ("activation_slot", None),
)


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves one ``-1`` entry to "the rest of the devices" and checks the product.

    Args:
      axis_sizes: size per mesh axis name (``data``, ``fsdp``, ``tensor``); at most one -1.
      num_devices: how many devices the mesh must cover.
    Returns:
      {axis: size} in ``MESH_AXES`` order, sizes multiplying to ``num_devices``.
    """
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)}; expected {MESH_AXES}")
    sizes = {axis: int(axis_sizes.get(axis, 1)) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {free}")
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {sizes}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh: {num_devices} devices are not divisible by the fixed axes {sizes}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh: {sizes} covers {math.prod(sizes.values())} devices, "
                         f"but {num_devices} are available")
    return sizes


def make_mesh(axis_sizes: Mapping[str, int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (the logical-rules path).

    ``jax.make_mesh`` defaults to Explicit axes in JAX 0.10; the logical-constraint path used
    here relies on the compiler propagating shardings, hence Auto.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(axis_sizes, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(shape))


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Normalises a rules table from a config (lists from YAML/CLI become tuples)."""
    if rules is None:
        return DEFAULT_RULES
    normalised = []
    for entry in rules:
        name, axes = entry
        if isinstance(axes, list):
            axes = tuple(axes)
        normalised.append((str(name), axes))
    return tuple(normalised)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[Sequence[Any]] | None = None):
    """Makes ``mesh`` current (``jax.set_mesh``) and installs the logical rules for Flax."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules_from_config(rules)):
        yield


def fit_to_shape(named: NamedSharding, shape: Sequence[int]) -> NamedSharding:
    """Drops mesh axes from dimensions they do not divide, which then stay replicated along
    them (e.g. the one KV head of a multi-query model under tensor=2)."""
    spec = list(named.spec) + [None] * (len(shape) - len(named.spec))
    fitted = []
    for size, axes in zip(shape, spec, strict=False):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        count = math.prod(named.mesh.shape[name] for name in names)
        fitted.append(axes if size % count == 0 else None)
    return NamedSharding(named.mesh, PartitionSpec(*fitted))


def logical_shardings(abstract_tree: Any, mesh: Mesh,
                      rules: Sequence[Sequence[Any]] | None = None) -> Any:
    """NamedShardings for a tree of (possibly boxed) abstract values from ``jax.eval_shape``.

    Leaves without logical names (plain arrays) are replicated; a mesh axis that does not
    divide its dimension is dropped there (``fit_to_shape``).
    """
    specs = nn.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules_from_config(rules))
    # The boxes' values, without the sharding constraint that nn.meta.unbox applies.
    shapes = jax.tree.map(
        lambda x: x.value.shape if isinstance(x, nn.meta.AxisMetadata) else x.shape,
        abstract_tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    return jax.tree.map(fit_to_shape, shardings, shapes,
                        is_leaf=lambda x: isinstance(x, NamedSharding))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of an array every device holds whole (scalars, counters, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a batch-major array: the leading axis over (data, fsdp)."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))
