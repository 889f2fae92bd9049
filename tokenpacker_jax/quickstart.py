"""The main job at toy scale on the CPU (README's first command).

    python -m tokenpacker_jax.quickstart [--workdir=/tmp/tokenpacker_quickstart] [--seed=0]

Runs ``tokenpacker_jax.recipe`` (the one definition of the main job):

1. writes a synthetic fine-detail dataset (``tokenpacker_jax.data.synthetic``, items centred
   in their cells unless ``--jitter``) and a tokenizer trained on its text;
2. stage 0 (``--stage0_steps``, 0: none): pretrains the tiny vision tower to tell what each
   cell of the training images holds (``tokenpacker_jax.tower_pretraining``);
3. trains ``configs/tiny.py`` stage 1 (projector, captions), then stage 2 (from stage 1;
   questions and answers), with stage 0's tower loaded and frozen (without stage 0, the
   tower starts random and stage 2 trains it);
4. answers the held-out questions about one image (one per category);
5. answers every held-out question and scores exact match; the last line is
   ``held-out accuracy: X (n=N)``.

Rerunning resumes: finished stages are not trained again (their checkpoints are found).
"""

from __future__ import annotations

import json
import os
import time

from absl import flags, logging

from tokenpacker_jax import recipe, user_error
from tokenpacker_jax.evaluation import question_file

_MAIN_JOB = recipe.Recipe()
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/tokenpacker_quickstart", "Where it all goes.")
_NUM = flags.DEFINE_integer("num", _MAIN_JOB.num, "Training images.")
_NUM_EVAL = flags.DEFINE_integer("num_eval", _MAIN_JOB.num_eval,
                                 "Validation and test images each.")
_STEPS0 = flags.DEFINE_integer("stage0_steps", _MAIN_JOB.stage0_steps,
                               "Stage 0 (tower pretraining) steps; 0: none, stage 2 then "
                               "trains the tower from scratch.")
_STEPS1 = flags.DEFINE_integer("stage1_steps", _MAIN_JOB.stage1_steps,
                               "Stage 1 optimizer steps.")
_STEPS2 = flags.DEFINE_integer("stage2_steps", _MAIN_JOB.stage2_steps,
                               "Stage 2 optimizer steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Data and initialisation seed.")
_JITTER = flags.DEFINE_integer(
    "jitter", _MAIN_JOB.jitter, "How many px shapes and digits may sit off their cells' "
    "centres (-1: anywhere in the cell). The tiny tower learns from scratch; centred items "
    "fall on the same pixels of their patches, and it learns to read them in the time of "
    "the job.")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    start = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - start:5.0f}s] {line}", flush=True)

    sizes = _MAIN_JOB.replace(num=_NUM.value, num_eval=_NUM_EVAL.value,
                              stage0_steps=_STEPS0.value, stage1_steps=_STEPS1.value,
                              stage2_steps=_STEPS2.value,
                              jitter=_JITTER.value)
    workdir = _WORKDIR.value
    result = recipe.run(os.path.join(workdir, "data"), workdir, recipe=sizes,
                        seed=_SEED.value, log=log)
    image, lines = recipe.about_one_image(result)
    log(f"the held-out questions about {image}:")
    for line in lines:
        print(f"  {line}")
    with open(os.path.join(workdir, "test_answers.jsonl"), "w", encoding="utf-8") as file:
        file.writelines(json.dumps(record) + "\n" for record in result.records)
    for line in question_file.exact_match_lines(result.scores):
        print(line)


if __name__ == "__main__":
    user_error.run_absl(main, "tokenpacker_jax.quickstart")
