"""Faults a long run meets: damaged checkpoints (bits flipped in each item, truncated and missing
files), a chosen restore step, SIGKILL during an asynchronous save, SIGTERM during evaluation,
a disk that fills during a save, a non-finite loss right after a resume, a checkpoint of
another model. (A user's mistakes at the command line: test_command_line_mistakes.py.)

The runs are test_train_run's shrunken tiny config (6 steps, checkpoints every 2, 2 kept);
every rerun ends with the parameters of an uninterrupted run, bit for bit.
"""

import errno
import inspect
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from etils import epath

from tokenpacker_jax import checkpoint, train
from tokenpacker_jax import checkpoint_integrity as integrity
from tokenpacker_jax.assembly import load_trained
from tokenpacker_jax.configs import tiny

import test_train_run
from test_train_run import PACKED, STEPS, _final_params, _sample_ids, small_config

ROOT = Path(__file__).resolve().parents[1]
# test_train_run's module fixtures, set up once for this module: the generated data and an
# uninterrupted run (workdir, data order, summary) to compare every rerun with.
data_dir = test_train_run.data_dir
uninterrupted = test_train_run.uninterrupted
uninterrupted_packed = test_train_run.uninterrupted_packed


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def step_dir(workdir: Path, step: int) -> Path:
    return Path(checkpoint.run_directory(workdir)) / str(step)


def largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip(path: Path, count: int = 4096) -> None:
    """Inverts ``count`` bytes from the middle of the file (all its bits)."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - count // 2)
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_same_params(reference_dir: Path, workdir: Path) -> None:
    jax.tree.map(np.testing.assert_array_equal, _final_params(reference_dir),
                 _final_params(workdir))


def warnings_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_flipped_bytes_in_the_newest_checkpoint_are_detected_and_the_run_resumes_before(
        uninterrupted, data_dir, tmp_path, caplog):
    """4 KiB flipped in the newest checkpoint's largest array file, then the same command
    again. The damage is found before anything is restored, named, moved aside, and the run
    resumes from step 4 and ends where an uninterrupted run does."""
    reference_dir, reference_order, _ = uninterrupted
    workdir = copy_run(reference_dir, tmp_path / "run")
    damaged = largest_file(step_dir(workdir, STEPS) / "state")
    flip(damaged)
    relative = damaged.relative_to(step_dir(workdir, STEPS))

    order = []
    with caplog.at_level(logging.WARNING):
        train.run(small_config(data_dir), str(workdir), on_step=_sample_ids(order))
    said = warnings_of(caplog)
    assert f"checkpoint step {STEPS} in" in said and str(relative) in said, said
    assert "params." in said or "opt_state." in said, said  # the arrays in that file
    assert "resuming from step 4, the newest checkpoint" in said, said
    aside = workdir / "checkpoints.set_aside" / f"{STEPS}.damaged"
    assert (aside / relative).read_bytes() != (step_dir(reference_dir, STEPS) / relative
                                               ).read_bytes()  # kept, as it was found
    assert order == reference_order[4:]
    assert_same_params(reference_dir, workdir)


def largest_params_file(step: Path) -> Path:
    """The largest of the step's files that hold parameters (what inference reads)."""
    arrays = json.loads((step / integrity.MANIFEST).read_text())["arrays"]
    files = [step / f for f, names in arrays.items() if any(n.startswith("params.")
                                                             for n in names)]
    return max(files, key=lambda p: p.stat().st_size)


def _damage(step: Path, item: str, how: str) -> str:
    """Damages one item of a step; returns the file's path relative to the step."""
    if item == "checksums":
        target = step / integrity.MANIFEST
    elif item == "state":
        target = largest_params_file(step)
    else:
        target = largest_file(step / item)
    if how == "flip":
        flip(target, 4096 if target.stat().st_size > 8192 else 1)
    elif how == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target.unlink()
    return str(target.relative_to(step))


@pytest.mark.parametrize("item,how,said", [
    ("state", "flip", "does not match its checksum"),
    ("state", "truncate", "were written"),
    ("state", "missing", "is missing"),
    ("data", "flip", "does not match its checksum"),
    ("data", "missing", "is missing"),
    ("config", "flip", "does not match its checksum"),
    ("checksums", "flip", "is unreadable"),
])
def test_damage_to_each_item_is_found_named_and_moved_aside(uninterrupted, tmp_path, caplog,
                                                            item, how, said):
    reference_dir, _, _ = uninterrupted
    workdir = tmp_path / "run"
    shutil.copytree(checkpoint.run_directory(reference_dir), checkpoint.run_directory(workdir))
    name = _damage(step_dir(workdir, STEPS), item, how)
    if item in ("state", "config"):
        # Inference (generate, evaluate, convert) refuses the step and names the file.
        with pytest.raises(integrity.DamagedCheckpoint, match=name):
            load_trained(str(workdir))

    manager = checkpoint.make_manager(checkpoint.run_directory(workdir))
    with caplog.at_level(logging.WARNING):
        assert checkpoint.choose_step(manager) == 4
    message = warnings_of(caplog)
    assert name in message and said in message, message
    if item == "state" and how == "flip":
        assert "array" in message, message
    assert manager.all_steps() == [4]
    assert (workdir / "checkpoints.set_aside" / f"{STEPS}.damaged").is_dir()


def test_a_checkpoint_saved_before_checksums_restores_with_a_warning(uninterrupted, tmp_path,
                                                                     caplog):
    reference_dir, _, _ = uninterrupted
    workdir = tmp_path / "run"
    shutil.copytree(checkpoint.run_directory(reference_dir), checkpoint.run_directory(workdir))
    (step_dir(workdir, STEPS) / integrity.MANIFEST).unlink()
    manager = checkpoint.make_manager(checkpoint.run_directory(workdir))
    with caplog.at_level(logging.WARNING):
        assert checkpoint.choose_step(manager) == STEPS
    assert "restored without verifying" in warnings_of(caplog)


def test_checksums_name_each_array_file(uninterrupted):
    """Every array of the state is in some file of the manifest (the map that names them)."""
    reference_dir, _, _ = uninterrupted
    step = step_dir(reference_dir, STEPS)
    manifest = json.loads((step / integrity.MANIFEST).read_text())
    named = {a for arrays in manifest["arrays"].values() for a in arrays}
    params = jax.tree_util.tree_flatten_with_path(_final_params(reference_dir))[0]
    assert {"params." + ".".join(k.key for k in path) for path, _ in params} <= named
    assert set(manifest["files"]) >= {"config/metadata", "data/process_0-of-1.json"}
    assert integrity.verify(epath.Path(step), checkpoint.ITEMS)


def test_restore_step_resumes_from_that_step_and_its_data_position(uninterrupted, data_dir,
                                                                   tmp_path, caplog):
    reference_dir, reference_order, _ = uninterrupted
    workdir = copy_run(reference_dir, tmp_path / "run")
    config = small_config(data_dir, **{"checkpoint.restore_step": 4})
    order = []
    with caplog.at_level(logging.WARNING):
        train.run(config, str(workdir), on_step=_sample_ids(order))
    assert order == reference_order[4:]  # the data position of step 4
    assert_same_params(reference_dir, workdir)
    assert (workdir / "checkpoints.set_aside" / f"{STEPS}.after_restore_4").is_dir()
    assert "the later step 6 was moved" in warnings_of(caplog)
    # Restarted with the same command (a preemption), the run goes on from its own newest
    # step instead of going back to step 4 again.
    again = []
    train.run(config, str(workdir), on_step=_sample_ids(again))
    assert again == []
    with pytest.raises(checkpoint.CheckpointNotFound, match="no step 5 in .*steps: \\[4, 6\\]"):
        train.run(small_config(data_dir, **{"checkpoint.restore_step": 5}), str(workdir))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_sigkill_during_an_asynchronous_save_then_rerun_equals_uninterrupted(
        packed, data_dir, tmp_path, request):
    """Killed inside step 4's asynchronous save, after every item is written and before the
    step is committed (the checksums are being recorded): the rerun ignores the unfinished
    step, resumes from step 2, sees the same data and ends with the same parameters. Packed
    rows too: the packer's state (its open rows rebuilt from the samples upstream) is saved
    with each checkpoint."""
    reference_dir, reference_order, _ = request.getfixturevalue(
        "uninterrupted_packed" if packed else "uninterrupted")
    overrides = {"checkpoint.asynchronous": True, **(PACKED if packed else {})}
    workdir = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import json, os, signal, sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
        import jax
        jax.config.update("jax_default_matmul_precision", "highest")
        from test_train_run import small_config
        from tokenpacker_jax import checkpoint_integrity, train
        write_manifest = checkpoint_integrity.write_manifest
        def killing(step_dir, items):
            if sys.argv[1] == "kill" and step_dir.name.startswith("4."):
                os.kill(os.getpid(), signal.SIGKILL)
            write_manifest(step_dir, items)
        checkpoint_integrity.write_manifest = killing
        def hook(step, batch):
            print("ids", step, json.dumps(batch["sample_id"].tolist()), flush=True)
        config = small_config({str(data_dir)!r}, **{overrides!r})
        train.run(config, {str(workdir)!r}, on_step=hook)
    """)
    first = subprocess.run([sys.executable, "-c", script, "kill"], capture_output=True,
                           text=True, cwd=ROOT, timeout=600)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    unfinished = [p.name for p in Path(checkpoint.run_directory(workdir)).iterdir()]
    assert "2" in unfinished and "4" not in unfinished, unfinished
    second = subprocess.run([sys.executable, "-c", script, "rerun"], capture_output=True,
                            text=True, cwd=ROOT, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]

    def ids(output):
        return {int(line.split()[1]): json.loads(line.split(" ", 2)[2])
                for line in output.splitlines() if line.startswith("ids ")}

    killed, resumed = ids(first.stdout), ids(second.stdout)
    assert sorted(resumed) == [3, 4, 5, 6] and {1, 2, 3, 4} <= set(killed)
    for step, seen in {**killed, **resumed}.items():
        assert seen == reference_order[step - 1], step
    assert sorted(os.listdir(checkpoint.run_directory(workdir))) == ["4", "6"]
    assert_same_params(reference_dir, workdir)


def test_sigterm_during_evaluation_finishes_it_then_saves_and_exits(data_dir, tmp_path,
                                                                    monkeypatch):
    """SIGTERM between the two batches of the evaluation at step 2 (a checkpoint step too):
    the evaluation finishes and is logged, step 2 is saved once, and the run exits.
    (test_sigkill_... shows that a rerun from a saved step ends as an uninterrupted run.)"""
    config = small_config(data_dir, **{"train.eval_every": 2, "train.eval_batches": 2})
    evaluate_loss = train.evaluate_loss
    evaluated = []  # batches per evaluation

    def batches_then_sigterm(batches):
        for batch in batches:
            if len(evaluated) == 1 and evaluated[0] == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            evaluated[-1] += 1
            yield batch

    def preempted_midway(*args, **kwargs):
        evaluated.append(0)
        call = inspect.signature(evaluate_loss).bind(*args, **kwargs)
        call.arguments["batches"] = batches_then_sigterm(call.arguments["batches"])
        return evaluate_loss(*call.args, **call.kwargs)

    monkeypatch.setattr(train, "evaluate_loss", preempted_midway)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        train.run(config, str(tmp_path))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert evaluated == [2]
    assert checkpoint.make_manager(checkpoint.run_directory(tmp_path)).all_steps() == [2]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 2 and np.isfinite(logged[-1]["eval/loss"])


def test_a_disk_that_fills_during_a_save(data_dir, tmp_path, monkeypatch):
    """The data item's write of step 6 fails half-way with ENOSPC: the run stops with an
    error naming the step, what is kept and where to resume; steps 2 and 4 still verify, and
    the next start removes the unfinished write and resumes from step 4."""
    grain_save = grain.checkpoint.CheckpointHandler.save

    def disk_full(self, directory, item=None, args=None):
        if f"{STEPS}.orbax-checkpoint-tmp" not in str(directory):
            return grain_save(self, directory, item=item, args=args)
        with open(os.path.join(directory, "process_0-of-1.json"), "w") as file:
            file.write('{"next_index": ')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

    monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", disk_full)
    with pytest.raises(checkpoint.CheckpointWriteError,
                       match=r"step 6 could not be written .* no space left on device\. The "
                             r"steps kept, \[2, 4\], are intact.*resume from step 4"):
        train.run(small_config(data_dir), str(tmp_path))
    monkeypatch.undo()
    root = Path(checkpoint.run_directory(tmp_path))
    assert f"{STEPS}.orbax-checkpoint-tmp" in os.listdir(root)
    for step in (2, 4):
        assert integrity.verify(epath.Path(root / str(step)), checkpoint.ITEMS)
    manager = checkpoint.make_manager(root)
    assert checkpoint.choose_step(manager) == 4
    assert sorted(os.listdir(root)) == ["2", "4"]


def test_non_finite_loss_keeps_the_last_good_checkpoint_and_after_a_resume_names_it(
        data_dir, tmp_path):
    # An absurd learning rate without clipping: step 1 is finite and blows the weights up,
    # so step 2's loss is not.
    config = small_config(data_dir, **{"optim.lr": 1e30, "optim.grad_clip": 0.0,
                                       "optim.warmup_ratio": 0.0})
    config.optim.schedule = "constant"
    config.checkpoint.every_steps = 1
    with pytest.raises(train.TrainingDiverged, match="at step 2; the last good checkpoint "
                                                     r"\(step 1\)"):
        train.run(config, str(tmp_path))
    manager = checkpoint.make_manager(checkpoint.run_directory(tmp_path))
    assert manager.all_steps() == [1]
    # The same command again resumes from step 1 and diverges at once: step 1 is suspect.
    with pytest.raises(train.TrainingDiverged,
                       match=r"at step 2, 1 step\(s\) after resuming from step 1: the "
                             r"checkpoint of step 1 .* is suspect .* no earlier checkpoint"):
        train.run(config, str(tmp_path))


def test_a_checkpoint_of_another_model_is_refused_naming_the_arrays(uninterrupted, data_dir,
                                                                  tmp_path):
    """The run's workdir with another config (configs/tiny.py unshrunk: 4 tower layers, 2
    decoder layers, stage 1); at the command line this is one line
    (test_command_line_mistakes.py)."""
    workdir = copy_run(uninterrupted[0], tmp_path / "run")
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"checkpoint step 6 in .* is not of this model .*: params\.\S+ "
                             r"has shape \(1, .*\) there, \(2, .*\) in the model"):
        train.run(tiny.get_config(f"stage=1,data={data_dir}"), str(workdir))


def test_divergence_message_says_which_checkpoint_to_resume_from():
    suspect = train.divergence_message(82, 80, 80, [40, 60, 80], "/run/checkpoints")
    assert "2 step(s) after resuming from step 80" in suspect and "suspect" in suspect
    assert "--config.checkpoint.restore_step=N (N one of [40, 60])" in suspect
    saved_since = train.divergence_message(82, 80, 81, [80, 81], "/run/checkpoints")
    assert "the last good checkpoint (step 81)" in saved_since
    long_after = train.divergence_message(200, 80, 80, [80], "/run/checkpoints")
    assert "the last good checkpoint (step 80)" in long_after
