"""The benchmarks of the reference's evaluation, by name, and running one end to end.

``run`` reads a benchmark's questions from its published files, answers them (sharded and
resumable, ``runner.answer_all``) and, on host 0, writes the reference's answer file and the
score or submission file (``Benchmark.finish``). ``score`` scores an answer file written
earlier, by this package or the reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from tokenpacker_jax.evaluation import (
    docvqa,
    gqa,
    mmbench,
    mme,
    mmmu,
    mmvet,
    ocrbench,
    pope,
    scienceqa,
    vqa,
)
from tokenpacker_jax.evaluation.benchmark import Benchmark, Layout
from tokenpacker_jax.user_error import InputError

if TYPE_CHECKING:
    from tokenpacker_jax.evaluation.runner import Answerer

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    vqa.VQAV2, gqa.GQA, vqa.VIZWIZ, vqa.TEXTVQA, pope.POPE, mme.MME, mmbench.MMBENCH,
    mmvet.MMVET, mmmu.MMMU, ocrbench.OCRBENCH, docvqa.DOCVQA, scienceqa.SCIENCEQA)}
SCORED = tuple(name for name, b in BENCHMARKS.items() if b.score is not None)


def benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise InputError(f"--benchmark must be one of {list(BENCHMARKS)}, got {name!r}")
    return BENCHMARKS[name]


def run(name: str, layout: Layout, make_answerer: Callable[[], Answerer], *, limit: int = 0,
        process_index: int | None = None, process_count: int | None = None,
        log: Callable[[str], None] = print) -> list[str] | None:
    """Answers benchmark ``name`` (``layout.split`` empty: its default split) and writes its
    files under ``layout.out``; returns the printed summary on host 0, ``None`` elsewhere.
    ``limit`` answers only the first questions (a smoke run)."""
    from tokenpacker_jax.evaluation.runner import answer_all  # noqa: PLC0415 (jax: not to score)

    bench = benchmark(name)
    if not layout.split and bench.split:
        layout = dataclasses.replace(layout, split=bench.split)
    questions = bench.questions(layout)
    if limit:
        questions = questions[:limit]
    log(f"{name}: {len(questions)} questions from {layout.data}")
    lines = answer_all(make_answerer, questions, bench.answer_line, layout.out,
                       model_id=layout.model_id, process_index=process_index,
                       process_count=process_count, log=log)
    if lines is None:
        return None
    summary = bench.finish(layout, lines)
    for line in summary:
        log(line)
    return summary


def score(name: str, answers: str, annotations: str | None = None,
          questions: str | None = None) -> list[str]:
    """The printable score of an answer file (the last line the headline)."""
    bench = benchmark(name)
    if bench.score is None:
        raise InputError(f"{name} is scored by its server: 'run' writes the submission file")
    return bench.score(answers, annotations, questions)
