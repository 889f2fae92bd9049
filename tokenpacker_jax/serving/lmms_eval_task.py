"""lmms-eval against the server: a task built from local files, no hub access.

    python -m tokenpacker_jax.serving.lmms_eval_task [--checkpoint=W --data=DIR]
        [--limit=N] [--lmms_python=PYTHON]

Writes an lmms-eval task (``tokenpacker_synthetic``: a YAML file and its ``utils.py``) over
DIR/test_questions.jsonl, the synthetic dataset's held-out questions (``question_id``,
``image``, ``text``, ``answer``), read with the ``json`` loader of HF datasets; starts
``python -m tokenpacker_jax.serve`` on the checkpoint (default: a random tiny run,
``serving.random_run``); runs lmms-eval's OpenAI-compatible model on it::

    PYTHON -m lmms_eval --model openai --model_args model=NAME,base_url=URL/v1,api_key=...
        --tasks tokenpacker_synthetic --include_path TASK_DIR

and prints lmms-eval's exact-match accuracy beside ours (``evaluation.question_file``) on the
same questions in this process (greedy, 16 new tokens, the same normalisation), and how
many of lmms-eval's answers (``--log_samples``) equal ours: all of them when the harness
sent each question and image as asked and read the answers back (exit status 0).
``PYTHON`` is the interpreter lmms-eval is installed for (it pulls in many packages: a
virtual environment of its own, e.g. ``python -m venv --system-site-packages``, keeps them
apart); it needs this repository on its path only through the server's process.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from tokenpacker_jax import user_error
from tokenpacker_jax.assembly import load_trained
from tokenpacker_jax.evaluation import question_file
from tokenpacker_jax.serving import launch
from tokenpacker_jax.serving.random_run import add_run_flags, run_from_flags

TASK = "tokenpacker_synthetic"
MAX_NEW_TOKENS = 16

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {questions}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

TASK_UTILS = '''\
"""tokenpacker-jax's synthetic held-out questions (from tokenpacker_jax.serving.lmms_eval_task)."""
import os

from PIL import Image

IMAGE_FOLDER = {image_folder!r}


def doc_to_visual(doc):
    return [Image.open(os.path.join(IMAGE_FOLDER, doc["image"])).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["text"]


def normalise(text):
    return text.strip().lower().rstrip(".").strip()


def process_results(doc, results):
    return {{"exact_match": float(normalise(results[0]) == normalise(doc["answer"]))}}
'''


def write_task(directory: str, data: str, limit: int) -> str:
    """The task's files in ``directory``, over the first ``limit`` questions (0: all)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(data, "test_questions.jsonl"), encoding="utf-8") as file:
        lines = [line for line in file if line.strip()]
    questions = os.path.join(directory, "questions.jsonl")
    with open(questions, "w", encoding="utf-8") as file:
        file.writelines(lines[:limit] if limit else lines)
    with open(os.path.join(directory, f"{TASK}.yaml"), "w", encoding="utf-8") as file:
        file.write(TASK_YAML.format(task=TASK, questions=questions,
                                    max_new_tokens=MAX_NEW_TOKENS))
    with open(os.path.join(directory, "utils.py"), "w", encoding="utf-8") as file:
        file.write(TASK_UTILS.format(image_folder=os.path.abspath(data)))
    return questions


def run_lmms_eval(python: str, url: str, model: str, task_dir: str, out: str
                  ) -> tuple[float, dict[str, str]]:
    """Runs lmms-eval (offline): its exact-match accuracy and its answer per question
    (by line in the task's file)."""
    environment = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                       OPENAI_API_KEY="unused")
    command = [python, "-m", "lmms_eval", "--model", "openai", "--model_args",
               f"model={model},base_url={url}/v1,api_key=unused,num_concurrent=8",
               "--tasks", TASK, "--include_path", task_dir, "--batch_size", "1",
               "--output_path", out, "--log_samples"]
    print(" ".join(command), flush=True)
    subprocess.run(command, env=environment, check=True)
    results = glob.glob(os.path.join(out, "**", "*_results.json"), recursive=True)
    samples = glob.glob(os.path.join(out, "**", f"*_samples_{TASK}.jsonl"), recursive=True)
    if not results or not samples:
        raise RuntimeError(f"lmms-eval wrote no results under {out} (its log above says why)")
    with open(max(results, key=os.path.getmtime), encoding="utf-8") as file:
        scores = json.load(file)["results"][TASK]
    accuracy = float(next(v for k, v in scores.items()
                          if k.startswith("exact_match") and "stderr" not in k))
    answers = {}
    with open(max(samples, key=os.path.getmtime), encoding="utf-8") as file:
        for line in file:  # doc_id: the question's line in the task's file
            sample = json.loads(line)
            response = sample["filtered_resps"]
            answers[sample["doc_id"]] = response[0] if isinstance(response, list) else response
    return accuracy, answers


def our_answers(checkpoint: str, questions_file: str, data: str
                ) -> tuple[float, dict[str, str]]:
    """``evaluation.question_file`` on the same questions: accuracy and answers."""
    trained = load_trained(checkpoint)
    questions = question_file.read_questions(questions_file)
    records = question_file.answer_questions(trained, questions, data,
                                             max_new_tokens=MAX_NEW_TOKENS)
    return (question_file.exact_match(records)["all"]["accuracy"],
            {line: record["text"] for line, record in enumerate(records)})


def main(argv: Sequence[str] | None = None) -> int:
    parser = user_error.ArgumentParser(prog="python -m tokenpacker_jax.serving.lmms_eval_task",
                                     description=__doc__.split("\n\n")[0])
    add_run_flags(parser)
    parser.add_argument("--limit", type=int, default=40, help="questions (0: all)")
    parser.add_argument("--lmms_python", default=sys.executable,
                        help="the Python that has lmms-eval installed")
    parser.add_argument("--workdir", default=None, help="where to write (default: a "
                                                        "temporary directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or scratch
        checkpoint, data = run_from_flags(parser, args, workdir, images=8)
        questions = write_task(os.path.join(workdir, "task"), data, args.limit)
        with open(os.path.join(workdir, "server.log"), "w") as log:
            process, url = launch.start_server(
                [f"--checkpoint={checkpoint}", "--max_length=256", "--buckets=64,128",
                 "--log_level=warning"], log)
            try:
                model = os.path.basename(os.path.normpath(checkpoint))
                theirs, their_answers = run_lmms_eval(
                    args.lmms_python, url, model, os.path.join(workdir, "task"),
                    os.path.join(workdir, "lmms_eval_out"))
            finally:
                process.terminate()
                process.wait(60)
        ours, our = our_answers(checkpoint, questions, data)
    equal = sum(their_answers.get(line) == text for line, text in our.items())
    print(f"{TASK}: {len(our)} questions; exact match: lmms-eval through the server "
          f"{theirs:.4f}, tokenpacker_jax {ours:.4f}; answers equal: "
          f"{equal}/{len(our)}")
    return 0 if equal == len(our) and abs(theirs - ours) < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(user_error.run_argparse(main, "tokenpacker_jax.serving.lmms_eval_task"))
