"""Whole training runs on generated data: metrics, checkpoints, an HD run's global view on
resume, stage 2 from stage 1.

The faults (SIGKILL, SIGTERM, damaged checkpoints, NaN, a full disk) are in test_faults.py,
which reuses these fixtures, as test_command_line_mistakes.py does for a run to point the
commands at.
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath

from tokenpacker_jax import checkpoint, train
from tokenpacker_jax import checkpoint_integrity as integrity
from tokenpacker_jax.assembly import load_trained
from tokenpacker_jax.configs import tiny
from tokenpacker_jax.configuration import ConfigError
from tokenpacker_jax.data import synthetic

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(str(out), 48, seed=0, num_eval=16, size=48, tokenizer_vocab=400)
    return out


def small_config(data_dir, stage=2, variant="", **overrides):
    """configs/tiny.py (``variant``: more of its variant string), made smaller still so that
    several runs fit in the test budget. ``overrides``: {"section.field": value}."""
    config = tiny.get_config(f"stage={stage},data={data_dir}" + (f",{variant}" * bool(variant)))
    config.model.vision.num_layers = 2
    config.model.features.multi_layers = (1, 2, 1, 2)
    config.model.decoder.num_layers = 1
    config.data.update(dict(batch_size=8, max_length=160))
    config.train.update(dict(num_steps=STEPS, log_every=1))
    config.checkpoint.update(dict(every_steps=2, asynchronous=False))
    config.update_from_flattened_dict(overrides)
    return config


# Packed rows for the small config: rows of 320 positions hold 2-4 samples, 5 images at most
# (a stage-2 sample with its caption takes up to ~130 positions).
PACKED = {"data.packing": "first_fit", "data.max_length": 320, "data.max_images_per_row": 5}


def _sample_ids(log):
    """Records each step's sample ids (packed rows: a list per row)."""
    return lambda step, batch: log.append(batch["sample_id"].tolist())


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    order = []
    summary = train.run(small_config(data_dir), str(workdir), on_step=_sample_ids(order))
    return workdir, order, summary


@pytest.fixture(scope="module")
def uninterrupted_packed(data_dir, tmp_path_factory):
    """The same run on packed rows."""
    workdir = tmp_path_factory.mktemp("uninterrupted_packed")
    order = []
    summary = train.run(small_config(data_dir, **PACKED), str(workdir),
                        on_step=_sample_ids(order))
    return workdir, order, summary


def _final_params(workdir):
    return jax.tree.map(np.asarray, load_trained(str(workdir)).params)


def test_run_trains_and_writes_metrics(uninterrupted):
    workdir, order, summary = uninterrupted
    assert len(order) == STEPS and all(len(ids) == 8 for ids in order)
    assert np.isfinite(summary["train/loss"])
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS and "train/tokens_per_s" in json.loads(lines[-1])
    assert checkpoint.make_manager(checkpoint.run_directory(workdir)).all_steps() == [4, 6]


def test_hd_run_resumes_only_with_its_global_view(uninterrupted, data_dir, tmp_path):
    """Checkpoints learnt from one HD global view: resuming with the other is refused."""
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], workdir)
    saved_file = workdir / "checkpoints" / "6" / "config" / "metadata"
    saved = json.loads(saved_file.read_text())
    saved["data"]["image"]["aspect_mode"] = "slice"
    saved["data"]["hd"]["global_view"] = "fit_image"
    saved_file.write_text(json.dumps(saved))
    integrity.write_manifest(epath.Path(saved_file.parents[1]), checkpoint.ITEMS)  # as saved
    config = small_config(data_dir)
    config.data.image.aspect_mode = "slice"
    assert config.data.hd.global_view == "reference_canvas"
    with pytest.raises(ConfigError, match="trained with 'fit_image', the config says "
                                          "'reference_canvas'"):
        train.run(config, str(workdir))


def test_stage2_starts_from_stage1(data_dir, tmp_path):
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


def test_packed_run_trains_on_several_samples_a_row(uninterrupted_packed):
    workdir, order, summary = uninterrupted_packed
    per_row = [sum(i >= 0 for i in row) for step in order for row in step]
    assert len(order) == STEPS and min(per_row) >= 1 and sum(per_row) > 2 * len(per_row)
    assert np.isfinite(summary["train/loss"])
    last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train/data_truncated", "train/data_deferred_by_tiles"} <= set(last)
