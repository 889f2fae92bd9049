"""MMMU (validation): the reference's prompts, its answer lines and scores (the parsing and
judging of a response are ``mmmu_answers``').

Questions: the MMMU dataset as published on the Hugging Face hub, one directory per subject
(the 30 of ``SUBJECTS``, in that order) holding ``validation-*.parquet`` with ``id``,
``question``, ``options`` (a Python list literal), ``answer``, ``question_type``
(``multiple-choice`` or open) and ``image_1`` ... ``image_7`` (``{bytes, path}``).

Prompt: a multiple-choice question is the question, a newline, one line "(A) option" per
option, an empty line and "Answer with the option's letter from the given choices
directly."; an open question is the question, a newline and "Answer the question using a
single word or phrase." (the reference's ``llava1.5.yaml``). Only ``image_1`` is shown, after
``<image>`` and a newline; ``<image 1>`` marks in the text stay. A question whose options
hold more than one ``<img='...'>`` image, or that has no ``image_1``, is not asked: its
response is a random option letter (multiple choice) or "INVALID GENERATION FOR MULTIPLE
IMAGE INPUTS". Up to 1024 new tokens.

Random letters (for questions not asked, and for responses naming no option) come from one
``random.Random(42)``, drawn in question order (the reference seeds 42 per process, so its
draws depend on how it split the questions over GPUs; one process gives these). Answer lines
(the reference's ``merge.jsonl``): ``id``, ``question_type``, ``answer``, ``response``,
``parsed_pred``, and ``index2ans`` for multiple choice; ``val.json`` holds the verdict per
id and ``metric_dict`` ({acc, num_example}), as the reference's ``eval.py`` writes it.
"""

from __future__ import annotations

import ast
import collections
import glob
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from tokenpacker_jax.evaluation import files
from tokenpacker_jax.evaluation.benchmark import (
    LETTER_ANSWER,
    SHORT_ANSWER,
    Benchmark,
    Layout,
    Question,
)
from tokenpacker_jax.evaluation.mmmu_answers import MULTIPLE_CHOICE, parsed_prediction, right
from tokenpacker_jax.user_error import InputError

SUBJECTS = (
    "Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory",
    "Basic_Medical_Science", "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science",
    "Design", "Diagnostics_and_Laboratory_Medicine", "Economics", "Electronics",
    "Energy_and_Power", "Finance", "Geography", "History", "Literature", "Manage",
    "Marketing", "Materials", "Math", "Mechanical_Engineering", "Music", "Pharmacy",
    "Physics", "Psychology", "Public_Health", "Sociology")
NOT_ASKED = "INVALID GENERATION FOR MULTIPLE IMAGE INPUTS"
SEED = 42
_OPTION_IMAGE = re.compile(r"<img='(.*?)'>")


def letters(count: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(count)]


def prompt(question: str, options: Sequence[str], question_type: str) -> str:
    if question_type == MULTIPLE_CHOICE:
        listed = "".join(f"({letter}) {option}\n"
                         for letter, option in zip(letters(len(options)), options, strict=True))
        return f"{question}\n{listed}\n{LETTER_ANSWER}"
    return f"{question}\n{SHORT_ANSWER}"


def score_mmmu(lines: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(scores, val.json contents): ``accuracy``, ``n``, ``per_subject``."""
    verdicts, per_subject = {}, collections.defaultdict(list)
    for line in lines:
        ok = right(line)
        verdicts[line["id"]] = "Correct" if ok else "Wrong"
        subject = str(line["id"]).removeprefix("validation_").rsplit("_", 1)[0]
        per_subject[subject].append(float(ok))
    values = [float(v == "Correct") for v in verdicts.values()]
    accuracy = sum(values) / len(lines) if lines else 0.0
    judged = {**verdicts, "metric_dict": {"acc": accuracy, "num_example": len(lines)}}
    return ({"accuracy": accuracy, "n": len(lines),
             "per_subject": files.grouped(per_subject)}, judged)


def with_parsed(lines: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Answer lines with ``parsed_pred`` (kept where a line has one) and the random
    responses of questions not asked, drawn in order from one generator."""
    rng, out = random.Random(SEED), []
    for line in lines:
        line = dict(line)
        if line["response"] is None:  # not asked: a random option letter
            line["response"] = rng.choice(line["all_choices"])
        if "parsed_pred" not in line:
            line["parsed_pred"] = parsed_prediction(line, rng)
        out.append(line)
    return out


def score_lines(scores: dict[str, Any]) -> list[str]:
    return ([f"  {name}: {100 * m['accuracy']:.2f} (n={m['n']})"
             for name, m in scores["per_subject"].items()]
            + [f"mmmu accuracy: {100 * scores['accuracy']:.2f} (n={scores['n']})"])


def _read_lines(path: str) -> list[dict[str, Any]]:
    lines = []
    for where, line in files.read_jsonl(path):
        files.check_fields(where, line, ("id", "question_type", "answer", "response"))
        if line["question_type"] == MULTIPLE_CHOICE and "parsed_pred" not in line:
            files.check_fields(where, line, ("index2ans",))
            line.setdefault("all_choices", list(line["index2ans"]))
        lines.append(line)
    return lines


def _score(answers: str, annotations: str | None = None, questions: str | None = None
           ) -> list[str]:
    return score_lines(score_mmmu(with_parsed(_read_lines(answers)))[0])


def _image(record: Mapping[str, Any], where: str) -> bytes | None:
    value = record.get("image_1")
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("bytes"), bytes):
        raise InputError(f"{where}: image_1 must be {{bytes, path}}")
    return value["bytes"]


def _questions(layout: Layout) -> list[Question]:
    import pyarrow.parquet as pq  # noqa: PLC0415 (pyarrow: only MMMU's files need it)

    questions = []
    for subject in SUBJECTS:
        paths = sorted(glob.glob(f"{layout.data}/{subject}/{layout.split}-*.parquet"))
        if not paths:
            raise files.LayoutError(f"{layout.data}/{subject}: no {layout.split}-*.parquet "
                                    f"(expected the MMMU dataset's directory per subject)")
        for path in paths:
            for row, record in enumerate(pq.read_table(path).to_pylist()):
                where = f"{path}: row {row}"
                files.check_fields(where, record, ("id", "question", "options", "answer",
                                                   "question_type"))
                try:
                    options = ast.literal_eval(record["options"])
                except (ValueError, SyntaxError) as err:
                    raise InputError(f"{where}: options {record['options']!r} is not a "
                                     f"list literal") from err
                option_images = [m for o in options for m in _OPTION_IMAGE.findall(str(o))]
                image = None if len(option_images) > 1 else _image(record, where)
                choices = letters(len(options))
                extra = {"id": record["id"], "question_type": record["question_type"],
                         "answer": record["answer"]}
                if record["question_type"] == MULTIPLE_CHOICE:
                    extra.update(index2ans=dict(zip(choices, options, strict=True)),
                                 all_choices=choices)
                questions.append(Question(
                    len(questions), record["id"],
                    prompt(record["question"], options, record["question_type"]), image,
                    where, extra, ask=image is not None))
    return questions


def answer_line(question: Question, text: str | None, model_id: str) -> dict[str, Any]:
    extra = question.extra
    if text is None and extra["question_type"] != MULTIPLE_CHOICE:
        text = NOT_ASKED
    line = {"id": extra["id"], "question_type": extra["question_type"],
            "answer": extra["answer"], "response": text}
    if extra["question_type"] == MULTIPLE_CHOICE:
        line.update(index2ans=extra["index2ans"], all_choices=extra["all_choices"])
    return line


def _finish(layout: Layout, lines: list[dict[str, Any]]) -> list[str]:
    lines = with_parsed(lines)
    for line in lines:
        line.pop("all_choices", None)
    files.write_jsonl(layout.output("answers.jsonl"), lines)
    scores, judged = score_mmmu(lines)
    files.write_json(layout.output("val.json"), judged, indent=4)
    files.write_json(layout.output("scores.json"), scores, indent=2)
    return score_lines(scores)


MMMU = Benchmark("mmmu", _questions, _finish, max_new_tokens=1024, split="validation",
                 answer_line=answer_line, score=_score)
