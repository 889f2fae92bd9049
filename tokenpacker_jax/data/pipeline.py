"""The grain input pipeline: records -> examples -> rows -> per-host batches.

    source (LLaVA JSON/JSONL or TFDS)  MapDataset.source        (data.sources)
      -> per-host shard                  [process_index::process_count]
      -> seeded shuffle, endless epochs  .shuffle(seed).repeat()
      -> decode, preprocess, tokenize    .map(ExampleBuilder)   (example or Skipped)
      -> threads / worker processes      .to_iter_dataset(ReadOptions) [.mp_prefetch()]
      -> skip bad records, count them    SkipBadRecords (main process, data.bad_records)
      -> several samples a row (option)  packing.PackRows (data.packing)
      -> batch                           .batch(per_host_batch, batch.collate)

``make_dataset(config.data, tokenizer, tokens_per_tile, split)`` builds it; iterate
``iter(dataset)``. Each batch is a dict of the batch contract's arrays with a leading axis
of data.batch_size / process_count rows (``tokenpacker_jax.data.batch``;
``batch.global_batch`` makes the hosts' batches one global array per key). The iterator's
``get_state()`` / ``set_state()`` (or Orbax through grain's ``save`` / ``load``) restore the
exact position, skip counts included, so a resumed run sees exactly the samples an
uninterrupted one would.

Bad records (``tokenpacker_jax.data.bad_records``): a record that fails
(``tokenpacker_jax.data.errors``) comes out of the map as a ``Skipped`` marker. In the
training split the markers are filtered out before batching, so batches stay full (the next
good records take their place) and shapes stay static; each is counted by reason, logged
(the first few per reason) and summarised at the end of each epoch; an epoch without a
single usable record raises (the endless stream would otherwise spin). In the evaluation
splits (``val``, ``test``) a bad record becomes a padding row instead, so every host yields
the same number of batches. With ``on_error='raise'`` the first bad record raises its
DataError, naming the record.

Splits and hosts:

- ``train``: each host takes a disjoint equal share (the source is first permuted with the
  seed, then ``len // process_count`` records go to each host; up to process_count - 1
  records are left out), shuffles it with the seed anew each epoch, and repeats it epoch
  after epoch without end (``num_epochs=`` makes it finite). Batches run across epoch
  boundaries, so no record is dropped at an epoch's end; the trainer runs
  ``steps_per_epoch * data.num_epochs`` steps.
- ``val`` / ``test``: no shuffle, one epoch, record i goes to host i % process_count, every
  host gets ceil(len / process_count) rows (padding rows past the end) and the last batch
  is filled with padding rows (``sample_id`` -1, all masks zero).

Why the training stream is endless: with skipped records, hosts hold different numbers of
good records; a finite stream would let one host run out a batch before another. An endless
one lets every host run the same number of steps (the last steps then start the next
epoch's records, a few at most).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.data import packing
from tokenpacker_jax.data.bad_records import ON_ERROR, SkipBadRecords
from tokenpacker_jax.data.example import ExampleBuilder, example_builder
from tokenpacker_jax.data.llava import SourceRecord
from tokenpacker_jax.data.sources import head_of_source, make_source


class _ThenForever(grain.IterDataset):
    """The parent's batches, then batches of padding rows without end."""

    def __init__(self, parent: grain.IterDataset, padding_batch: Callable[[], dict]):
        super().__init__(parent)
        self.padding_batch = padding_batch

    def __iter__(self):
        return _ThenForeverIterator(self._parent.__iter__(), self.padding_batch)


class _ThenForeverIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, padding_batch: Callable[[], dict]):
        super().__init__(parent)
        self._padding_batch = padding_batch
        self._done = False

    def __next__(self):
        if not self._done:
            try:
                return next(self._parent)
            except StopIteration:
                self._done = True
        return self._padding_batch()

    def get_state(self):
        return {"parent": self._parent.get_state(), "done": self._done}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._done = bool(state["done"])


@dataclasses.dataclass(frozen=True)
class _FillBatch:
    """Completes a short final batch with padding rows."""

    size: int
    padding: Callable[[], dict[str, np.ndarray]]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = self.size - len(batch["sample_id"])
        if missing <= 0:
            return batch
        rows = batch_lib.collate([self.padding()] * missing)
        return {key: np.concatenate([batch[key], rows[key]]) for key in batch}


class _EvalShard:
    """Records process_index, process_index + process_count, ... of a source, padded with
    None (a padding row) to ceil(len / process_count)."""

    def __init__(self, source: Any, process_index: int, process_count: int):
        self.source = source
        self.process_index = process_index
        self.process_count = process_count
        self.length = math.ceil(len(source) / process_count)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> SourceRecord | None:
        position = self.process_index + int(index) * self.process_count
        return self.source[position] if position < len(self.source) else None


@dataclasses.dataclass(frozen=True)
class _BuildOrPad:
    builder: ExampleBuilder

    def __call__(self, record: SourceRecord | None):
        return self.builder.padding_example() if record is None else self.builder(record)


def _ensure_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside ``absl.app.run`` (scripts, tests,
    notebooks) nobody parsed them, so take the defaults."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in 0..{process_count - 1}")
    return process_index, process_count


def _process_count(process_count: int | None) -> int:
    if process_count is None:
        process_count = jax.process_count()
    return int(process_count)


def per_host_batch_size(data_config: Any, process_count: int | None = None) -> int:
    """data.batch_size (global) / number of hosts."""
    process_count = _process_count(process_count)
    batch = int(data_config.batch_size)
    if batch <= 0 or batch % process_count:
        raise ValueError(f"data.batch_size {batch} must be a positive multiple of the "
                         f"{process_count} processes")
    return batch // process_count


def steps_per_epoch(data_config: Any, split: str = "train", *, source: Any = None,
                    process_count: int | None = None,
                    samples_per_row: float = 1.0) -> int:
    """Batches per epoch of ``split`` on each host (for train: full batches of the host's
    share, assuming no record is skipped and ``samples_per_row`` samples in a row, see
    ``samples_per_row``; for val/test: every row, padded)."""
    process_count = _process_count(process_count)
    batch = per_host_batch_size(data_config, process_count)
    records = len(make_source(data_config, split) if source is None else source)
    if split == "train":
        return int(records // process_count / samples_per_row) // batch
    return math.ceil(math.ceil(records / process_count) / batch)


def samples_per_row(data_config: Any, tokenizer: Any, tokens_per_tile: int, *,
                    records: int = 2048, seed: int | None = None) -> float:
    """Mean samples per row of the training split: 1 without packing; with packing, over
    the rows the packer fills from ``records`` shuffled records (the groups of rows it
    emits before the records run out, when there are any)."""
    if not batch_lib.is_packed(data_config):
        return 1.0
    group = per_host_batch_size(data_config, 1)
    counts = [int((row["sample_id"] >= 0).sum()) for row in make_rows(
        data_config, tokenizer, tokens_per_tile, "train",
        source=head_of_source(data_config, "train", records, seed), shuffle=False,
        num_epochs=1, process_index=0, process_count=1)]
    whole = len(counts) // group * group
    counts = counts[:whole] if whole else counts
    return sum(counts) / max(len(counts), 1)


def padding_batch(data_config: Any, pad_id: int, process_count: int | None = None
                  ) -> dict[str, np.ndarray]:
    """A per-host batch of padding rows of ``make_rows``' shapes."""
    row = batch_lib.padding_row(batch_lib.Dims.of_data(data_config), pad_id)
    return batch_lib.collate([row] * per_host_batch_size(data_config, process_count))


def make_dataset(data_config: Any, tokenizer: Any, tokens_per_tile: int,
                 split: str = "train", **kwargs) -> grain.IterDataset:
    """The per-host batch stream of ``split`` (see the module docstring): ``make_rows``'
    rows in batches of data.batch_size / process_count (val / test: the last batch filled
    with padding rows; packed, padding batches follow without end, as hosts pack their
    shares into different numbers of rows)."""
    rows = make_rows(data_config, tokenizer, tokens_per_tile, split, **kwargs)
    process_count = _process_count(kwargs.get("process_count"))
    batch_size = per_host_batch_size(data_config, process_count)
    if split == "train":
        return rows.batch(batch_size, drop_remainder=True, batch_fn=batch_lib.collate)
    pad_id = example_builder(data_config, tokenizer, tokens_per_tile).pad_id
    batches = rows.batch(batch_size, batch_fn=batch_lib.collate).map(_FillBatch(
        batch_size, functools.partial(batch_lib.padding_row,
                                      batch_lib.Dims.of_data(data_config), pad_id)))
    if batch_lib.is_packed(data_config):
        batches = _ThenForever(batches, functools.partial(
            padding_batch, data_config, pad_id, process_count))
    return batches


def make_rows(data_config: Any, tokenizer: Any, tokens_per_tile: int,
              split: str = "train", *, seed: int | None = None,
              shuffle: bool | None = None, num_epochs: int | None = None,
              source: Any = None, process_index: int | None = None,
              process_count: int | None = None) -> grain.IterDataset:
    """The per-host row stream of ``split``: one sample per row, or with ``data.packing``
    several (see the module docstring).

    Args:
      data_config: ``config.data``.
      tokenizer: ``tokenpacker_jax.tokenizer.Tokenizer``, a transformers tokenizer, or any
        ``text_tokenizer.TextTokenizer``.
      tokens_per_tile: visual tokens per image tile (the projector's M,
        ``example.tokens_per_tile``).
      split: ``train`` (shuffled, repeated, bad records dropped) or ``val`` / ``test``
        (in order, one pass; unpacked, bad records and the remainder as padding rows).
      seed: shuffle seed (the trainer passes ``config.seed``; default 0).
      shuffle: shuffle the training split (default ``data.shuffle``; val/test never are).
      num_epochs: train only: stop after this many passes (default: repeat forever; the
        trainer runs ``steps_per_epoch * data.num_epochs`` steps).
      source: a random-access record source (default: from ``config.data``).
      process_index, process_count: this host and the number of hosts (default: jax's).
    Returns:
      A grain IterDataset of row dicts (``tokenpacker_jax.data.batch`` for the keys).
    """
    if data_config.on_error not in ON_ERROR:
        raise ValueError(f"data.on_error must be one of {ON_ERROR}, got "
                         f"{data_config.on_error!r}")
    process_index, process_count = _process_info(process_index, process_count)
    batch_size = per_host_batch_size(data_config, process_count)
    source = make_source(data_config, split) if source is None else source
    builder = example_builder(data_config, tokenizer, tokens_per_tile)
    read_options = grain.ReadOptions(num_threads=int(data_config.read_threads),
                                     prefetch_buffer_size=int(data_config.prefetch_buffer))
    seed = 0 if seed is None else int(seed)
    train = split == "train"

    if train:
        shuffle = bool(data_config.shuffle if shuffle is None else shuffle)
        dataset = grain.MapDataset.source(source)
        shard_length = len(dataset) // process_count
        if shard_length == 0:
            raise ValueError(f"{split}: {len(dataset)} records cannot feed "
                             f"{process_count} hosts")
        if process_count > 1:
            if shuffle:
                dataset = dataset.shuffle(seed=seed)
            dataset = dataset[:shard_length * process_count][process_index::process_count]
        if shuffle:
            dataset = dataset.shuffle(seed=seed)
        dataset = dataset.repeat(num_epochs if num_epochs else None).map(builder)
        replacement = None
    else:
        dataset = grain.MapDataset.source(_EvalShard(source, process_index, process_count))
        shard_length = len(dataset)
        dataset = dataset.map(_BuildOrPad(builder))
        replacement = builder.padding_example

    stream = dataset.to_iter_dataset(read_options)
    if int(data_config.worker_count) > 0:
        _ensure_flags_parsed()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(data_config.worker_count),
            per_worker_buffer_size=int(data_config.worker_buffer_size)))
    packed = batch_lib.is_packed(data_config)
    stream = SkipBadRecords(stream, on_error=data_config.on_error, epoch_length=shard_length,
                            name=f"data[{split}]", replacement=None if packed else replacement)
    if not packed:
        return stream
    return packing.PackRows(stream.filter(packing.is_sample).map(packing.Unpad()),
                            data_config.packing, batch_lib.Dims.of_data(data_config),
                            rows=batch_size, pad_id=builder.pad_id, name=f"data[{split}]")
