"""LLaVA question files, and answering one in memory with exact-match scoring.

A LLaVA question file is JSON lines: ``question_id``, ``image`` (relative to an image
folder; absent for a text-only question), ``text`` (the question as the model is asked it,
suffixes included), optionally ``category`` and, for the synthetic held-out questions,
``answer``. The reference's ``model_vqa_loader`` / ``model_vqa`` put ``<image>`` and a newline
in front of ``text`` and nothing else; VQAv2, GQA, VizWiz, TextVQA, POPE, MME and MM-Vet
publish their questions in this form (see the benchmark modules).

``answer_questions`` answers such records with a trained run (greedy) and returns answer
lines in the reference's format with ``answer`` / ``category`` copied over; ``exact_match``
scores them (``python -m tokenpacker_jax.evaluate`` without a command, the main job).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Sequence
from typing import Any

from tokenpacker_jax.evaluation import files
from tokenpacker_jax.evaluation.benchmark import (
    LETTER_ANSWER,
    SHORT_ANSWER,
    Layout,
    Question,
    image_file,
    llava_answer_line,
)
from tokenpacker_jax.user_error import InputError

# The reference's evaluation suffixes (LLaVA-1.5), appended after a newline.
SUFFIXES = {
    "none": "",
    "short": SHORT_ANSWER,
    "choice": LETTER_ANSWER,
}


def read_questions(path: str) -> list[dict[str, Any]]:
    """The records of a question file; each needs ``question_id`` and ``text``."""
    records = files.read_jsonl(path)
    for where, record in records:
        files.check_fields(where, record, ("question_id", "text"))
    return [record for _, record in records]


def llava_questions(path: str, image_folder: str, *, suffix: str = "",
                    image_name: Callable[[str, str, str], str] | None = None
                    ) -> list[Question]:
    """``Question``s of a question file: the message is ``text`` (+ newline + ``suffix``),
    the image ``image_folder/image`` (``image_name(image, image_folder, where)`` resolves it
    where the name needs more; a missing file is an error naming the question's line)."""
    image_name = image_name or (lambda name, folder, where: image_file(folder, name, where))
    questions = []
    for index, (where, record) in enumerate(files.read_jsonl(path)):
        files.check_fields(where, record, ("question_id", "text"))
        if not isinstance(record["text"], str):
            raise InputError(f"{where}: text must be a string")
        image = record.get("image")
        text = record["text"] + (f"\n{suffix}" if suffix else "")
        questions.append(Question(
            index, record["question_id"], text,
            image_name(image, image_folder, where) if image else None, where,
            {"prompt": text, "record": record}))
    return questions


def reader(name: str, images: str, what: str,
           image_name: Callable[[str, str, str], str] | None = None
           ) -> Callable[[Layout], list[Question]]:
    """``Benchmark.questions`` for a benchmark published as a LLaVA question file:
    ``DATA/name`` with its images under ``DATA/images`` (``{split}`` filled in in both)."""
    def questions(layout: Layout) -> list[Question]:
        path = files.require(os.path.join(layout.data, name.format(split=layout.split)), what)
        return llava_questions(path, layout.images(images.format(split=layout.split)),
                               image_name=image_name)

    return questions


def answer_questions(trained: Any, questions: Sequence[dict[str, Any]], image_folder: str, *,
                     suffix: str = "none", batch_size: int = 16, max_new_tokens: int = 16,
                     model_id: str = "tokenpacker-jax") -> list[dict[str, Any]]:
    """Answer lines for question records (greedy), with the reference's fields plus the
    ground-truth ``answer`` and ``category`` when the question has them."""
    from tokenpacker_jax.evaluation.runner import Answerer  # noqa: PLC0415 (jax)

    if suffix not in SUFFIXES:
        raise InputError(f"--suffix must be one of {sorted(SUFFIXES)}, got {suffix!r}")
    answerer = Answerer(trained, batch_size=batch_size, max_new_tokens=max_new_tokens)
    lines = []
    for start in range(0, len(questions), batch_size):
        batch = []
        for offset, record in enumerate(questions[start:start + batch_size]):
            text = record["text"] + (f"\n{SUFFIXES[suffix]}" if SUFFIXES[suffix] else "")
            image = (os.path.join(image_folder, record["image"]) if record.get("image")
                     else None)
            batch.append(Question(start + offset, record["question_id"], text, image,
                                  f"question {record['question_id']!r}"))
        texts = answerer.generate(answerer.prompts([(q.text, q.load_image()) for q in batch]))
        for question, record, text in zip(batch, questions[start:], texts, strict=False):
            line = llava_answer_line(question, text, model_id)
            line.update({key: record[key] for key in ("answer", "category") if key in record})
            lines.append(line)
    return lines


def normalise(text: str) -> str:
    """Exact-match normalisation: case, surrounding space and a final full stop."""
    return text.strip().lower().rstrip(".").strip()


def exact_match(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Exact-match accuracy overall (``all``) and per category over records with an
    ``answer``."""
    per_category = collections.defaultdict(lambda: [0, 0])
    for record in records:
        if "answer" not in record:
            continue
        hit = normalise(record["text"]) == normalise(record["answer"])
        for key in {"all", record.get("category", "all")}:
            per_category[key][0] += hit
            per_category[key][1] += 1
    return {key: {"accuracy": hits / max(total, 1), "n": total}
            for key, (hits, total) in sorted(per_category.items())}


def exact_match_lines(scores: dict[str, Any]) -> list[str]:
    """``exact_match``'s result as printed: a line per category, then ``held-out accuracy:
    X (n=N)``."""
    lines = [f"  {category}: {result['accuracy']:.3f} (n={result['n']})"
             for category, result in scores.items() if category != "all"]
    if "all" in scores:
        lines.append(f"held-out accuracy: {scores['all']['accuracy']:.3f} "
                     f"(n={scores['all']['n']})")
    return lines
