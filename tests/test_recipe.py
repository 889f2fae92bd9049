"""The main job's recipe (``tokenpacker_jax.recipe``) end to end at toy sizes, and the
quickstart command's wiring to it."""

import os

import jax
import numpy as np
from absl import flags
from PIL import Image

from tokenpacker_jax import configuration, quickstart, recipe, tower_pretraining  # noqa: F401 (quickstart: flags)
from tokenpacker_jax.assembly import load_trained
from tokenpacker_jax.bench import training
from tokenpacker_jax.configs import tiny
from tokenpacker_jax.convert import hf
from tokenpacker_jax.data import synthetic
from tokenpacker_jax.evaluation import question_file

TOY = recipe.Recipe(num=8, num_eval=2, stage0_steps=2, stage0_images=8, stage1_steps=1,
                    stage2_steps=2, eval_batch=8)


def assert_same_params(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_run_trains_every_stage_answers_and_resumes(tmp_path):
    data, work = str(tmp_path / "data"), str(tmp_path / "work")
    lines = []
    result = recipe.run(data, work, recipe=TOY, seed=1, adjust=training.shrink,
                        log=lines.append)
    assert result.stages == [os.path.join(work, "stage1"), os.path.join(work, "stage2")]
    assert lines[0] == f"data: 8 training images in {data}"
    assert lines[1].startswith("stage 0: step 2, loss ")
    assert lines[2].startswith("stage 0: 2 steps, loss ")
    assert lines[3].startswith("stage 1: 1 steps, loss ")
    assert lines[4].startswith("stage 2: 2 steps, loss ")
    # Stage 0's tower is what stages 1 and 2 hold, stage 2 left it as it was (frozen).
    tower = os.path.join(work, "stage0")
    _, saved = hf.load_vision_tower(tower)
    for stage in result.stages:
        trained = load_trained(stage)
        assert trained.config.model.vision_checkpoint == tower
        assert_same_params(trained.params["vision_tower"], saved)
    # Stage 0 learnt from the training split's own images.
    pixels, _ = synthetic.labelled_scenes("train", 2, 1, 48, 0)
    for index in range(2):
        written = np.asarray(Image.open(os.path.join(data, f"images/train/{index:05d}.png")))
        np.testing.assert_array_equal(pixels[index], written)
    # Every held-out question answered and scored, per category and overall.
    held_out = question_file.read_questions(os.path.join(data, "test_questions.jsonl"))
    assert [r["question_id"] for r in result.records] == [q["question_id"] for q in held_out]
    assert set(result.scores) == {"all", *(q["category"] for q in held_out)}
    assert result.scores["all"]["n"] == len(held_out)
    image, about = recipe.about_one_image(result)
    assert image == held_out[0]["image"]
    assert len(about) == len(synthetic.CATEGORIES) and all(" -> " in line for line in about)
    printed = question_file.exact_match_lines(result.scores)
    assert printed[-1] == (f"held-out accuracy: {result.scores['all']['accuracy']:.3f} "
                           f"(n={len(held_out)})")
    assert len(printed) == len(result.scores)

    # A rerun finds both stages finished and trains nothing.
    again_lines = []
    again = recipe.run(data, work, recipe=TOY, seed=1, adjust=training.shrink,
                       log=again_lines.append)
    assert [line.split(", ")[-1] for line in again_lines[1:]] == [
        f"in {stage}" for stage in [tower, *result.stages]]
    assert [r["text"] for r in again.records] == [r["text"] for r in result.records]
    assert all("train/loss" not in summary for summary in again.summaries.values())


def test_a_stage_of_no_steps_is_left_out():
    assert recipe.Recipe(stage1_steps=0).steps == {2: 3000}
    assert recipe.Recipe().replace(num=5, jitter=None).num == 5
    assert [stage for stage, _ in recipe.stage_configs("/d", TOY, 0)] == [1, 2]


def test_quickstart_flags_default_to_the_recipe():
    main_job = recipe.Recipe()
    for name in ("num", "num_eval", "stage0_steps", "stage1_steps", "stage2_steps", "jitter"):
        assert flags.FLAGS[name].default == getattr(main_job, name), name


def test_tower_pretraining_learns_what_the_cells_hold():
    config = tiny.get_config("stage=1")
    training.shrink(config)
    pixels, labels = synthetic.labelled_scenes("train", 16, 0, 48, 0)
    assert labels.shape == (16, 3, 9)
    # Every image: 1-4 shapes with a colour each, and one digit in a cell of its own.
    shapes, colours, digits = labels[:, 0], labels[:, 1], labels[:, 2]
    assert np.array_equal(shapes > 0, colours > 0)
    assert ((shapes > 0).sum(1) >= 1).all() and ((shapes > 0).sum(1) <= 4).all()
    assert ((digits > 0).sum(1) == 1).all() and not ((digits > 0) & (shapes > 0)).any()
    _, _, losses = tower_pretraining.pretrain(
        configuration.vision_config(config), pixels, labels, steps=40, batch_size=16,
        lr=3e-3, log=lambda _: None)
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * losses[0], losses


def test_a_vision_checkpoint_freezes_the_tower():
    for stage in (1, 2):
        config = tiny.get_config(f"stage={stage},vision_checkpoint=/towers/t0")
        assert config.model.vision_checkpoint == "/towers/t0"
        assert not config.model.train_vision
        assert "vision_tower" not in config.train.trainable
    assert tiny.get_config("stage=2").train.trainable == (
        "vision_tower", "projector", "decoder")


def test_make_data_writes_again_what_an_older_version_lacks(tmp_path):
    """Data found complete is kept as it is; data lacking a file stage 2 trains on (written
    by an older version) is written again."""
    data = str(tmp_path / "data")
    recipe.make_data(data, TOY, seed=3, adjust=training.shrink)
    meta = os.path.join(data, "meta.json")
    written = os.stat(meta).st_mtime_ns
    recipe.make_data(data, TOY, seed=3, adjust=training.shrink)
    assert os.stat(meta).st_mtime_ns == written
    os.remove(os.path.join(data, "train_lookup.json"))
    recipe.make_data(data, TOY, seed=3, adjust=training.shrink)
    assert os.path.exists(os.path.join(data, "train_lookup.json"))
