"""Answers a LLaVA question file with a trained run and scores it.

    python -m tokenpacker_jax.evaluate --checkpoint=WORKDIR --questions=FILE.jsonl \
        --image_folder=DIR --answers=OUT.jsonl [--suffix=short|choice|none] \
        [--benchmark=vqav2|gqa|pope --annotations=FILE]
    python -m tokenpacker_jax.evaluate score --benchmark=vqav2|gqa|pope \
        --answers=ANSWERS.jsonl --annotations=FILE

Question file (jsonl): ``question_id``, ``image`` (relative to ``--image_folder``), ``text``,
and optionally ``answer`` (then answers are scored by exact match, per ``category`` too).
Answer file (jsonl), as the reference's ``model_vqa_loader`` writes it: ``question_id``,
``prompt``, ``text``, ``answer_id``, ``model_id``, ``metadata``.

``--benchmark`` scores the answer file against local annotation files as the reference's
evaluation does (VQAv2 accuracy, GQA accuracy, POPE accuracy / precision / recall / F1 /
yes ratio; see ``tokenpacker_jax/benchmarks.py``); ``score`` does only that, for an answer
file written earlier (by this module or by the reference).
"""

from __future__ import annotations

import collections
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from tokenpacker_jax.benchmarks import BENCHMARKS, format_scores, score_benchmark

__all__ = ["BENCHMARKS", "SUFFIXES", "answer_questions", "format_scores", "normalise",
           "read_questions", "score", "score_benchmark"]

# The reference's evaluation suffixes (LLaVA-1.5 scripts), appended after a newline.
SUFFIXES = {
    "none": "",
    "short": "Answer the question using a single word or phrase.",
    "choice": "Answer with the option's letter from the given choices directly.",
}


def read_questions(path: str) -> list[dict[str, Any]]:
    """The question records; a malformed line is an error naming the file and line."""
    questions = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
            missing = [k for k in ("question_id", "text") if k not in record]
            if missing:
                raise ValueError(f"{path}:{number}: missing fields {missing}")
            questions.append(record)
    return questions


def normalise(text: str) -> str:
    """Exact-match normalisation: case, surrounding space and a final full stop."""
    return text.strip().lower().rstrip(".").strip()


def score(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Exact-match accuracy overall and per category over records with an ``answer``."""
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


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def answer_questions(trained, questions: Sequence[dict[str, Any]], image_folder: str, *,
                     suffix: str = "none", batch_size: int = 16, max_new_tokens: int = 16,
                     model_id: str = "tokenpacker-jax") -> list[dict[str, Any]]:
    """Answer records for ``questions`` (greedy), with the reference's fields plus the
    ground-truth ``answer`` and ``category`` when the question has them."""
    from tokenpacker_jax.data.image import load_image  # noqa: PLC0415
    from tokenpacker_jax.data.pipeline import example_builder  # noqa: PLC0415
    from tokenpacker_jax.generate import Generator, SamplingConfig, answer  # noqa: PLC0415

    if suffix not in SUFFIXES:
        raise ValueError(f"--suffix must be one of {sorted(SUFFIXES)}, got {suffix!r}")
    builder = example_builder(trained.config.data, trained.tokenizer, trained.tokens_per_tile)
    generator = Generator(trained.model, trained.params, trained.tokenizer.stop_ids,
                          trained.tokenizer.pad_id, SamplingConfig(max_new_tokens=max_new_tokens))
    records = []
    for batch in _batches(list(questions), batch_size):
        prompts = []
        for question in batch:
            text = question["text"] + ("\n" + SUFFIXES[suffix] if SUFFIXES[suffix] else "")
            image = (load_image(os.path.join(image_folder, question["image"]))
                     if question.get("image") else None)
            prompts.append((text, image))
        # Pad the last batch so every batch has one shape (one compile).
        padded = list(prompts) + [prompts[-1]] * (batch_size - len(prompts))
        answers = answer(generator, builder, trained.tokenizer, padded)[:len(prompts)]
        for question, (prompt, _), result in zip(batch, prompts, answers):
            record = {"question_id": question["question_id"], "prompt": prompt,
                      "text": result["text"], "answer_id": uuid.uuid4().hex,
                      "model_id": model_id, "metadata": {}}
            for key in ("answer", "category"):
                if key in question:
                    record[key] = question[key]
            records.append(record)
    return records


def _score_file(benchmark: str, answers: str, annotations: str) -> None:
    for line in format_scores(benchmark, score_benchmark(benchmark, answers, annotations)):
        print(line)


def main(argv):
    from absl import app, flags  # noqa: PLC0415

    f = flags.FLAGS
    command = argv[1:]
    if command not in ([], ["score"]):
        raise app.UsageError(f"unknown command {' '.join(command)!r} (the only command is "
                             f"'score'; without one, questions are answered)")
    if (f.benchmark is None) != (not f.annotations):
        raise app.UsageError("--benchmark and --annotations go together")
    if command == ["score"]:
        if not (f.benchmark and f.answers):
            raise app.UsageError("score needs --benchmark, --answers and --annotations")
        _score_file(f.benchmark, f.answers, f.annotations)
        return
    if not (f.checkpoint and f.questions):
        raise app.UsageError("--checkpoint and --questions are required to answer questions "
                             "(or use the 'score' command)")
    if f.benchmark and not f.answers:
        raise app.UsageError("--benchmark scores the answer file: give --answers")

    from tokenpacker_jax.loading import load_trained  # noqa: PLC0415

    trained = load_trained(f.checkpoint)
    questions = read_questions(f.questions)
    if f.limit:
        questions = questions[:f.limit]
    image_folder = f.image_folder or os.path.dirname(os.path.abspath(f.questions))
    records = answer_questions(trained, questions, image_folder, suffix=f.suffix,
                               batch_size=f.batch_size, max_new_tokens=f.max_new_tokens,
                               model_id=os.path.basename(os.path.normpath(f.checkpoint)))
    if f.answers:
        with open(f.answers, "w", encoding="utf-8") as file:
            for record in records:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
    scores = score(records)
    for category, result in scores.items():
        if category != "all":
            print(f"  {category}: {result['accuracy']:.3f} (n={result['n']})")
    if "all" in scores:
        print(f"held-out accuracy: {scores['all']['accuracy']:.3f} (n={scores['all']['n']})")
    if f.benchmark:
        _score_file(f.benchmark, f.answers, f.annotations)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("checkpoint", None, "Training run directory (its newest checkpoint).")
    flags.DEFINE_string("questions", None, "Question file (jsonl).")
    flags.DEFINE_string("image_folder", "", "Images are relative to this (default: the "
                                            "question file's folder).")
    flags.DEFINE_string("answers", "", "Where to write the answer file (jsonl); with "
                                       "'score', the answer file to score.")
    flags.DEFINE_enum("suffix", "none", list(SUFFIXES), "Prompt suffix of the reference.")
    flags.DEFINE_integer("batch_size", 16, "Questions per generation batch.")
    flags.DEFINE_integer("max_new_tokens", 16, "Answer length limit.")
    flags.DEFINE_integer("limit", 0, "Answer only the first N questions (0: all).")
    flags.DEFINE_enum("benchmark", None, list(BENCHMARKS),
                      "Score the answer file as this benchmark's evaluation does.")
    flags.DEFINE_string("annotations", "", "The benchmark's annotation file: VQAv2 "
                                           "annotations, GQA questions, POPE labels.")
    app.run(main)
