"""MM-Vet: the results file for the official GPT-4 grader (no grading offline).

Questions: ``DATA/llava-mm-vet.jsonl`` (a LLaVA question file, ``text`` the question as
published, no suffix), images in ``DATA/images``. Answered as the reference's ``model_vqa``
does: ``<image>``, a newline and the question; up to 1024 new tokens. Written as
``convert_mmvet_for_eval`` does: ``MODEL.json``, ``{"v1_QID": answer}`` indented by 2, for
the grader's notebook.
"""

from __future__ import annotations

from typing import Any

from tokenpacker_jax.evaluation import files
from tokenpacker_jax.evaluation.benchmark import Benchmark, Layout
from tokenpacker_jax.evaluation.question_file import reader


def _finish(layout: Layout, lines: list[dict[str, Any]]) -> list[str]:
    files.write_jsonl(layout.output("answers.jsonl"), lines)
    path = files.write_json(layout.output(f"{layout.model_id}.json"),
                            {f"v1_{line['question_id']}": line["text"] for line in lines},
                            indent=2)
    return [f"mmvet: {len(lines)} answers in {path} (for MM-Vet's GPT-4 grader)"]


MMVET = Benchmark("mmvet", reader("llava-mm-vet.jsonl", "images",
                                  "the LLaVA MM-Vet question file"),
                  _finish, max_new_tokens=1024)
