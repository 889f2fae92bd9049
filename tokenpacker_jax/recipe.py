"""The main job at toy scale, in one place: synthetic data -> stage 0 (the tower) -> stage 1
-> stage 2 -> greedy answers to the held-out questions -> exact-match scores.

``quickstart`` (the README's first command), ``notebooks/quickstart.ipynb`` and the paper
table (``bench/paper_table.py``, which swaps the projector through ``adjust``) all call
``run``, so a change of recipe (data, stages, schedule) is made here once:

    result = recipe.run(data_dir, workdir, seed=0)   # Recipe(): the main job's sizes
    result.scores["all"]["accuracy"]                 # and per category; result.records

Stage 0 (``tower_pretraining``) pretrains the tiny vision tower to read what each cell of the
training images holds and saves it to ``workdir/stage0``; stages 1 and 2 train
``configs/tiny.py`` (``vision_checkpoint=workdir/stage0``: the tower loaded and frozen) into
``workdir/stage1`` and ``workdir/stage2`` (stage 2 starts from stage 1). With no stage 0
(``stage0_steps=0``) the tower starts random and stage 2 trains it. Every stage resumes
from what it saved, so a rerun trains nothing that has finished. The data
(``data/synthetic.py``) is written to ``data_dir`` unless it is there, at the configs' image
size and vocabulary. The held-out questions are the data's test split
(``test_questions.jsonl``: images and questions never trained on), answered greedily and
scored by exact match (``evaluation.question_file``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from tokenpacker_jax import configuration, tower_pretraining, train
from tokenpacker_jax.assembly import load_trained
from tokenpacker_jax.configs import tiny
from tokenpacker_jax.data import synthetic
from tokenpacker_jax.evaluation import question_file

Adjust = Callable[[ml_collections.ConfigDict], None]  # edits a stage's config in place


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Sizes of the main job (the quickstart's flag defaults)."""

    num: int = 20000  # training images
    stage0_steps: int = 300  # tower pretraining (0: none; stage 2 then trains the tower)
    stage0_images: int = 5000  # the first training images, stage 0's data
    num_eval: int = 100  # validation and test images each
    stage1_steps: int = 50
    stage2_steps: int = 3000
    jitter: int = 0  # px items may sit off their cells' centres; -1: anywhere in the cell
    eval_batch: int = 50  # held-out questions per generation batch

    @property
    def steps(self) -> dict[int, int]:
        """{stage: optimizer steps} of the stages that train (a stage of 0 steps is left
        out: without stage 1, stage 2 starts from scratch)."""
        return {stage: steps for stage, steps in ((1, self.stage1_steps),
                                                  (2, self.stage2_steps)) if steps > 0}

    def replace(self, **values: Any) -> Recipe:
        """A copy with the given fields replaced (``None`` values keep this one's)."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})


@dataclasses.dataclass
class Result:
    stages: list[str]  # the stages' run directories, in order; the last holds the model
    summaries: dict[int, dict[str, float]]  # per stage: train.run's summary ({}: finished);
    # stage 0's: {"train/first_loss", "train/loss"}
    questions: list[dict[str, Any]]  # the held-out questions
    records: list[dict[str, Any]]  # their answer records (question_file.answer_questions)
    scores: dict[str, Any]  # question_file.exact_match: {"all" | category: {accuracy, n}}


def stage_config(stage: int, data_dir: str, recipe: Recipe, seed: int,
                 adjust: Adjust | None = None, tower: str = "") -> ml_collections.ConfigDict:
    """``configs/tiny.py:stage=S,data=DIR[,vision_checkpoint=TOWER]`` with the seed and the
    recipe's steps, then ``adjust`` (e.g. another projector)."""
    variant = f"stage={stage},data={data_dir}" + (f",vision_checkpoint={tower}" if tower else "")
    config = tiny.get_config(variant)
    config.seed = seed
    config.train.num_steps = recipe.steps.get(stage, 0)
    if adjust is not None:
        adjust(config)
    return config


def stage_configs(data_dir: str, recipe: Recipe, seed: int, adjust: Adjust | None = None,
                  tower: str = "") -> list[tuple[int, ml_collections.ConfigDict]]:
    """(stage, config) of stages 1 and 2 where they train, in order (``tower``: stage 0's
    output, loaded and frozen)."""
    if not recipe.steps:
        raise ValueError("recipe: no training steps (give stage 2 steps > 0)")
    return [(stage, stage_config(stage, data_dir, recipe, seed, adjust, tower))
            for stage in recipe.steps]


def pretrain_tower(data_dir: str, workdir: str, recipe: Recipe, seed: int, data_seed: int,
                   adjust: Adjust | None = None, log: Callable[[str], None] = print
                   ) -> tuple[str, dict[str, float]]:
    """Stage 0: the tower of the (adjusted) stage-1 config pretrained on the first
    ``stage0_images`` training images, saved to (or found in) ``workdir/stage0``; returns
    that directory and a summary ({} when found)."""
    config = stage_config(1, data_dir, recipe, seed, adjust)
    out = os.path.join(workdir, "stage0")
    losses = tower_pretraining.run(
        out, configuration.vision_config(config), steps=recipe.stage0_steps,
        num_images=min(recipe.stage0_images, recipe.num), seed=seed, data_seed=data_seed,
        jitter=None if recipe.jitter < 0 else recipe.jitter,
        layer=config.model.features.select_layer, mean=config.data.image.mean,
        std=config.data.image.std, log=log)
    if not losses:
        log(f"stage 0: {recipe.stage0_steps} steps, finished before, in {out}")
        return out, {}
    log(f"stage 0: {recipe.stage0_steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return out, {"train/first_loss": losses[0], "train/loss": losses[-1]}


def make_data(data_dir: str, recipe: Recipe, seed: int, adjust: Adjust | None = None) -> None:
    """Writes the synthetic dataset and its tokenizer to ``data_dir`` unless it is there
    (meta.json and every file stage 2 trains on: data written by an older version lacking
    one is written again), at the image size and vocabulary of the stage configs."""
    probe = stage_config(2, data_dir, recipe, seed, adjust)
    needed = [os.path.join(data_dir, "meta.json"), *probe.data.files.train.split(",")]
    if all(os.path.exists(path) for path in needed):
        return
    synthetic.generate(data_dir, recipe.num, seed, num_eval=recipe.num_eval,
                       size=probe.model.vision.image_size,
                       jitter=None if recipe.jitter < 0 else recipe.jitter,
                       tokenizer_vocab=probe.model.decoder.vocab_size)


def train_stages(data_dir: str, workdir: str, recipe: Recipe, seed: int,
                 adjust: Adjust | None = None, log: Callable[[str], None] = print,
                 data_seed: int | None = None
                 ) -> tuple[list[str], dict[int, dict[str, float]]]:
    """Trains (or finds finished) every stage in ``workdir/stageN``, each from the one
    before; returns the directories of stages 1 and 2 and the summaries of every stage."""
    stages: list[str] = []
    summaries: dict[int, dict[str, float]] = {}
    tower = ""
    if recipe.stage0_steps > 0:
        tower, summaries[0] = pretrain_tower(
            data_dir, workdir, recipe, seed, seed if data_seed is None else data_seed,
            adjust, log)
    for stage, config in stage_configs(data_dir, recipe, seed, adjust, tower):
        if stages:
            config.train.init_from = stages[-1]
        stage_dir = os.path.join(workdir, f"stage{stage}")
        summary = train.run(config, stage_dir)
        stages.append(stage_dir)
        summaries[stage] = summary
        if "train/loss" in summary:
            done = (f"loss {summary['train/loss']:.3f}, "
                    f"token accuracy {summary['train/accuracy']:.3f}")
        else:  # a rerun: the stage had finished before
            done = f"finished before, in {stage_dir}"
        log(f"stage {stage}: {config.train.num_steps} steps, {done}")
    return stages, summaries


def run(data_dir: str, workdir: str, *, recipe: Recipe = Recipe(), seed: int = 0,
        data_seed: int | None = None, adjust: Adjust | None = None,
        log: Callable[[str], None] = print) -> Result:
    """The whole job (see the module docstring). ``data_seed`` (default ``seed``) draws the
    data, ``seed`` the initialisation and data order. ``log`` gets a line per step."""
    data_seed = seed if data_seed is None else data_seed
    make_data(data_dir, recipe, data_seed, adjust)
    log(f"data: {recipe.num} training images in {data_dir}")
    stages, summaries = train_stages(data_dir, workdir, recipe, seed, adjust, log, data_seed)
    trained = load_trained(stages[-1])
    questions = question_file.read_questions(os.path.join(data_dir, "test_questions.jsonl"))
    records = question_file.answer_questions(trained, questions, data_dir,
                                             batch_size=recipe.eval_batch)
    return Result(stages, summaries, questions, records, question_file.exact_match(records))


def about_one_image(result: Result) -> tuple[str, list[str]]:
    """The first held-out image and, per question about it (one per category), the line
    ``'question' -> 'answer' (truth: 'truth')``."""
    image = result.questions[0]["image"]
    return image, [f"{q['text']!r} -> {r['text']!r} (truth: {q['answer']!r})"
                   for q, r in zip(result.questions, result.records, strict=True)
                   if q["image"] == image]
