"""What a benchmark is to the evaluation job.

A ``Benchmark`` reads its questions from the files it publishes (``questions``), names the
answer line the reference's script writes for one question (``answer_line``), and, once
every question is answered, writes the reference's answer file and its score or submission
file (``finish``). A ``Question`` holds the user's message as the reference's script builds
it (the image, when there is one, goes in front as ``<image>`` + newline, the conversation
template wraps it), where the question came from, and what its answer line carries.

Besides, what several benchmarks share: the reference's instructions, scoring on
finishing (``finish_with_score``; ``finish_with_accuracy`` for an accuracy against
annotations) and printing an accuracy (``accuracy_lines``).
"""

from __future__ import annotations

import dataclasses
import io
import os
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image

from tokenpacker_jax.data.conversation import IMAGE_PLACEHOLDER
from tokenpacker_jax.data.image import ImageError, load_image
from tokenpacker_jax.evaluation import files

# The reference's instructions (LLaVA-1.5), each after a newline at the end of a question.
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass(frozen=True)
class Question:
    """One question as the model is asked it.

    ``index`` is the position in the benchmark's question order: answers are merged in it
    and a resumed run knows its questions by it (``question_id`` is not a key everywhere:
    MME asks two questions per image under the image's name).
    """

    index: int
    question_id: Any
    text: str  # the user's message, after the image (suffixes, options, hints included)
    image: str | bytes | None  # an image file, an encoded image, or none
    where: str  # the file and line (or record) the question came from
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    ask: bool = True  # False: the reference answers it without the model (``text`` None)

    @property
    def message(self) -> str:
        """The user's turn as the template receives it."""
        return f"{IMAGE_PLACEHOLDER}\n{self.text}" if self.image is not None else self.text

    def load_image(self) -> Image.Image | None:
        """The decoded image (a file error names the file, a bad encoded image the
        question's record)."""
        if self.image is None:
            return None
        if isinstance(self.image, str):
            return load_image(self.image)
        try:
            with Image.open(io.BytesIO(self.image)) as image:
                image.load()
                return image.copy()
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError(f"{self.where}: cannot decode the image ({err})") from err


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a run reads and writes: the benchmark's directory as published (``data``),
    its split, the image folder (``None``: the published place), the output directory, the
    model's name in answer lines, and the one benchmark option of the reference's scripts
    (``all_rounds``)."""

    data: str
    split: str = ""
    image_folder: str | None = None
    out: str = "."
    model_id: str = "tokenpacker-jax"
    all_rounds: bool = False  # MMBench: each question once per rotation of its options

    def images(self, default: str) -> str:
        return self.image_folder or os.path.join(self.data, default)

    def output(self, name: str) -> str:
        return os.path.join(self.out, name)


def image_file(folder: str, name: str, where: str) -> str:
    """``folder/name``; a missing file is an error naming the question's record."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: image {path} not found")
    return path


def finish_with_score(layout: Layout, lines: list[dict[str, Any]],
                      score: Callable[[str], dict[str, Any]],
                      summary: Callable[[dict[str, Any]], list[str]]) -> list[str]:
    """Writes ``answers.jsonl``, scores it (``score(path)``), writes ``scores.json``;
    returns the summary lines."""
    answers = files.write_jsonl(layout.output("answers.jsonl"), lines)
    result = score(answers)
    files.write_json(layout.output("scores.json"), result, indent=2)
    return summary(result)


def accuracy_lines(name: str, result: dict[str, Any]) -> list[str]:
    """Printable lines of an accuracy result with ``per_*`` groups, in percent; the last
    is the headline ``{name} accuracy: X (n=N)``."""
    lines = []
    for key, groups in result.items():
        if key.startswith("per_"):
            lines += [f"  {key.removeprefix('per_')} {group}: {100 * m['accuracy']:.2f} "
                      f"(n={m['n']})" for group, m in groups.items()]
    if result.get("unanswered"):
        lines.append(f"  ({result['unanswered']} annotated questions have no answer; scores "
                     f"are over the answered ones)")
    return lines + [f"{name} accuracy: {100 * result['accuracy']:.2f} (n={result['n']})"]


def accuracy_score(name: str, scorer):
    """``Benchmark.score`` printing ``scorer(answers, annotations)`` with
    ``accuracy_lines``."""
    def score(answers: str, annotations: str, questions: str | None = None) -> list[str]:
        return accuracy_lines(name, scorer(answers, annotations))

    return score


def finish_with_accuracy(layout: Layout, lines: list[dict[str, Any]], name: str,
                         scorer: Callable[[str, str], dict[str, Any]],
                         annotations: str) -> list[str]:
    """``finish_with_score`` with ``scorer(answers, annotations)``, printed by
    ``accuracy_lines`` (what ``accuracy_score`` prints for the score command)."""
    return finish_with_score(layout, lines, lambda answers: scorer(answers, annotations),
                             lambda result: accuracy_lines(name, result))


def llava_answer_line(question: Question, text: str, model_id: str) -> dict[str, Any]:
    """The answer line of the reference's ``model_vqa*`` scripts; ``prompt`` is the
    question's text without the image (``extra['prompt']`` where the script records
    something else)."""
    return {"question_id": question.question_id,
            "prompt": question.extra.get("prompt", question.text), "text": text,
            "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One benchmark of the suite (see the module docstring).

    ``finish(layout, lines)`` gets every answer line in question order, writes the
    benchmark's files under ``layout.out`` and returns the lines to print (the last one the
    headline). ``score(answers, annotations, questions)`` scores an answer file written
    earlier (by this package or the reference), ``None`` where only a server scores.
    """

    name: str
    questions: Callable[[Layout], list[Question]]
    finish: Callable[[Layout, list[dict[str, Any]]], list[str]]
    max_new_tokens: int  # the reference's limit for this benchmark
    split: str = ""
    answer_line: Callable[[Question, str, str], dict[str, Any]] = llava_answer_line
    score: Callable[..., list[str]] | None = None
