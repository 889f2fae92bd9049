"""The training state, built from shapes: nothing is allocated twice, nothing on one host.

``jax.eval_shape(init)`` gives the parameters' shapes and logical names -> shardings from the
rules -> pretrained towers / LLMs are read straight into their shards -> ``jax.jit(init,
out_shardings=...)`` creates only the groups no checkpoint provided -> the optimizer state
is created sharded like the parameters it tracks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import Mesh

from tokenpacker_jax import sharding
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.models import lora, mllm
from tokenpacker_jax.optim import split_trainable


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict  # {"vision_tower", "projector", "decoder"}: all of them, frozen ones too
    opt_state: Any  # over the trainable groups only


def param_shardings(model: mllm.MultimodalLM, mesh: Mesh, rules: Any,
                    tiles: int = 1) -> tuple[Any, Any]:
    """(abstract params, their NamedShardings) of the model, without allocating."""
    inputs = batch_lib.example_inputs(batch_lib.Dims.of_model(model.config, 8, tiles))
    # Made before the mesh is current: an eager op under a mesh of compile-only devices (a
    # TPU slice described on another machine, see aot.py) would try to run there.
    key = jax.random.key(0)
    with sharding.use_mesh(mesh, rules):
        boxed = jax.eval_shape(model.init, key, **inputs)["params"]
        shardings = sharding.logical_shardings(boxed, mesh, rules)
    return nn.meta.unbox(boxed), shardings


def scale_leaves(params: Any, factor: float, name: str = "kernel") -> Any:
    """``params`` with every leaf called ``name`` (default: the dense kernels) multiplied by
    ``factor``. Raises ValueError when no leaf has that name."""
    found = []

    def scale(path, leaf):
        if getattr(path[-1], "key", None) != name:
            return leaf
        found.append(path)
        return leaf * jnp.asarray(factor, leaf.dtype)

    scaled = jax.tree_util.tree_map_with_path(scale, params)
    if not found:
        raise ValueError(f"no parameter called {name!r} to scale")
    return scaled


def init_params(model: mllm.MultimodalLM, mesh: Mesh, rules: Any, key: jax.Array,
                loaded: dict[str, Any], shardings: Any, tiles: int = 1,
                kernel_scale: Mapping[str, float] | None = None) -> dict:
    """All parameter groups: ``loaded`` ones as given, the others freshly initialised
    straight into their shards (XLA drops the init of what is not returned).

    A loaded group of a part with LoRA adapters comes in the plain layout (float kernels,
    no adapters: a pretrained LLM, an earlier stage): its adapted kernels are quantised if
    the config says so (``lora.adapt``) and its adapters initialised.

    ``kernel_scale`` (``config.model.init_kernel_scale``) multiplies parameters of freshly
    initialised groups; loaded groups are never rescaled. A key ``group`` scales the
    group's dense kernels, ``group/name`` its leaves called ``name`` (e.g.
    ``vision_tower/position_embedding``).
    """
    inputs = batch_lib.example_inputs(batch_lib.Dims.of_model(model.config, 8, tiles))
    kernel_scale = dict(kernel_scale or {})
    loras = mllm.lora_configs(model.config)
    with sharding.use_mesh(mesh, rules):
        boxed = jax.eval_shape(model.init, key, **inputs)["params"]
    abstract = nn.meta.unbox(boxed)
    provided = {group: tree if loras[group] is None else
                lora.adapt(tree, abstract[group], loras[group], shardings[group])
                for group, tree in loaded.items()}
    flat_provided = traverse_util.flatten_dict(provided)
    missing = [path for path in traverse_util.flatten_dict(abstract)
               if path not in flat_provided]
    whole = [group for group in mllm.PARAM_GROUPS if group not in loaded]

    def init_missing(key):
        params = nn.meta.unbox(model.init(key, **inputs)["params"])
        params = {group: params[group] for group in mllm.PARAM_GROUPS}
        for target, factor in kernel_scale.items():
            group, _, name = target.partition("/")
            if group in whole and factor != 1.0:
                try:
                    params[group] = scale_leaves(params[group], factor, name or "kernel")
                except ValueError as error:
                    raise ValueError(f"model.init_kernel_scale[{target!r}]: {error} in "
                                     f"{group}") from error
        flat = traverse_util.flatten_dict(params)
        return {"/".join(path): flat[path] for path in missing}

    fresh = {}
    if missing:
        flat_shardings = traverse_util.flatten_dict(shardings)
        with sharding.use_mesh(mesh, rules):
            fresh = jax.jit(init_missing, out_shardings={
                "/".join(path): flat_shardings[path] for path in missing})(key)
    params = traverse_util.unflatten_dict(
        {**flat_provided, **{path: fresh["/".join(path)] for path in missing}})
    return {group: params[group] for group in mllm.PARAM_GROUPS}


def create_state(params: dict, tx: optax.GradientTransformation,
                 trainable: Sequence[str], shardings: Any, mesh: Mesh,
                 memory_kind: str | None = None) -> TrainState:
    """A step-0 TrainState whose optimizer state is sharded like its parameters (in
    ``memory_kind``, e.g. "pinned_host", if given)."""
    trainable_params, _ = split_trainable(params, trainable)
    opt_shardings = optimizer_shardings(tx, trainable_params, shardings, mesh, memory_kind)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable_params)
    step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
    return TrainState(step=step, params=params, opt_state=opt_state)


def optimizer_shardings(tx: optax.GradientTransformation, trainable_params: Any,
                        shardings: Any, mesh: Mesh, memory_kind: str | None = None) -> Any:
    """Moments and other per-parameter optimizer leaves take their parameter's sharding
    (in ``memory_kind``: "pinned_host" keeps them in the host's memory, ``optim.offload``);
    counters and the like are replicated on the devices.

    Optimizer states hold copies of the parameter tree (Adam's mu and nu), so a state leaf
    belongs to the parameter whose path its own dict-key path ends with (same shape).
    """
    abstract_state = jax.eval_shape(tx.init, trainable_params)
    by_path = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(trainable_params):
        keys = tuple(str(k.key) for k in path)
        by_path[keys] = (tuple(leaf.shape), _lookup(shardings, keys))
    replicated = sharding.replicated(mesh)

    def leaf_sharding(path, leaf):
        keys = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        for start in range(len(keys)):
            match = by_path.get(keys[start:])
            if match is not None and match[0] == tuple(leaf.shape):
                return match[1].with_memory_kind(memory_kind) if memory_kind else match[1]
        return replicated

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


def _lookup(tree: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        tree = tree[key]
    return tree


def state_shardings(state_like: TrainState, shardings: Any, tx: optax.GradientTransformation,
                    trainable: Sequence[str], mesh: Mesh,
                    memory_kind: str | None = None) -> TrainState:
    """Shardings of a TrainState (a concrete or abstract one), for jit and for restoring;
    ``memory_kind`` as ``optimizer_shardings``."""
    trainable_params, _ = split_trainable(state_like.params, trainable)
    return TrainState(step=sharding.replicated(mesh), params=shardings,
                      opt_state=optimizer_shardings(tx, trainable_params, shardings, mesh,
                                                    memory_kind))
