"""The main job's recipe (``tokenpacker_jax.recipe``) end to end at toy sizes, and the
quickstart command's wiring to it."""

import os

from absl import flags

from tokenpacker_jax import quickstart, recipe  # noqa: F401 (quickstart: its flags)
from tokenpacker_jax.bench import training
from tokenpacker_jax.data import synthetic
from tokenpacker_jax.evaluation import question_file

TOY = recipe.Recipe(num=8, num_eval=2, stage1_steps=1, stage2_steps=2, eval_batch=8)


def test_run_trains_both_stages_answers_and_resumes(tmp_path):
    data, work = str(tmp_path / "data"), str(tmp_path / "work")
    lines = []
    result = recipe.run(data, work, recipe=TOY, seed=1, adjust=training.shrink,
                        log=lines.append)
    assert result.stages == [os.path.join(work, "stage1"), os.path.join(work, "stage2")]
    assert lines[0] == f"data: 8 training images in {data}"
    assert lines[1].startswith("stage 1: 1 steps, loss ")
    assert lines[2].startswith("stage 2: 2 steps, loss ")
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
        f"in {stage}" for stage in result.stages]
    assert [r["text"] for r in again.records] == [r["text"] for r in result.records]
    assert all("train/loss" not in summary for summary in again.summaries.values())


def test_a_stage_of_no_steps_is_left_out():
    assert recipe.Recipe(stage1_steps=0).steps == {2: 3000}
    assert recipe.Recipe().replace(num=5, jitter=None).num == 5
    assert [stage for stage, _ in recipe.stage_configs("/d", TOY, 0)] == [1, 2]


def test_quickstart_flags_default_to_the_recipe():
    main_job = recipe.Recipe()
    for name in ("num", "num_eval", "stage1_steps", "stage2_steps", "jitter"):
        assert flags.FLAGS[name].default == getattr(main_job, name), name
