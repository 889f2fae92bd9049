"""Answers and scores the reference's evaluation benchmarks, or a LLaVA question file.

    python -m tokenpacker_jax.evaluate run --benchmark=NAME --checkpoint=WORKDIR --data=DIR \
        [--out=DIR] [--split=S] [--image_folder=DIR] [--batch_size=8] [--limit=N]
    python -m tokenpacker_jax.evaluate score --benchmark=NAME --answers=FILE \
        [--annotations=FILE|DIR] [--questions=FILE]
    python -m tokenpacker_jax.evaluate --checkpoint=WORKDIR --questions=FILE.jsonl \
        --image_folder=DIR --answers=OUT.jsonl [--suffix=short|choice|none] \
        [--benchmark=vqav2|gqa|pope --annotations=FILE]

``run`` reads benchmark NAME's files as published under ``--data`` (the layout of the
reference's evaluation docs; each benchmark module in ``tokenpacker_jax/evaluation`` says
which files), answers every question greedily on this host's devices (hosts of a multi-host
job take disjoint shares), and writes under ``--out`` (default ``WORKDIR/eval/NAME``) the
reference's answer file and the score or the submission file. A killed run resumes where
it stopped. ``score`` scores an answer file written earlier, by this command or by the
reference's PyTorch scripts.

Without a command, a LLaVA question file (jsonl: ``question_id``, ``image``, ``text``, and
optionally ``answer``) is answered: ``--answers`` gets the reference's answer lines, and
questions with ``answer`` are scored by exact match (per ``category`` too); ``--benchmark``
with ``--annotations`` scores the answer file as that benchmark's ``score`` does.
"""

from __future__ import annotations

import os

from absl import app, flags

from tokenpacker_jax import user_error
from tokenpacker_jax.evaluation import files, question_file, suite
from tokenpacker_jax.evaluation.benchmark import Layout


def _print_score(benchmark: str, answers: str, annotations: str | None,
                 questions: str | None = None) -> None:
    for line in suite.score(benchmark, answers, annotations, questions):
        print(line)


def run_command(f) -> None:
    """``run`` with parsed flags ``f`` (see the module docstring)."""
    from tokenpacker_jax.assembly import load_trained  # noqa: PLC0415 (jax: scoring needs none)
    from tokenpacker_jax.evaluation.runner import Answerer, local_mesh  # noqa: PLC0415 (jax)

    bench = suite.benchmark(f.benchmark)
    split = f.split or bench.split
    name = bench.name if split == bench.split else f"{bench.name}-{split}"
    layout = Layout(data=f.data, split=split, image_folder=f.image_folder or None,
                    out=f.out or os.path.join(f.checkpoint, "eval", name),
                    model_id=os.path.basename(os.path.normpath(f.checkpoint)),
                    all_rounds=f.all_rounds)

    def make_answerer() -> Answerer:
        mesh = local_mesh()
        return Answerer(load_trained(f.checkpoint, mesh=mesh), mesh=mesh,
                        batch_size=f.batch_size,
                        max_new_tokens=f.max_new_tokens or bench.max_new_tokens,
                        bucket=f.bucket)

    suite.run(bench.name, layout, make_answerer, limit=f.limit)


def _answer_question_file(f) -> None:
    from tokenpacker_jax.assembly import load_trained  # noqa: PLC0415 (jax: scoring needs none)

    questions = question_file.read_questions(f.questions)  # a bad file fails before the model
    trained = load_trained(f.checkpoint)
    if f.limit:
        questions = questions[:f.limit]
    image_folder = f.image_folder or os.path.dirname(os.path.abspath(f.questions))
    records = question_file.answer_questions(
        trained, questions, image_folder, suffix=f.suffix, batch_size=f.batch_size,
        max_new_tokens=f.max_new_tokens or 16,
        model_id=os.path.basename(os.path.normpath(f.checkpoint)))
    if f.answers:
        files.write_jsonl(f.answers, records)
    for line in question_file.exact_match_lines(question_file.exact_match(records)):
        print(line)
    if f.benchmark:
        _print_score(f.benchmark, f.answers, f.annotations)


def main(argv):
    f = flags.FLAGS
    command = argv[1:]
    if command not in ([], ["run"], ["score"]):
        raise app.UsageError(f"unknown command {' '.join(command)!r} (commands: 'run', "
                             f"'score'; without one, a question file is answered)")
    if command == ["run"]:
        if not (f.benchmark and f.checkpoint and f.data):
            raise app.UsageError("run needs --benchmark, --checkpoint and --data")
        run_command(f)
        return
    if command == ["score"]:
        if not (f.benchmark and f.answers):
            raise app.UsageError("score needs --benchmark and --answers (and --annotations "
                                 "where the benchmark has them)")
        needs_annotations = f.benchmark not in ("mmmu", "ocrbench")
        if needs_annotations and not f.annotations:
            raise app.UsageError(f"score --benchmark={f.benchmark} needs --annotations")
        _print_score(f.benchmark, f.answers, f.annotations or None, f.questions or None)
        return
    if (f.benchmark is None) != (not f.annotations):
        raise app.UsageError("--benchmark and --annotations go together")
    if not (f.checkpoint and f.questions):
        raise app.UsageError("--checkpoint and --questions are required to answer questions "
                             "(or use the 'run' or 'score' command)")
    if f.benchmark and not f.answers:
        raise app.UsageError("--benchmark scores the answer file: give --answers")
    _answer_question_file(f)


if __name__ == "__main__":
    flags.DEFINE_enum("benchmark", None, list(suite.BENCHMARKS),
                      "run: the benchmark to answer; score: the benchmark whose rules score "
                      "--answers.")
    flags.DEFINE_string("checkpoint", None, "Training run directory (its newest checkpoint).")
    flags.DEFINE_string("data", "", "run: the benchmark's directory, laid out as published.")
    flags.DEFINE_string("out", "", "run: where answers and results go (default: "
                                   "CHECKPOINT/eval/BENCHMARK).")
    flags.DEFINE_string("split", "", "run: the benchmark's split (default: the reference's).")
    flags.DEFINE_bool("all_rounds", False, "run, mmbench: ask each question once per "
                                           "rotation of its options.")
    flags.DEFINE_string("questions", None, "Question file (jsonl); score --benchmark=pope "
                                           "with a label directory: the POPE question file.")
    flags.DEFINE_string("image_folder", "", "Images are relative to this (default: run: "
                                            "the benchmark's place; else the question "
                                            "file's folder).")
    flags.DEFINE_string("answers", "", "Where to write the answer file (jsonl); with "
                                       "'score', the answer file to score.")
    flags.DEFINE_enum("suffix", "none", list(question_file.SUFFIXES),
                      "Prompt suffix of the reference (question files without a command).")
    flags.DEFINE_integer("batch_size", 16, "Questions per generation batch (run: a multiple "
                                           "of this host's device count).")
    flags.DEFINE_integer("max_new_tokens", 0, "Answer length limit (default: run: the "
                                              "reference's for the benchmark; else 16).")
    flags.DEFINE_integer("bucket", 64, "run: prompts are padded to a multiple of this many "
                                       "tokens (one compile per multiple).")
    flags.DEFINE_integer("limit", 0, "Answer only the first N questions (0: all).")
    flags.DEFINE_string("annotations", "", "The benchmark's annotations (see 'score').")
    user_error.run_absl(main, "tokenpacker_jax.evaluate")
