"""Orbax checkpoints of a training run: one CheckpointManager per workdir.

Each step directory holds three items:

- ``state``: the TrainState (step, params, optimizer state), restored onto whatever mesh
  the abstract target's shardings describe (so 8-device checkpoints load on 1 device);
- ``data``: the data iterator's state (grain), so a resumed run sees exactly the samples an
  uninterrupted one would (absent from checkpoints imported from PyTorch, see
  ``tokenpacker_jax.convert``);
- ``config``: the run's config as JSON, for tools that start from a checkpoint.

Saves are asynchronous; the manager's ``wait_until_finished()`` blocks until the last one is
durable.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "config")


def make_manager(directory: str | os.PathLike, *, keep: int = 3,
                 asynchronous: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any | None,
         config_json: str, *, force: bool = False) -> bool:
    """Starts an (async) save of ``state`` at ``step``; True when a save was started.

    ``data_iterator`` None (a checkpoint imported from PyTorch has no data position) saves
    no ``data`` item."""
    items = dict(state=ocp.args.StandardSave(state),
                 config=ocp.args.JsonSave(json.loads(config_json)))
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return manager.save(step, force=force, args=ocp.args.Composite(**items))


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings: what to restore onto."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator: Any | None = None) -> Any:
    """Restores ``state`` (onto the shardings in ``abstract_state``) and, if given, the data
    iterator's position in place. Returns the state."""
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]


def restore_config(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The config saved with a checkpoint (the latest step by default); ``directory`` is
    the checkpoint directory itself (``run_directory(workdir)``)."""
    manager = make_manager(directory, asynchronous=False)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory}: no checkpoint found")
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
        "config"]


def run_directory(workdir: str | os.PathLike) -> str:
    """Where a training run keeps its checkpoints."""
    return os.path.join(workdir, "checkpoints")


def restore_params(workdir: str | os.PathLike, abstract_params: Any, shardings: Any,
                   step: int | None = None) -> dict:
    """The parameters alone from a run's checkpoint (default: its newest), onto
    ``shardings``: how stage 2 starts from stage 1 and how inference loads a model."""
    manager = make_manager(run_directory(workdir), asynchronous=False)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir}: no checkpoint in {run_directory(workdir)}")
    target = {"params": abstract_like(abstract_params, shardings)}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True)))
    return restored["state"]["params"]
