"""GQA (testdev-balanced): accuracy as the official ``eval.py`` computes it.

Questions: ``DATA/llava_gqa_testdev_balanced.jsonl`` (a LLaVA question file whose ``text``
ends in "Answer the question using a single word or phrase."), images in ``DATA/data/images``;
answer lines as ``model_vqa_loader`` writes them (up to 128 new tokens).

The prediction is ``text.rstrip('.').lower()`` (LLaVA's ``convert_gqa_for_eval``, which
writes ``{questionId, prediction}`` per answer to ``testdev_balanced_predictions.json``),
compared exactly with the gold answer of the official ``DATA/data/testdev_balanced_questions.json``
(``{question_id: {"answer", "isBalanced", "types": {"structural", "semantic"}}}``; a jsonl
with ``question_id`` and ``answer`` also works) over the balanced questions; "binary" /
"open" (structural type ``query``) and per-type accuracies beside it.
"""

from __future__ import annotations

import collections
from typing import Any

from tokenpacker_jax.evaluation import files
from tokenpacker_jax.evaluation.benchmark import (
    Benchmark,
    Layout,
    accuracy_score,
    finish_with_accuracy,
)
from tokenpacker_jax.evaluation.question_file import reader
from tokenpacker_jax.user_error import InputError


def gqa_prediction(text: str) -> str:
    """LLaVA's ``convert_gqa_for_eval``: trailing full stops removed, lower case."""
    return text.rstrip(".").lower()


def score_gqa(answers_path: str, annotations_path: str) -> dict[str, Any]:
    """GQA accuracy of an answer file over the balanced questions (all questions when the
    annotations do not say ``isBalanced``).

    Returns ``accuracy``, ``n``, ``unanswered`` (balanced questions without an answer),
    ``per_answer_type`` ({binary, open}), ``per_structural_type``, ``per_semantic_type``.
    """
    annotations = files.read_annotations(annotations_path, ("answer",))
    for where, record in annotations.values():
        if not isinstance(record["answer"], str):
            raise InputError(f"{where}: answer must be a string")
    balanced = {key for key, (_, r) in annotations.items() if r.get("isBalanced", True)}
    pairs = files.read_answers(answers_path, annotations, annotations_path)
    scores, kinds = [], collections.defaultdict(list)
    structural, semantic = collections.defaultdict(list), collections.defaultdict(list)
    answered = set()
    for answer, annotation in pairs:
        key = str(annotation["question_id"])
        if key not in balanced:
            continue
        answered.add(key)
        value = float(gqa_prediction(answer["text"]) == annotation["answer"])
        scores.append(value)
        types = annotation.get("types") or {}
        if "structural" in types:
            kinds["open" if types["structural"] == "query" else "binary"].append(value)
            structural[types["structural"]].append(value)
        if "semantic" in types:
            semantic[types["semantic"]].append(value)
    return {**files.mean(scores), "unanswered": len(balanced - answered),
            "per_answer_type": files.grouped(kinds),
            "per_structural_type": files.grouped(structural),
            "per_semantic_type": files.grouped(semantic)}


def _finish(layout: Layout, lines: list[dict[str, Any]]) -> list[str]:
    files.write_json(layout.output(f"{layout.split}_predictions.json"),
                     [{"questionId": line["question_id"],
                       "prediction": gqa_prediction(line["text"])} for line in lines])
    annotations = files.require(f"{layout.data}/data/{layout.split}_questions.json",
                                "the official GQA questions with their answers")
    return finish_with_accuracy(layout, lines, "gqa", score_gqa, annotations)


GQA = Benchmark("gqa", reader("llava_gqa_{split}.jsonl", "data/images",
                              "the LLaVA GQA question file"),
                _finish, max_new_tokens=128, split="testdev_balanced",
                score=accuracy_score("gqa", score_gqa))
