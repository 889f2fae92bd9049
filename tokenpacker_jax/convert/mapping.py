"""Name-mapping tables between PyTorch state dicts and our parameter trees, both directions.

A table is a list of ``Rule``s. Each rule names one of our parameters (a path in the params
tree), the PyTorch key it comes from (``{i}`` stands for the layer index when our parameter
is stacked over scanned layers), and a ``Transform`` that converts one tensor each way.
The same table imports (``import_params``) and exports (``export_params``), so the two
directions cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from tokenpacker_jax.user_error import CheckpointError

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    """Converts one tensor: ``to_ours(torch_value, our_shape)`` and ``to_torch(our_value)``."""

    name: str
    to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _linear(num_in_axes: int) -> Transform:
    """PyTorch Linear weight [out, in] <-> our DenseGeneral kernel [*in_axes, *out_axes]."""

    def to_torch(kernel):
        fan_in = math.prod(kernel.shape[:num_in_axes])
        return kernel.reshape(fan_in, -1).T

    return Transform(f"linear{num_in_axes}", lambda w, shape: w.T.reshape(shape), to_torch)


IDENTITY = Transform("identity", lambda w, shape: w.reshape(shape), lambda w: w)
# Biases of multi-axis projections, e.g. [heads * head_dim] <-> [heads, head_dim].
FLAT = Transform("flat", lambda w, shape: w.reshape(shape), lambda w: w.reshape(-1))
LINEAR = _linear(1)
# Output projections whose input is (heads, head_dim): kernel [heads, head_dim, out].
LINEAR_IN2 = _linear(2)
# Conv2d weight [out, in, kh, kw] <-> patch-embedding kernel [kh, kw, in, out].
CONV = Transform("conv", lambda w, shape: w.transpose(2, 3, 1, 0).reshape(shape),
                 lambda w: w.transpose(3, 2, 0, 1))


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: Path  # path in our params tree, e.g. ("encoder", "layers", "fc1", "kernel")
    torch_key: str  # e.g. "encoder.layers.{i}.mlp.fc1.weight"
    transform: Transform = IDENTITY

    @property
    def stacked(self) -> bool:
        return "{i}" in self.torch_key


class RenamedKeys(Mapping):
    """Read-only view of a checkpoint ``state`` under other key names: ``names`` maps each
    name shown to the key of ``state`` it reads. Tensors are read on access, so a lazy
    ``TensorReader`` stays lazy; keys left out of ``names`` are hidden."""

    def __init__(self, state: Mapping, names: Mapping[str, str]):
        self._state = state
        self._keys = dict(names)

    def __getitem__(self, name: str):
        return self._state[self._keys[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _unbox(tree: Any) -> Any:
    return nn.meta.unbox(tree)


def check_coverage(table: list[Rule], abstract_params: Any, where: str) -> None:
    """Every parameter of the module has exactly one rule, and every rule a parameter."""
    flat = traverse_util.flatten_dict(_unbox(abstract_params))
    ours = [rule.ours for rule in table]
    missing = sorted(set(flat) - set(ours))
    extra = sorted(set(ours) - set(flat))
    if missing or extra:
        raise ValueError(f"{where}: mapping table out of date: parameters without a rule "
                         f"{['/'.join(p) for p in missing]}; rules without a parameter "
                         f"{['/'.join(p) for p in extra]}")


def expected_torch_keys(table: list[Rule], num_layers: int) -> list[str]:
    keys = []
    for rule in table:
        if rule.stacked:
            keys.extend(rule.torch_key.format(i=i) for i in range(num_layers))
        else:
            keys.append(rule.torch_key)
    return keys


def import_params(table: list[Rule], state: Mapping[str, np.ndarray], abstract_params: Any,
                  *, num_layers: int, where: str, dtype: Any = None,
                  shardings: Any = None) -> dict:
    """Builds our params tree from a (lazy) PyTorch state dict.

    Args:
      table: the family's rules.
      state: {torch key: array}, already stripped of any model prefix; read one key at a time.
      abstract_params: ``jax.eval_shape`` of the module's init (boxed or not): target shapes.
      num_layers: length of the scanned (stacked) axis.
      where: checkpoint name for error messages.
      dtype: cast every parameter to this dtype (default: the abstract params' dtypes).
      shardings: optional tree of ``jax.sharding.Sharding`` like ``abstract_params``: each
        parameter goes straight to its shards and the host copy is dropped.
    Returns:
      Nested dict of jax arrays with the module's parameter structure.
    """
    check_coverage(table, abstract_params, where)
    expected = expected_torch_keys(table, num_layers)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: checkpoint does not match the model: missing keys "
                              f"{missing}; unexpected keys {unexpected}")
    flat_abstract = traverse_util.flatten_dict(_unbox(abstract_params))
    flat_shardings = (traverse_util.flatten_dict(_unbox(shardings))
                      if shardings is not None else {})
    out = {}
    for rule in table:
        target = flat_abstract[rule.ours]
        shape = tuple(target.shape)
        if rule.stacked:
            per_layer = shape[1:]
            value = np.stack([
                _convert_one(rule, state, rule.torch_key.format(i=i), per_layer, where)
                for i in range(num_layers)])
        else:
            value = _convert_one(rule, state, rule.torch_key, shape, where)
        value = value.astype(dtype or target.dtype)
        sharding = flat_shardings.get(rule.ours)
        out[rule.ours] = jax.device_put(value, sharding) if sharding else jax.numpy.asarray(value)
    return traverse_util.unflatten_dict(out)


def _convert_one(rule: Rule, state: Mapping[str, np.ndarray], key: str,
                 shape: tuple[int, ...], where: str) -> np.ndarray:
    value = np.asarray(state[key])
    try:
        converted = rule.transform.to_ours(value, shape)
    except ValueError as err:
        raise CheckpointError(f"{where}: {key} has shape {value.shape}, which does not fit "
                              f"{'/'.join(rule.ours)} {shape} ({err})") from err
    return converted


def export_params(table: list[Rule], params: Any, *, num_layers: int,
                  dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (torch key, array) pairs one parameter at a time (so exports can stream)."""
    flat = traverse_util.flatten_dict(_unbox(params))
    for rule in table:
        value = np.asarray(jax.device_get(flat[rule.ours]))
        if dtype is not None:
            value = value.astype(dtype)
        if rule.stacked:
            for i in range(num_layers):
                yield rule.torch_key.format(i=i), rule.transform.to_torch(value[i])
        else:
            yield rule.torch_key, rule.transform.to_torch(value)
