"""The main job at toy scale on the CPU (README's first command).

    python -m tokenpacker_jax.quickstart [--workdir=/tmp/tokenpacker_quickstart]

1. writes a synthetic fine-detail dataset (``tokenpacker_jax.data.synthetic``, items centred
   in their cells unless ``--jitter``) and a tokenizer trained on its text;
2. trains ``configs/tiny.py`` stage 1 (projector, captions), then stage 2 (from stage 1;
   questions and answers);
3. answers the held-out questions about one image (one per category);
4. answers every held-out question and scores exact match; the last line is
   ``held-out accuracy: X (n=N)``.

Rerunning resumes: finished stages are not trained again (their checkpoints are found).
"""

from __future__ import annotations

import json
import os
import time

from absl import flags, logging

from tokenpacker_jax import train, user_error
from tokenpacker_jax.assembly import load_trained
from tokenpacker_jax.configs import tiny
from tokenpacker_jax.data import synthetic
from tokenpacker_jax.evaluation import question_file

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/tokenpacker_quickstart", "Where it all goes.")
_NUM = flags.DEFINE_integer("num", 20000, "Training images.")
_NUM_EVAL = flags.DEFINE_integer("num_eval", 100, "Validation and test images each.")
_STEPS1 = flags.DEFINE_integer("stage1_steps", 50, "Stage 1 optimizer steps.")
_STEPS2 = flags.DEFINE_integer("stage2_steps", 3000, "Stage 2 optimizer steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Data and initialisation seed.")
_JITTER = flags.DEFINE_integer(
    "jitter", 0, "How many px shapes and digits may sit off their cells' centres (-1: "
    "anywhere in the cell). The tiny tower learns from scratch; centred items fall on the "
    "same pixels of their patches, and it learns to read them in the time of the job.")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    start = time.perf_counter()
    workdir = _WORKDIR.value
    data = os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(data, "meta.json")):
        synthetic.generate(data, _NUM.value, _SEED.value, num_eval=_NUM_EVAL.value, size=48,
                           jitter=None if _JITTER.value < 0 else _JITTER.value,
                           tokenizer_vocab=512)
    print(f"[{time.perf_counter() - start:5.0f}s] data: {_NUM.value} training images in {data}")

    stages = []
    for stage, steps in ((1, _STEPS1.value), (2, _STEPS2.value)):
        config = tiny.get_config(f"stage={stage},data={data}")
        config.seed = _SEED.value
        config.train.num_steps = steps
        if stage == 2:
            config.train.init_from = stages[-1]
        run_dir = os.path.join(workdir, f"stage{stage}")
        summary = train.run(config, run_dir)
        stages.append(run_dir)
        if "train/loss" in summary:
            result = (f"loss {summary['train/loss']:.3f}, "
                      f"token accuracy {summary['train/accuracy']:.3f}")
        else:  # a rerun: the stage had finished before
            result = f"finished before, in {run_dir}"
        print(f"[{time.perf_counter() - start:5.0f}s] stage {stage}: {steps} steps, {result}")

    trained = load_trained(stages[-1])
    questions = question_file.read_questions(os.path.join(data, "test_questions.jsonl"))
    records = question_file.answer_questions(trained, questions, data, batch_size=50)
    image = questions[0]["image"]
    print(f"[{time.perf_counter() - start:5.0f}s] the held-out questions about {image}:")
    for question, record in zip(questions, records, strict=True):
        if question["image"] == image:  # one per category
            print(f"  {question['text']!r} -> {record['text']!r} (truth: {question['answer']!r})")
    with open(os.path.join(workdir, "test_answers.jsonl"), "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    scores = question_file.exact_match(records)
    for category, result in scores.items():
        if category != "all":
            print(f"  {category}: {result['accuracy']:.3f} (n={result['n']})")
    print(f"held-out accuracy: {scores['all']['accuracy']:.3f} (n={scores['all']['n']})")


if __name__ == "__main__":
    user_error.run_absl(main, "tokenpacker_jax.quickstart")
