"""``python -m tokenpacker_jax.evaluate score``: prints a benchmark's score of an answer
file; a missing flag is a usage error."""

import os
import subprocess
import sys
from pathlib import Path

from evaluation_helpers import answers_file, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_evaluate_cli_score_command(tmp_path):
    labels = write_jsonl(tmp_path / "labels.jsonl", [{"question_id": 1, "label": "yes"},
                                                    {"question_id": 2, "label": "no"}])
    answers = answers_file(tmp_path / "answers.jsonl", {1: "Yes.", 2: "Yes, it is."})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tokenpacker_jax.evaluate", "score", "--benchmark=pope",
               f"--answers={answers}", f"--annotations={labels}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == (
        "pope accuracy: 50.00 f1: 66.67 precision: 50.00 recall: 100.00 yes: 100.00 (n=2)")
    # Without --annotations the command is refused with a usage error.
    done = subprocess.run(command[:-1], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert done.returncode != 0 and "score --benchmark=pope needs --annotations" in done.stderr
