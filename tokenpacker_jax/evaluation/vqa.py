"""VQAv2, VizWiz and TextVQA: short answers processed as EvalAI does.

Questions (LLaVA question files, see ``question_file``): the message is ``text`` as
published, which already ends in the reference's suffix ("Answer the question using a single
word or phrase.", and for VizWiz before it "When the provided information is insufficient,
respond with 'Unanswerable'."; for TextVQA the OCR-token variant, "Reference OCR token: ..."
on its own line between the question and the suffix). The answer lines are
``model_vqa_loader``'s (up to 128 new tokens). One answer's normalisation and accuracy are
``vqa_answers``'s.

- ``vqav2`` (``--split=test-dev2015``): ``DATA/llava_vqav2_mscoco_test-dev2015.jsonl``,
  images in ``DATA/test2015``. Writes the submission for the EvalAI server as LLaVA's
  ``convert_vqav2_for_submission`` does: one ``{question_id, answer}`` per question of
  ``DATA/llava_vqav2_mscoco_test2015.jsonl`` (the whole test set, which the server wants
  even for test-dev), the answer EvalAI-processed (``evalai_answer``), "" for a question not
  answered. ``score`` scores an answer file against the official annotations (val):
  answers stripped of newlines and tabs; only when the humans disagree, humans' answers and
  the prediction are normalised (punctuation, number words to digits, articles dropped,
  contractions restored); a question's accuracy is the mean, over the 10 subsets that leave
  one human out, of min(1, matching answers in the subset / 3).
- ``vizwiz`` (``--split=test``): ``DATA/llava_test.jsonl``, images in ``DATA/test``. Writes
  the submission as ``convert_vizwiz_for_submission`` does: ``{image, answer}`` per question
  in the question file's order, the answer EvalAI-processed.
- ``textvqa`` (val): ``DATA/llava_textvqa_val_v051_ocr.jsonl``, images in
  ``DATA/train_images``, scored against ``DATA/TextVQA_0.5.1_val.json`` as LLaVA's
  ``eval_textvqa`` with the m4c evaluator does: an answer line is matched to its annotation
  by (``question_id`` = the image id, the question recovered from ``prompt``, lower case);
  the prediction and each of the 10 human answers are EvalAI-processed, and the score is the
  leave-one-human-out accuracy above (0 when no human gave the prediction).

The question is recovered from ``prompt`` as ``eval_textvqa`` does: after "OCR tokens: ",
the text between "Question: " and " Short answer:"; with "Reference OCR token: " in a
three-line prompt, the line that is not the OCR line among the first two; in a two-line
prompt the first line. Any other prompt is an error naming the answer line.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from typing import Any

from tokenpacker_jax.evaluation import files
from tokenpacker_jax.evaluation.benchmark import (
    Benchmark,
    Layout,
    accuracy_score,
    finish_with_accuracy,
)
from tokenpacker_jax.evaluation.question_file import reader
from tokenpacker_jax.evaluation.vqa_answers import evalai_answer, textvqa_accuracy, vqa_accuracy
from tokenpacker_jax.user_error import InputError


def score_vqav2(answers_path: str, annotations_path: str) -> dict[str, Any]:
    """VQAv2 accuracy of an answer file (see the module docstring).

    Returns ``accuracy`` and ``n`` (answered questions), ``unanswered``, and
    ``per_answer_type`` / ``per_question_type`` ({type: {accuracy, n}}).
    """
    annotations = files.read_annotations(annotations_path, ("answers",),
                                         list_key="annotations")
    for where, record in annotations.values():
        humans = record["answers"]
        if not isinstance(humans, list) or not humans or not all(
                isinstance(h, dict) and isinstance(h.get("answer"), str) for h in humans):
            raise InputError(f"{where}: answers must be a non-empty list of "
                             f'{{"answer": TEXT}}')
    pairs = files.read_answers(answers_path, annotations, annotations_path)
    scores, per_answer, per_question = [], collections.defaultdict(list), \
        collections.defaultdict(list)
    for answer, annotation in pairs:
        value = vqa_accuracy(evalai_answer(answer["text"]),
                             [h["answer"] for h in annotation["answers"]])
        scores.append(value)
        if "answer_type" in annotation:
            per_answer[annotation["answer_type"]].append(value)
        if "question_type" in annotation:
            per_question[annotation["question_type"]].append(value)
    return {**files.mean(scores), "unanswered": len(annotations) - len(pairs),
            "per_answer_type": files.grouped(per_answer),
            "per_question_type": files.grouped(per_question)}


def _submission(lines: Sequence[dict[str, Any]]) -> dict[Any, str]:
    """{question_id: EvalAI-processed answer} (a later line for a question wins)."""
    return {line["question_id"]: evalai_answer(line["text"]) for line in lines}


def _vqav2_finish(layout: Layout, lines: list[dict[str, Any]]) -> list[str]:
    test = files.require(f"{layout.data}/llava_vqav2_mscoco_test2015.jsonl",
                         "the whole test2015 question file, which the submission lists")
    answers = _submission(lines)
    upload = [{"question_id": record["question_id"],
               "answer": answers.get(record["question_id"], "")}
              for _, record in files.read_jsonl(test)]
    files.write_jsonl(layout.output("answers.jsonl"), lines)
    path = files.write_json(layout.output("submission.json"), upload)
    return [f"vqav2: {len(lines)} answers, {len(upload)} questions in the submission {path} "
            f"(EvalAI: test-dev phase)"]


def _vizwiz_finish(layout: Layout, lines: list[dict[str, Any]]) -> list[str]:
    questions = files.read_jsonl(f"{layout.data}/llava_{layout.split}.jsonl")
    answers = _submission(lines)
    upload = []
    for where, record in questions:
        if record["question_id"] not in answers:
            raise InputError(f"{where}: question {record['question_id']!r} has no answer")
        upload.append({"image": record["image"], "answer": answers[record["question_id"]]})
    files.write_jsonl(layout.output("answers.jsonl"), lines)
    path = files.write_json(layout.output("submission.json"), upload)
    return [f"vizwiz: {len(upload)} answers in the submission {path} (EvalAI)"]


_OCR_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def textvqa_question(prompt: str, where: str) -> str:
    """The question inside a TextVQA prompt, lower case (see the module docstring)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _OCR_QUESTION.search(prompt)
        if match is None:
            raise InputError(f"{where}: prompt starts with 'OCR tokens: ' but has no "
                             f"'Question: ... Short answer:'")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise InputError(f"{where}: cannot find the question in prompt {prompt!r} (expected "
                         f"a question line, an optional OCR-token line and the suffix)")
    return question.lower()


def score_textvqa(answers_path: str, annotations_path: str) -> dict[str, Any]:
    """TextVQA accuracy of an answer file (see the module docstring): ``accuracy``, ``n``
    and ``unanswered``."""
    data = files.read_json(annotations_path, "TextVQA_0.5.1_val.json")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise InputError(f'{annotations_path}: expected {{"data": [...]}}')
    annotations = {}
    for i, record in enumerate(data["data"]):
        where = f"{annotations_path}: data[{i}]"
        files.check_fields(where, record, ("image_id", "question", "answers"))
        if not isinstance(record["answers"], list) or len(record["answers"]) != 10:
            raise InputError(f"{where}: answers must be the 10 human answers")
        annotations[(record["image_id"], record["question"].lower())] = record
    scores = []
    for where, line in files.read_answer_lines(answers_path, ("question_id", "prompt", "text")):
        key = (line["question_id"], textvqa_question(line["prompt"], where))
        if key not in annotations:
            raise InputError(f"{where}: no question {key[1]!r} about image {key[0]!r} in "
                             f"{annotations_path}")
        scores.append(textvqa_accuracy(line["text"], annotations[key]["answers"]))
    return {**files.mean(scores), "unanswered": len(annotations) - len(scores)}


def _textvqa_finish(layout: Layout, lines: list[dict[str, Any]]) -> list[str]:
    annotations = files.require(f"{layout.data}/TextVQA_0.5.1_val.json",
                                "the TextVQA val annotations")
    return finish_with_accuracy(layout, lines, "textvqa", score_textvqa, annotations)


VQAV2 = Benchmark("vqav2", reader("llava_vqav2_mscoco_{split}.jsonl", "test2015",
                                  "the LLaVA VQAv2 question file"),
                  _vqav2_finish, max_new_tokens=128, split="test-dev2015",
                  score=accuracy_score("vqav2", score_vqav2))
VIZWIZ = Benchmark("vizwiz", reader("llava_{split}.jsonl", "{split}",
                                    "the LLaVA VizWiz question file"),
                   _vizwiz_finish, max_new_tokens=128, split="test")
TEXTVQA = Benchmark("textvqa", reader("llava_textvqa_val_v051_ocr.jsonl", "train_images",
                                      "the LLaVA TextVQA question file (with OCR tokens)"),
                    _textvqa_finish, max_new_tokens=128, split="val",
                    score=accuracy_score("textvqa", score_textvqa))
