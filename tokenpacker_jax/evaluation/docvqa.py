"""DocVQA: questions about document images, answers scored with ANLS.

Questions (``--split=test`` or ``val``): ``DATA/data/{split}_v1.0.json`` (``{"data": [{
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

import os
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
    return [Question(i, record["questionId"], f"{record['question']}\n{SHORT_ANSWER}",
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


DOCVQA = Benchmark("docvqa", _docvqa_questions, _docvqa_finish, max_new_tokens=128,
                   split="test", answer_line=_docvqa_line, score=_docvqa_score)
