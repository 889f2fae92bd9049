"""OCRBench: reading text in images, right answers counted per question type.

Questions: ``DATA/OCRBench/OCRBench.json`` (a JSON list of ``{dataset_name, id,
image_path, question, answers, type}``; ``answers`` a string or a list), images under
``DATA/OCRBench_Images``. The message is the question, a newline and "Answer the question
using a single word or phrase." (the reference's ``eval_ocr_bench``); up to 128 new tokens.
The results file ``MODEL.json`` is the benchmark's list with ``predict`` (the answer) and
``result`` (0 or 1) added, indented by 4. A question is right when one of its answers is
contained in the prediction: for HME100k (formulas) both with newlines made spaces and all
spaces then removed, case kept; for the others both lower-cased and stripped, newlines made
spaces. The score is the count of right answers per type; the final score (of 1000) sums
the six recognition types, scene-text VQA, document VQA, key information extraction and
handwritten formulas. Per source dataset, the accuracy.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from tokenpacker_jax.evaluation import files
from tokenpacker_jax.evaluation.benchmark import (
    SHORT_ANSWER,
    Benchmark,
    Layout,
    Question,
    image_file,
)
from tokenpacker_jax.user_error import InputError

RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition",
               "Artistic Text Recognition", "Handwriting Recognition",
               "Digit String Recognition", "Non-Semantic Text Recognition")
OCRBENCH_TYPES = RECOGNITION + ("Scene Text-centric VQA", "Doc-oriented VQA",
                                "Key Information Extraction",
                                "Handwritten Mathematical Expression Recognition")
FORMULAS = "HME100k"


def ocrbench_right(record: dict[str, Any], prediction: str) -> bool:
    """Whether one of the record's answers is in the prediction (see the module
    docstring)."""
    answers = record["answers"] if isinstance(record["answers"], list) else [record["answers"]]
    if record["dataset_name"] == FORMULAS:
        def clean(text):
            return text.strip().replace("\n", " ").replace(" ", "")
    else:
        def clean(text):
            return text.lower().strip().replace("\n", " ")
    return any(clean(answer) in clean(prediction) for answer in answers)


def score_ocrbench(records: Sequence[dict[str, Any]], where: str) -> dict[str, Any]:
    """Adds ``result`` to each record with a ``predict``; returns ``per_type`` (right
    answers), ``final`` (their sum over the benchmark's types), ``per_dataset``
    (accuracy) and ``n`` (records with a prediction)."""
    per_type = dict.fromkeys(OCRBENCH_TYPES, 0)
    per_dataset = collections.defaultdict(list)
    answered = 0
    for i, record in enumerate(records):
        files.check_fields(f"{where}: record {i}", record,
                           ("dataset_name", "answers", "type"))
        if record["type"] not in per_type:
            raise InputError(f"{where}: record {i}: type {record['type']!r} is not one of "
                             f"OCRBench's {list(per_type)}")
        if "predict" not in record:
            per_dataset[record["dataset_name"]].append(0.0)
            continue
        answered += 1
        record["result"] = int(ocrbench_right(record, record["predict"]))
        per_type[record["type"]] += record["result"]
        per_dataset[record["dataset_name"]].append(float(record["result"]))
    return {"per_type": per_type, "recognition": sum(per_type[t] for t in RECOGNITION),
            "final": sum(per_type.values()), "per_dataset": files.grouped(per_dataset),
            "n": answered, "questions": len(records)}


def ocrbench_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"  {name}: {count}" for name, count in result["per_type"].items()]
    lines += [f"  {name}: {100 * m['accuracy']:.2f} (n={m['n']})"
              for name, m in result["per_dataset"].items()]
    lines.append(f"  text recognition: {result['recognition']}")
    return lines + [f"ocrbench final score: {result['final']} ({result['n']} of "
                    f"{result['questions']} questions answered)"]


def _ocrbench_score(answers: str, annotations: str | None = None,
                    questions: str | None = None) -> list[str]:
    records = files.read_json(answers, "OCRBench results (the benchmark's list + predict)")
    if not isinstance(records, list):
        raise InputError(f"{answers}: expected OCRBench's JSON list with 'predict' fields")
    return ocrbench_lines(score_ocrbench(records, answers))


def _ocrbench_file(layout: Layout) -> str:
    return files.first_existing([f"{layout.data}/OCRBench/OCRBench.json",
                                 f"{layout.data}/OCRBench.json"], "OCRBench's question file")


def _ocrbench_questions(layout: Layout) -> list[Question]:
    path = _ocrbench_file(layout)
    records = files.read_json(path, "OCRBench.json")
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a JSON list of questions")
    folder = layout.images("OCRBench_Images")
    questions = []
    for i, record in enumerate(records):
        where = f"{path}: record {i}"
        files.check_fields(where, record, ("dataset_name", "id", "image_path", "question",
                                           "answers", "type"))
        questions.append(Question(i, record["id"], f"{record['question']}\n{SHORT_ANSWER}",
                                  image_file(folder, record["image_path"], where), where,
                                  {"record": record}))
    return questions


def _ocrbench_line(question: Question, text: str, model_id: str) -> dict[str, Any]:
    return {**question.extra["record"], "predict": text}


def _ocrbench_finish(layout: Layout, lines: list[dict[str, Any]]) -> list[str]:
    records = [dict(line) for line in lines]
    result = score_ocrbench(records, layout.output("answers"))
    path = files.write_json(layout.output(f"{layout.model_id}.json"), records, indent=4)
    files.write_json(layout.output("scores.json"), result, indent=2)
    return [f"ocrbench: results in {path}", *ocrbench_lines(result)]


OCRBENCH = Benchmark("ocrbench", _ocrbench_questions, _ocrbench_finish, max_new_tokens=128,
                     answer_line=_ocrbench_line, score=_ocrbench_score)
