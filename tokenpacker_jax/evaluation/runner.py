"""Answering a benchmark at scale: sharded over hosts and devices, resumable.

- Hosts: process ``k`` of ``n`` answers the ``k``-th of ``n`` contiguous chunks of the
  questions (``ceil(len / n)`` each, as the reference splits its question files over GPUs).
- Devices: each host answers in batches of ``batch_size`` questions, the batch split over
  the data-parallel axes (``data``, ``fsdp``) of its mesh; the last batch is padded with
  copies of its last question so that every batch has one shape (one compile per prompt
  length bucket).
- Resuming: each host appends its answers to ``PARTS/HHHHH-of-NNNNN.jsonl`` (one line per
  question: ``index``, ``question_id``, ``answer``) and flushes after every batch. A rerun
  reads every part file there (whatever the host count that wrote it), checks that each
  line still names the question at its index, and answers only what no line holds; a line
  cut short by a kill is dropped.
- Merging: when all hosts are done, host 0 gathers the answer lines in question order.

Throughput is printed per host: questions answered, seconds, questions/s.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from jax.experimental import multihost_utils

from tokenpacker_jax import generate as generation
from tokenpacker_jax import sharding
from tokenpacker_jax.data.example import example_builder
from tokenpacker_jax.data.prompt import build_prompt, left_pad
from tokenpacker_jax.evaluation.benchmark import Question
from tokenpacker_jax.user_error import InputError

PARTS = "parts"


def local_mesh(tensor: int = 1) -> jax.sharding.Mesh:
    """This host's devices as a (data, fsdp=1, tensor) mesh: every host answers its own
    questions, so no array spans hosts."""
    return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": tensor},
                              devices=jax.local_devices())


class Answerer:
    """Greedy answers of a trained model to batches of (message, image) questions.

    Args:
      trained: ``assembly.TrainedModel`` (its parameters on ``mesh``).
      mesh: where the batch is split (leading axis over ``data`` x ``fsdp``); default: one
        device.
      batch_size: questions per generation call, a multiple of the data-parallel size.
      max_new_tokens: answer length limit.
      bucket: prompts are left-padded to a multiple of this many tokens.
    """

    def __init__(self, trained: Any, *, mesh: jax.sharding.Mesh | None = None,
                 batch_size: int = 8, max_new_tokens: int = 128, bucket: int = 64):
        self.mesh = mesh or sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                               devices=jax.devices()[:1])
        parallel = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if batch_size % parallel:
            raise InputError(f"--batch_size {batch_size} is not a multiple of the "
                             f"{parallel} data-parallel devices")
        self.batch_size, self.bucket = batch_size, bucket
        self.rules = trained.config.sharding.rules
        self.tokenizer = trained.tokenizer
        self.builder = example_builder(trained.config.data, trained.tokenizer,
                                       trained.tokens_per_tile)
        self.generator = generation.Generator(
            trained.model, trained.params, trained.tokenizer.stop_ids, trained.tokenizer.pad_id,
            generation.SamplingConfig(max_new_tokens=max_new_tokens))

    def prompts(self, questions: Sequence[tuple[str, Any]]) -> list[Any]:
        """Tokenised prompts of (message after the image, PIL image or None) pairs."""
        return [build_prompt(self.builder, text, image) for text, image in questions]

    def generate(self, prompts: Sequence[Any]) -> list[str]:
        """The answers to at most ``batch_size`` prompts."""
        if not 0 < len(prompts) <= self.batch_size:
            raise ValueError(f"{len(prompts)} prompts for a batch of {self.batch_size}")
        padded = list(prompts) + [prompts[-1]] * (self.batch_size - len(prompts))
        length = generation.bucket_length(max(len(p.ids) for p in padded), self.bucket)
        batch = left_pad(padded, self.generator.pad_id, length)
        with sharding.use_mesh(self.mesh, self.rules):
            placed = {name: jax.device_put(value, sharding.batch_sharding(self.mesh,
                                                                          value.ndim))
                      for name, value in batch.items()}
            tokens = self.generator(placed)["tokens"]
        rows = self.generator.strip(tokens)[:len(prompts)]
        return [self.tokenizer.decode(ids).strip() for ids in rows]


def host_share(count: int, process_index: int, process_count: int) -> range:
    """The question indices of one host: the reference's contiguous chunks."""
    size = math.ceil(count / process_count) if count else 0
    return range(min(process_index * size, count), min((process_index + 1) * size, count))


def _part_lines(path: str) -> Iterator[tuple[str, str, bool]]:
    """(where, line, is_last) for the non-empty lines of a part file."""
    with open(path, encoding="utf-8") as file:
        lines = file.read().split("\n")
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    for k, (number, line) in enumerate(numbered):
        yield f"{path}:{number}", line, k == len(numbered) - 1 and not lines[-1] == ""


def read_parts(parts_dir: str, questions: Sequence[Question]) -> dict[int, dict[str, Any]]:
    """{question index: answer line} from every part file in ``parts_dir``.

    A line without its newline at the end of a file was cut short by a kill and is
    dropped; any other bad line, or a line whose question id is not that of the question at
    its index (the part files were written for other questions), is an error naming it.
    Lines past the end of ``questions`` (a run with ``--limit``) are kept there, unused.
    """
    done: dict[int, dict[str, Any]] = {}
    seen: dict[int, str] = {}
    for path in sorted(glob.glob(os.path.join(parts_dir, "*.jsonl"))):
        for where, line, unterminated in _part_lines(path):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                if unterminated:
                    continue
                raise InputError(f"{where}: not valid JSON ({err})") from err
            if (not isinstance(entry, dict) or not isinstance(entry.get("index"), int)
                    or "answer" not in entry or "question_id" not in entry):
                raise InputError(f"{where}: expected {{'index', 'question_id', 'answer'}}")
            index = entry["index"]
            if index >= len(questions):
                continue
            expected = questions[index]
            if json.dumps(entry["question_id"]) != json.dumps(expected.question_id):
                raise InputError(
                    f"{where}: question {index} is {entry['question_id']!r} here but "
                    f"{expected.question_id!r} in {expected.where}: these answers were "
                    f"written for other questions (use another --out)")
            if index in seen:
                raise InputError(f"{where}: question {index} was already answered at "
                                 f"{seen[index]}")
            seen[index] = where
            done[index] = entry["answer"]
    return done


def _drop_unterminated(path: str) -> None:
    """Cuts a part file back to its last complete line (a kill mid-write)."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as file:
        data = file.read()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            file.truncate(keep)


def answer_all(make_answerer: Callable[[], Answerer], questions: Sequence[Question],
               answer_line: Callable[[Question, str | None, str], dict[str, Any]], out: str,
               *, model_id: str, process_index: int | None = None,
               process_count: int | None = None,
               log: Callable[[str], None] = print) -> list[dict[str, Any]] | None:
    """Answers this host's unanswered questions into ``out/parts`` (see the module
    docstring); ``make_answerer`` is called only when there is something to answer, and a
    question with ``ask`` False gets its answer line without the model (text ``None``).
    Returns every answer line in question order on host 0 once all are answered, ``None``
    on the other hosts."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    parts_dir = os.path.join(out, PARTS)
    os.makedirs(parts_dir, exist_ok=True)
    part = os.path.join(parts_dir, f"{process_index:05d}-of-{process_count:05d}.jsonl")
    _drop_unterminated(part)
    done = read_parts(parts_dir, questions)
    share = host_share(len(questions), process_index, process_count)
    todo = [questions[i] for i in share if i not in done]
    if len(todo) < len(share):
        log(f"host {process_index}: {len(share) - len(todo)} of its {len(share)} questions "
            f"were answered before; answering {len(todo)}")
    with open(part, "a", encoding="utf-8") as file:
        def write(question: Question, text: str | None) -> None:
            entry = {"index": question.index, "question_id": question.question_id,
                     "answer": answer_line(question, text, model_id)}
            file.write(json.dumps(entry, ensure_ascii=False) + "\n")

        for question in todo:
            if not question.ask:
                write(question, None)
        file.flush()
        asked = [q for q in todo if q.ask]
        if asked:
            _answer(make_answerer(), asked, write, file, process_index, log)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("evaluation: every host answered its share")
    if process_index != 0:
        return None
    done = read_parts(parts_dir, questions)
    missing = [q for q in questions if q.index not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} questions have no answer in {parts_dir} (the "
                           f"first: {missing[0].where}); rerun to answer them")
    return [done[q.index] for q in questions]


def _answer(answerer: Answerer, questions: Sequence[Question],
            write: Callable[[Question, str], None], file: Any, process_index: int,
            log: Callable[[str], None]) -> None:
    """Answers in batches, writing and flushing each batch; prints the throughput."""
    batches = [questions[i:i + answerer.batch_size]
               for i in range(0, len(questions), answerer.batch_size)]

    def prepare(batch: Sequence[Question]) -> list[Any]:
        return answerer.prompts([(q.text, q.load_image()) for q in batch])

    start = time.perf_counter()
    # Images are read and prompts tokenised one batch ahead, while the devices generate.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        upcoming = pool.submit(prepare, batches[0])
        for k, batch in enumerate(batches):
            prompts = upcoming.result()
            if k + 1 < len(batches):
                upcoming = pool.submit(prepare, batches[k + 1])
            for question, text in zip(batch, answerer.generate(prompts), strict=True):
                write(question, text)
            file.flush()
    seconds = time.perf_counter() - start
    log(f"host {process_index}: answered {len(questions)} questions in {seconds:.1f} s "
        f"({len(questions) / seconds:.2f} questions/s, {answerer.batch_size} per batch over "
        f"{answerer.mesh.size} devices)")
