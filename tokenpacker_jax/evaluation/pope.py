"""POPE (COCO; adversarial, popular and random): LLaVA's ``eval_pope``.

Questions: ``DATA/llava_pope_test.jsonl`` (a LLaVA question file: ``text`` ends in "Answer
the question using a single word or phrase.", ``category`` names the split), images in
``DATA/val2014`` (the file named in ``image``, or, as TokenPacker's loader opens it, the part
of the name after its last '_'). Labels: ``DATA/coco/coco_pope_{category}.json`` (JSON lines
with ``label`` yes|no), one file per category. Answer lines are ``model_vqa_loader``'s (up to
128 new tokens).

An answer is parsed as ``eval_pope`` does: its first sentence (up to the first '.'), commas
removed, split on spaces; the words "No", "not" or "no" make it a no, anything else a yes.
Per category, the answers of that category (in the answer file's order) are paired with the
category's labels in the label file's order, as the reference pairs them; accuracy,
precision, recall, F1 (yes is the positive class) and the yes ratio. The headline is the
mean over the categories (the paper's POPE figure is the F1 so averaged).

``score`` takes either that label directory (with ``--questions``, for the categories) or a
jsonl of labels keyed by ``question_id`` (``question_id``, ``label``, optional
``category``), which pairs answers and labels by id instead.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from typing import Any

from tokenpacker_jax.evaluation import files
from tokenpacker_jax.evaluation.benchmark import Benchmark, Layout, finish_with_score, image_file
from tokenpacker_jax.evaluation.question_file import reader
from tokenpacker_jax.user_error import InputError

LABEL_PREFIX, LABEL_SUFFIX = "coco_pope_", ".json"


def pope_says_yes(text: str) -> bool:
    """LLaVA's ``eval_pope`` parsing (see the module docstring)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return not ({"No", "not", "no"} & set(words))


def pope_metrics(predictions: Sequence[bool], labels: Sequence[bool]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 (yes = positive), yes ratio and the confusion counts
    of yes/no ``predictions`` against ``labels``. A ratio with a zero denominator is 0."""
    tp = sum(p and t for p, t in zip(predictions, labels, strict=True))
    fp = sum(p and not t for p, t in zip(predictions, labels, strict=True))
    tn = sum(not p and not t for p, t in zip(predictions, labels, strict=True))
    fn = sum(not p and t for p, t in zip(predictions, labels, strict=True))
    n = len(predictions)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": (tp + fp) / n if n else 0.0, "n": n,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def score_pope(answers_path: str, annotations_path: str) -> dict[str, Any]:
    """POPE scores of an answer file against labels keyed by ``question_id`` (see
    ``pope_metrics``), overall and ``per_category``, with ``unanswered``."""
    annotations = files.read_annotations(annotations_path, ("label",))
    for where, record in annotations.values():
        if record["label"] not in ("yes", "no"):
            raise InputError(f"{where}: label must be 'yes' or 'no', got {record['label']!r}")
    pairs = files.read_answers(answers_path, annotations, annotations_path)
    by_category = collections.defaultdict(lambda: ([], []))
    predictions, labels = [], []
    for answer, annotation in pairs:
        said_yes, is_yes = pope_says_yes(answer["text"]), annotation["label"] == "yes"
        predictions.append(said_yes)
        labels.append(is_yes)
        if "category" in annotation:
            by_category[annotation["category"]][0].append(said_yes)
            by_category[annotation["category"]][1].append(is_yes)
    return {**pope_metrics(predictions, labels), "unanswered": len(annotations) - len(pairs),
            "per_category": {name: pope_metrics(*values)
                             for name, values in sorted(by_category.items())}}


def _read_labels(path: str) -> list[bool]:
    labels = []
    for where, record in files.read_jsonl(path):
        files.check_fields(where, record, ("label",))
        if record["label"] not in ("yes", "no"):
            raise InputError(f"{where}: label must be 'yes' or 'no', got {record['label']!r}")
        labels.append(record["label"] == "yes")
    return labels


def score_pope_by_category(answers_path: str, label_dir: str,
                           questions_path: str) -> dict[str, Any]:
    """POPE scores as ``eval_pope`` computes them (see the module docstring):
    ``per_category`` metrics and their ``mean``."""
    categories = {}
    for where, record in files.read_jsonl(questions_path):
        files.check_fields(where, record, ("question_id", "category"))
        categories[json_key(record["question_id"])] = record["category"]
    answers = collections.defaultdict(list)
    for where, line in files.read_answer_lines(answers_path):
        key = json_key(line["question_id"])
        if key not in categories:
            raise InputError(f"{where}: question_id {line['question_id']!r} is not in "
                             f"{questions_path}")
        answers[categories[key]].append(pope_says_yes(line["text"]))
    names = sorted(name for name in os.listdir(files.require(label_dir, "POPE's label files"))
                   if name.startswith(LABEL_PREFIX) and name.endswith(LABEL_SUFFIX))
    if not names:
        raise files.LayoutError(f"{label_dir}: no {LABEL_PREFIX}CATEGORY{LABEL_SUFFIX} files")
    per_category = {}
    for name in names:
        category = name[len(LABEL_PREFIX):-len(LABEL_SUFFIX)]
        labels = _read_labels(os.path.join(label_dir, name))
        predictions = answers.get(category, [])
        if len(predictions) > len(labels):
            raise InputError(f"{answers_path}: {len(predictions)} answers in category "
                             f"{category!r} but {len(labels)} labels in {name}")
        per_category[category] = pope_metrics(predictions, labels[:len(predictions)])
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    mean = {key: sum(m[key] for m in per_category.values()) / len(per_category)
            for key in keys}
    return {"per_category": per_category, "mean": mean}


def json_key(value: Any) -> str:
    """A question id as a dictionary key that keeps 1 and "1" apart."""
    return f"{type(value).__name__}:{value}"


def pope_line(prefix: str, m: dict[str, Any]) -> str:
    line = (f"{prefix}accuracy: {100 * m['accuracy']:.2f} f1: {100 * m['f1']:.2f} "
            f"precision: {100 * m['precision']:.2f} recall: {100 * m['recall']:.2f} "
            f"yes: {100 * m['yes_ratio']:.2f}")
    return line + (f" (n={m['n']})" if "n" in m else "")


def score_lines(result: dict[str, Any]) -> list[str]:
    """Per category, then the headline (overall, or the mean over categories)."""
    lines = [pope_line(f"  {name}: ", m) for name, m in result["per_category"].items()]
    if result.get("unanswered"):
        lines.append(f"  ({result['unanswered']} annotated questions have no answer; scores "
                     f"are over the answered ones)")
    if "mean" in result:
        return lines + [pope_line(f"pope (mean of {len(result['per_category'])} "
                                  f"categories) ", result["mean"])]
    return lines + [pope_line("pope ", result)]


def _score(answers: str, annotations: str, questions: str | None = None) -> list[str]:
    if os.path.isdir(annotations):
        if not questions:
            raise InputError("POPE's label directory pairs answers with labels per category: "
                             "give --questions=llava_pope_test.jsonl too")
        return score_lines(score_pope_by_category(answers, annotations, questions))
    return score_lines(score_pope(answers, annotations))


def _coco_image(name: str, folder: str, where: str) -> str:
    """``folder/name``, else ``folder/`` + the part after the last '_' (2017-style names)."""
    for candidate in (name, name.split("_")[-1]):
        if os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    return image_file(folder, name, where)


def _finish(layout: Layout, lines: list[dict[str, Any]]) -> list[str]:
    return finish_with_score(
        layout, lines, lambda path: score_pope_by_category(
            path, f"{layout.data}/coco", f"{layout.data}/llava_pope_test.jsonl"), score_lines)


POPE = Benchmark("pope", reader("llava_pope_test.jsonl", "val2014",
                                "the LLaVA POPE question file", image_name=_coco_image),
                 _finish, max_new_tokens=128, split="test", score=_score)
