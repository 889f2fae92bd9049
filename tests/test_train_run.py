"""Whole training runs on generated data: resume after SIGKILL, SIGTERM, NaN, stages."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import jax

from tokenpacker_jax.configs import tiny
from tokenpacker_jax import checkpoint, train
from tokenpacker_jax.configuration import ConfigError
from tokenpacker_jax.data import synthetic

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(str(out), 48, seed=0, num_eval=16, size=48, tokenizer_vocab=400)
    return out


def small_config(data_dir, stage=2, **overrides):
    """configs/tiny.py, made smaller still so that several runs fit in the test budget."""
    config = tiny.get_config(f"stage={stage},data={data_dir}")
    config.model.vision.num_layers = 2
    config.model.features.multi_layers = (1, 2, 1, 2)
    config.model.decoder.num_layers = 1
    config.data.update(dict(batch_size=8, max_length=160))
    config.train.update(dict(num_steps=STEPS, log_every=1))
    config.checkpoint.update(dict(every_steps=2, asynchronous=False))
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def _sample_ids(log):
    return lambda step, batch: log.append([int(i) for i in batch["sample_id"]])


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    order = []
    summary = train.run(small_config(data_dir), str(workdir), on_step=_sample_ids(order))
    return workdir, order, summary


def _final_params(workdir):
    from tokenpacker_jax.assembly import load_trained

    return jax.tree.map(np.asarray, load_trained(str(workdir)).params)


def test_run_trains_and_writes_metrics(uninterrupted):
    workdir, order, summary = uninterrupted
    assert len(order) == STEPS and all(len(ids) == 8 for ids in order)
    assert np.isfinite(summary["train/loss"])
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS and "train/tokens_per_s" in json.loads(lines[-1])
    assert checkpoint.make_manager(checkpoint.run_directory(workdir)).all_steps() == [4, 6]


def test_sigkill_then_rerun_equals_uninterrupted(uninterrupted, data_dir, tmp_path):
    """A run killed (SIGKILL) after its step-4 checkpoint, then rerun with the same
    command, sees the same data and ends with the same parameters, bit for bit."""
    reference_dir, reference_order, _ = uninterrupted
    workdir = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
        import jax
        jax.config.update("jax_default_matmul_precision", "highest")
        from test_train_run import small_config
        from tokenpacker_jax import train
        def hook(step, batch):
            print("ids", step, [int(i) for i in batch["sample_id"]], flush=True)
            if step == int(sys.argv[1]):
                os.kill(os.getpid(), signal.SIGKILL)
        train.run(small_config({str(data_dir)!r}), {str(workdir)!r}, on_step=hook)
    """)
    env = dict(os.environ)
    first = subprocess.run([sys.executable, "-c", script, "5"], capture_output=True,
                           text=True, env=env, cwd=ROOT, timeout=600)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    second = subprocess.run([sys.executable, "-c", script, "0"], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]

    def ids(output):
        return {int(line.split()[1]): json.loads(line.split(" ", 2)[2])
                for line in output.splitlines() if line.startswith("ids ")}

    killed, resumed = ids(first.stdout), ids(second.stdout)
    assert sorted(killed) == [1, 2, 3, 4, 5] and sorted(resumed) == [5, 6]
    seen = {**killed, **resumed}
    assert [seen[step] for step in range(1, STEPS + 1)] == reference_order
    expected = _final_params(reference_dir)
    got = _final_params(workdir)
    jax.tree.map(np.testing.assert_array_equal, expected, got)


def test_sigterm_saves_and_exits(data_dir, tmp_path):
    def hook(step, batch):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    try:
        train.run(small_config(data_dir), str(tmp_path), on_step=hook)
    finally:
        signal.signal(signal.SIGTERM, previous)
    manager = checkpoint.make_manager(checkpoint.run_directory(tmp_path))
    assert manager.latest_step() == 3


def test_hd_run_resumes_only_with_its_global_view(uninterrupted, data_dir, tmp_path):
    """Checkpoints learnt from one HD global view: resuming with the other is refused."""
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], workdir)
    saved_file = workdir / "checkpoints" / "6" / "config" / "metadata"
    saved = json.loads(saved_file.read_text())
    saved["data"]["image"]["aspect_mode"] = "slice"
    saved["data"]["hd"]["global_view"] = "fit_image"
    saved_file.write_text(json.dumps(saved))
    config = small_config(data_dir)
    config.data.image.aspect_mode = "slice"
    assert config.data.hd.global_view == "reference_canvas"
    with pytest.raises(ConfigError, match="trained with 'fit_image', the config says "
                                          "'reference_canvas'"):
        train.run(config, str(workdir))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    # An absurd learning rate without clipping: step 1 is finite and blows the weights up,
    # so step 2's loss is not.
    config = small_config(data_dir, **{"optim.lr": 1e30, "optim.grad_clip": 0.0,
                                       "optim.warmup_ratio": 0.0})
    config.optim.schedule = "constant"
    config.checkpoint.every_steps = 1
    with pytest.raises(train.TrainingDiverged, match="at step 2.*step 1"):
        train.run(config, str(tmp_path))
    manager = checkpoint.make_manager(checkpoint.run_directory(tmp_path))
    assert manager.all_steps() == [1]


def test_stage2_starts_from_stage1(data_dir, tmp_path):
    from tokenpacker_jax.assembly import load_trained

    stage1 = tmp_path / "stage1"
    train.run(small_config(data_dir, stage=1, **{"train.num_steps": 2}), str(stage1))
    # With a zero learning rate, stage 2's parameters stay what it started from.
    stage2 = small_config(data_dir, stage=2, **{"train.num_steps": 1,
                                               "train.init_from": str(stage1),
                                               "optim.lr": 0.0})
    train.run(stage2, str(tmp_path / "stage2"))
    before = jax.tree.map(np.asarray, load_trained(str(stage1)).params)
    after = jax.tree.map(np.asarray, load_trained(str(tmp_path / "stage2")).params)
    jax.tree.map(np.testing.assert_array_equal, before, after)
    summary = json.loads((tmp_path / "stage2" / "summary.json").read_text())
    assert summary["step"] == 1
