"""OCRBench and DocVQA: reading text in images.

OCRBench: ``DATA/OCRBench/OCRBench.json`` (a JSON list of ``{dataset_name, id,
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

DocVQA (``--split=test`` or ``val``): ``DATA/data/{split}_v1.0.json`` (``{"data": [{
questionId, question, image, answers?}]}``), images under ``DATA/images`` by the file name
of ``image`` (or at ``DATA/`` + ``image``, as the release unpacks). The message is the
question, a newline and "Answer the question using a single word or phrase." (the
reference's ``eval_docvqa``); up to 128 new tokens. Answer lines are ``{questionId,
answer}``; the submission ``submit.json`` lists them with trailing full stops removed
(``convert_docvqa_for_eval``). Where the questions carry ``answers`` (val), the submission
is scored with ANLS as the DocVQA server computes it: prediction and answers lower-cased,
stripped, runs of whitespace made one space; per question 1 - (edit distance / length of
the longer string) for the closest answer, 0 when below 0.5; the mean over the questions.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from typing import Any

from tokenpacker_jax.evaluation import files
from tokenpacker_jax.evaluation.benchmark import Benchmark, Layout, Question, image_file
from tokenpacker_jax.user_error import InputError

SHORT = "Answer the question using a single word or phrase."
RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition",
               "Artistic Text Recognition", "Handwriting Recognition",
               "Digit String Recognition", "Non-Semantic Text Recognition")
OCRBENCH_TYPES = RECOGNITION + ("Scene Text-centric VQA", "Doc-oriented VQA",
                                "Key Information Extraction",
                                "Handwritten Mathematical Expression Recognition")
FORMULAS = "HME100k"


# -- OCRBench ---------------------------------------------------------------------------------

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
        questions.append(Question(i, record["id"], f"{record['question']}\n{SHORT}",
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


# -- DocVQA -----------------------------------------------------------------------------------

def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one character)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """One question's normalised Levenshtein similarity (see the module docstring)."""
    def clean(text):
        return " ".join(text.strip().lower().split())

    prediction = clean(prediction)
    best = 0.0
    for answer in map(clean, answers):
        longer = max(len(answer), len(prediction))
        similarity = 1.0 - edit_distance(answer, prediction) / longer if longer else 1.0
        best = max(best, similarity)
    return best if best >= threshold else 0.0


def docvqa_submission(lines: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"questionId": line["questionId"], "answer": line["answer"].rstrip(".")}
            for line in lines]


def score_docvqa(answers_path: str, annotations_path: str) -> dict[str, Any]:
    """ANLS of an answer file (``{questionId, answer}`` lines) against questions with
    ``answers``: ``anls``, ``n``, ``unanswered``."""
    truth = {}
    for where, record in _docvqa_records(annotations_path):
        files.check_fields(where, record, ("answers",))
        truth[record["questionId"]] = record["answers"]
    lines = files.read_answer_lines(answers_path, ("questionId", "answer"), "answer")
    scores = []
    for where, line in lines:
        if line["questionId"] not in truth:
            raise InputError(f"{where}: questionId {line['questionId']!r} is not in "
                             f"{annotations_path}")
        submitted = docvqa_submission([line])[0]["answer"]
        scores.append(anls(submitted, truth[line["questionId"]]))
    return {"anls": files.mean(scores)["accuracy"], "n": len(scores),
            "unanswered": len(truth) - len(scores)}


def docvqa_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    if result["unanswered"]:
        lines.append(f"  ({result['unanswered']} questions have no answer; ANLS is over the "
                     f"answered ones)")
    return lines + [f"docvqa anls: {100 * result['anls']:.2f} (n={result['n']})"]


def _docvqa_score(answers: str, annotations: str, questions: str | None = None) -> list[str]:
    return docvqa_lines(score_docvqa(answers, annotations))


def _docvqa_records(path: str) -> list[tuple[str, dict[str, Any]]]:
    data = files.read_json(path, "DocVQA's question file")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise InputError(f'{path}: expected {{"data": [...]}}')
    records = []
    for i, record in enumerate(data["data"]):
        where = f"{path}: data[{i}]"
        files.check_fields(where, record, ("questionId", "question", "image"))
        records.append((where, record))
    return records


def _docvqa_file(layout: Layout) -> str:
    return files.first_existing([f"{layout.data}/data/{layout.split}_v1.0.json",
                                 f"{layout.data}/data/{layout.split}_v1.0_withQT.json"],
                                f"DocVQA's {layout.split} questions")


def _docvqa_image(layout: Layout, name: str, where: str) -> str:
    folder = layout.images("images")
    inside = os.path.join(folder, os.path.basename(name))
    released = os.path.join(layout.data, name)
    if layout.image_folder is None and not os.path.isfile(inside) and os.path.isfile(released):
        return released
    return image_file(folder, os.path.basename(name), where)


def _docvqa_questions(layout: Layout) -> list[Question]:
    return [Question(i, record["questionId"], f"{record['question']}\n{SHORT}",
                     _docvqa_image(layout, record["image"], where), where)
            for i, (where, record) in enumerate(_docvqa_records(_docvqa_file(layout)))]


def _docvqa_line(question: Question, text: str, model_id: str) -> dict[str, Any]:
    return {"questionId": question.question_id, "answer": text}


def _docvqa_finish(layout: Layout, lines: list[dict[str, Any]]) -> list[str]:
    answers = files.write_jsonl(layout.output("answers.jsonl"), lines)
    path = files.write_json(layout.output("submit.json"), docvqa_submission(lines))
    out = [f"docvqa: submission {path} (DocVQA server)"]
    question_file = _docvqa_file(layout)
    if all("answers" in record for _, record in _docvqa_records(question_file)):
        result = score_docvqa(answers, question_file)
        files.write_json(layout.output("scores.json"), result, indent=2)
        out += docvqa_lines(result)
    return out


OCRBENCH = Benchmark("ocrbench", _ocrbench_questions, _ocrbench_finish, max_new_tokens=128,
                     answer_line=_ocrbench_line, score=_ocrbench_score)
DOCVQA = Benchmark("docvqa", _docvqa_questions, _docvqa_finish, max_new_tokens=128,
                   split="test", answer_line=_docvqa_line, score=_docvqa_score)
