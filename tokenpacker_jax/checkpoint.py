"""Orbax checkpoints of a training run: one ``Manager`` per workdir.

Each step directory holds three items:

- ``state``: the TrainState (step, params, optimizer state), restored onto whatever mesh
  the abstract target's shardings describe (so 8-device checkpoints load on 1 device);
- ``data``: the data iterator's state (grain), so a resumed run sees exactly the samples an
  uninterrupted one would (absent from checkpoints imported from PyTorch, see
  ``tokenpacker_jax.convert``);
- ``config``: the run's config as JSON, for tools that start from a checkpoint;

and ``checksums.json``, written before the step is committed, against which every file of
the items is verified before it is restored (``checkpoint_integrity``). A run resumes from
the newest step that verifies (``choose_step``): damaged steps are moved aside, never
deleted, with a warning naming the file and the arrays in it.

Saves are asynchronous unless asked otherwise; ``wait_until_finished`` blocks until the last
one is durable. A save that fails for lack of disk space raises ``CheckpointWriteError``
naming the step, the steps kept and the step a rerun resumes from.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from tokenpacker_jax import checkpoint_integrity as integrity
from tokenpacker_jax import train_state as state_lib
from tokenpacker_jax.user_error import CheckpointError, CheckpointNotFound, UserError

ITEMS = ("state", "data", "config")


class CheckpointWriteError(UserError):
    """A save that could not be written (the disk is full); the message says what is kept."""


def _disk_full(err: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain: an OSError, or TensorStore's error text."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


class Manager(ocp.CheckpointManager):
    """Orbax's CheckpointManager for one run, which also

    - writes ``checksums.json`` into each step after its items are finalized and before it is
      committed (Orbax's ``post_finalization_callback``; the primary process, once every
      process has written its files);
    - waits for each save to be durable when not ``asynchronous`` (every save takes Orbax's
      asynchronous path, where that callback runs);
    - turns a save that failed for lack of space into ``CheckpointWriteError``.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3,
                 asynchronous: bool = True, read_only: bool = False):
        self._asynchronous = asynchronous
        self._writing: int | None = None  # the step whose save is in flight
        # (Not Orbax's read_only, which warns on every use: readers only restore.)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, enable_async_checkpointing=True,
            # Unfinished writes of an earlier process (killed, or out of space) go at start;
            # never by a reader, which may run beside a training run that is saving.
            cleanup_tmp_directories=not read_only,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums))
        super().__init__(os.path.abspath(directory) if "://" not in str(directory)
                         else directory, options=options, item_names=ITEMS)
        # Orbax removes them in a thread of its own; a run that stops at once (a mistake)
        # would leave that thread to fail at interpreter exit, and a resume decides which
        # steps there are: wait for it.
        self._maybe_await_cleanup_tmp_directory()

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _write_checksums(self) -> None:
        # Runs before the commit: the step is still in Orbax's temporary directory (on
        # object stores, which commit by writing a marker file, in its final one).
        final = self.step_dir(self._writing)
        tmp = final.parent / (final.name + ocp.path.atomicity.TMP_DIR_SUFFIX)
        integrity.write_manifest(tmp if tmp.exists() else final, ITEMS)

    def save(self, step: int, *args: Any, force: bool = False, **kwargs: Any) -> bool:
        if not force and not self.should_save(step):
            return False
        self.wait_until_finished()  # the save in flight gets its checksums under its step
        self._writing = step
        try:
            started = super().save(step, *args, force=force, **kwargs)
            if started and not self._asynchronous:
                super().wait_until_finished()
        except Exception as err:
            if _disk_full(err):
                raise self._no_space() from err
            raise
        return started

    def wait_until_finished(self) -> None:
        try:
            super().wait_until_finished()
        except Exception as err:
            if _disk_full(err):
                raise self._no_space() from err
            raise

    def _no_space(self) -> CheckpointWriteError:
        kept = self.all_steps()
        resume = (f"rerun the same command to resume from step {max(kept)}" if kept else
                  "rerun the same command to start again")
        return CheckpointWriteError(
            f"checkpoint step {self._writing} could not be written to {self.directory}: no "
            f"space left on device. The steps kept, {kept}, are intact, and the unfinished "
            f"write is removed when the run starts again; the training after step "
            f"{max(kept) if kept else 0} is lost with this process: free space, then {resume}")


def make_manager(directory: str | os.PathLike, *, keep: int = 3, asynchronous: bool = True,
                 read_only: bool = False) -> Manager:
    return Manager(directory, keep=keep, asynchronous=asynchronous, read_only=read_only)


def save(manager: Manager, step: int, state: Any, data_iterator: Any | None,
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


def _verify_or_warn(step_dir: epath.Path, items=ITEMS, **kwargs: Any) -> None:
    """integrity.verify; a step without checksums is used with a warning."""
    if not integrity.verify(step_dir, items, **kwargs):
        logging.warning("checkpoint step %s in %s has no %s (saved before checksums were "
                        "recorded): restored without verifying its files", step_dir.name,
                        step_dir.parent, integrity.MANIFEST)


def _saved_restore_step(manager: Manager, step: int) -> int | None:
    """``checkpoint.restore_step`` of the run that saved ``step`` (None: unreadable)."""
    try:
        _verify_or_warn(manager.step_dir(step), ("config",))
    except integrity.DamagedCheckpoint:
        return None
    config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return config["config"].get("checkpoint", {}).get("restore_step")


def _choose_here(manager: Manager, requested: int) -> int | None:
    steps = sorted(manager.all_steps(), reverse=True)
    where = manager.directory
    if requested >= 0 and steps and steps[0] > requested and (
            _saved_restore_step(manager, steps[0]) == requested):
        # The run started with this restore_step saved since (and was restarted with the
        # same command, e.g. after a preemption): it goes on from its own newest step.
        requested = -1
    if requested >= 0:
        if requested not in steps:
            raise CheckpointNotFound(f"checkpoint.restore_step: no step {requested} in {where} "
                                     f"(its steps: {sorted(steps)})")
        step_dir = manager.step_dir(requested)
        try:
            _verify_or_warn(step_dir)
        except integrity.DamagedCheckpoint as err:
            moved = integrity.set_aside(step_dir, "damaged")
            raise CheckpointError(f"{err}; it was moved to {moved}: choose another step "
                                  f"(kept: {sorted(s for s in steps if s != requested)})"
                                  ) from err
        for newer in (s for s in steps if s > requested):
            moved = integrity.set_aside(manager.step_dir(newer), f"after_restore_{requested}")
            logging.warning("checkpoint.restore_step=%d: the later step %d was moved to %s",
                            requested, newer, moved)
        return requested
    damaged = []
    for step in steps:
        try:
            _verify_or_warn(manager.step_dir(step))
        except integrity.DamagedCheckpoint as err:
            moved = integrity.set_aside(err.step_dir, "damaged")
            damaged.append(moved)
            logging.warning("%s; it was moved to %s", err, moved)
            continue
        if damaged:
            logging.warning("resuming from step %d, the newest checkpoint in %s that verifies",
                            step, where)
        return step
    if damaged:
        raise CheckpointError(f"no checkpoint in {where} verifies; the damaged ones were moved "
                              f"to {damaged[0].parent}. Rerun to start from scratch, or copy a "
                              f"sound checkpoint into {where}")
    return None


def choose_step(manager: Manager, requested: int = -1) -> int | None:
    """The step a run resumes from: ``requested`` (-1: the newest whose files verify), or
    None when the directory has no checkpoint.

    Steps that fail verification, and with ``requested`` the steps after it (which the run
    will write again), are moved to ``DIR.set_aside/`` with a warning. A run restarted with
    the same ``requested`` after it has saved a later step goes on from its newest step (the
    step's config records the restore_step it was started with). The primary process checks
    and moves; the others follow its choice.
    """
    if jax.process_count() == 1:
        step = _choose_here(manager, requested)
    else:
        failed = -2
        try:
            step = _choose_here(manager, requested) if jax.process_index() == 0 else None
        except Exception:
            multihost_utils.broadcast_one_to_all(np.int32(failed))
            raise
        agreed = int(multihost_utils.broadcast_one_to_all(
            np.int32(-1 if step is None else step)))
        if agreed == failed:
            raise CheckpointError(f"process 0 found no checkpoint to resume from in "
                                  f"{manager.directory}: see its log")
        step = None if agreed < 0 else agreed
    manager.reload()
    return step


def restore(manager: Manager, step: int, abstract_state: Any,
            data_iterator: Any | None = None) -> Any:
    """Restores ``state`` (onto the shardings in ``abstract_state``) and, if given, the data
    iterator's position in place. Returns the state. ``choose_step`` verifies first."""
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except ValueError as err:
        raise _other_model(manager.step_dir(step), abstract_state, err) from err
    return restored["state"]


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Dotted leaf name (dict keys, attribute names, indices) -> shape."""
    def name(path) -> str:
        return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                        for k in path)

    return {name(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _other_model(step_dir: epath.Path, abstract: Any, err: ValueError, *,
                 partial: bool = False) -> Exception:
    """A restore that failed because the checkpoint's arrays are not the model's, as a
    CheckpointError naming the arrays; ``err`` itself when they match (another cause)."""
    metadata = ocp.StandardCheckpointHandler().metadata(step_dir / "state")
    saved, wanted = _shapes(getattr(metadata, "tree", metadata)), _shapes(abstract)
    problems = [f"{name} is not in the checkpoint" for name in wanted if name not in saved]
    problems += [f"{name} has shape {saved[name]} there, {shape} in the model"
                 for name, shape in wanted.items() if name in saved and saved[name] != shape]
    if not partial:
        problems += [f"{name} is in the checkpoint, not in the model"
                     for name in saved if name not in wanted]
    if not problems:
        return err
    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    return CheckpointError(f"checkpoint step {step_dir.name} in {step_dir.parent} is not of this "
                           f"model (another model's or another config's?): "
                           f"{'; '.join(problems[:3])}{more}")


def _newest_or(manager: Manager, step: int | None) -> int:
    steps = manager.all_steps()
    if step is None:
        if not steps:
            raise CheckpointNotFound(f"no checkpoint in {manager.directory}")
        return max(steps)
    if step not in steps:
        raise CheckpointNotFound(f"no checkpoint step {step} in {manager.directory} (its "
                                 f"steps: {sorted(steps)})")
    return step


def restore_config(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The config saved with a checkpoint (the latest step by default); ``directory`` is
    the checkpoint directory itself (``run_directory(workdir)``)."""
    manager = make_manager(directory, read_only=True)
    step = _newest_or(manager, step)
    _verify_or_warn(manager.step_dir(step), ("config",))
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
        "config"]


def run_directory(workdir: str | os.PathLike) -> str:
    """Where a training run keeps its checkpoints."""
    return os.path.join(workdir, "checkpoints")


def latest_step(workdir: str | os.PathLike) -> int:
    """The newest checkpoint step of a run; FileNotFoundError when it has none."""
    step = make_manager(run_directory(workdir), asynchronous=False).latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir}: no checkpoint in {run_directory(workdir)}")
    return step


def restore_params(workdir: str | os.PathLike, abstract_params: Any, shardings: Any,
                   step: int | None = None) -> dict:
    """The parameters alone from a run's checkpoint (default: its newest), onto
    ``shardings``: how stage 2 starts from stage 1 and how inference loads a model. The
    files holding them are verified first."""
    manager = make_manager(run_directory(workdir), read_only=True)
    step = _newest_or(manager, step)
    _verify_or_warn(manager.step_dir(step), ("state",), array_prefix="params.")
    target = {"params": abstract_like(abstract_params, shardings)}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True)))
    except ValueError as err:
        raise _other_model(manager.step_dir(step), target, err, partial=True) from err
    return restored["state"]["params"]


def save_params(workdir: str | os.PathLike, params: Any, config_json: str) -> str:
    """Writes ``params`` with the run config as a step-0 checkpoint without optimizer
    state, a run ``assembly.load_trained`` reads (``workdir`` must hold no checkpoint)."""
    state = state_lib.TrainState(step=np.zeros((), np.int32), params=params, opt_state={})
    manager = make_manager(run_directory(workdir), keep=1, asynchronous=False)
    save(manager, 0, state, None, config_json, force=True)
    manager.wait_until_finished()
    manager.close()
    return str(workdir)
