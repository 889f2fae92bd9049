"""The grain input pipeline: records -> examples -> per-host batches -> global arrays.

    source (LLaVA JSON/JSONL or TFDS)  MapDataset.source
      -> per-host shard                  [process_index::process_count]
      -> seeded shuffle, endless epochs  .shuffle(seed).repeat()
      -> decode, preprocess, tokenize    .map(ExampleBuilder)   (example or Skipped)
      -> threads / worker processes      .to_iter_dataset(ReadOptions) [.mp_prefetch()]
      -> skip bad records, count them    SkipBadRecords (main process)
      -> several samples a row (option)  packing.PackRows (data.packing)
      -> batch                           .batch(per_host_batch)

``make_dataset(config.data, tokenizer, tokens_per_tile, split)`` builds it; iterate
``iter(dataset)``. The iterator's ``get_state()`` / ``set_state()`` (or Orbax through
grain's ``save`` / ``load``) restore the exact position, skip counts included, so a
resumed run sees exactly the samples an uninterrupted one would.

Bad records: a record that fails (``tokenpacker_jax.data.errors``) comes out of the map as
a ``Skipped`` marker. In the training split the markers are filtered out before batching,
so batches stay full (the next good records take their place) and shapes stay static; each
is counted by reason, logged (the first few per reason) and summarised at the end of each
epoch; an epoch without a single usable record raises (the endless stream would otherwise
spin). In the evaluation splits (``val``, ``test``) a bad record becomes a padding row
instead, so every host yields the same number of batches. With ``on_error='raise'`` the
first bad record raises its DataError, naming the record.

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
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from tokenpacker_jax import sharding as sharding_lib
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.data import errors, hd, packing
from tokenpacker_jax.data.conversation import ConversationTokenizer, get_template, text_tokenizer
from tokenpacker_jax.data.errors import DataError, SkipCounter
from tokenpacker_jax.data.example import ExampleBuilder, ImageSettings, Skipped, Truncated
from tokenpacker_jax.data.llava import LlavaSource, SourceRecord, split_paths
from tokenpacker_jax.data.tfds import TfdsCaptionSource
from tokenpacker_jax.models.projectors import num_output_tokens

logger = errors.logger
SPLITS = ("train", "val", "test")
ON_ERROR = ("skip", "raise")
SKIP_STATE_KEY = "skipped_by_reason"
TRUNCATED_STATE_KEY = "truncated"  # samples cut at max_length: in all, in this epoch


# ---------------------------------------------------------------------------------------------
# Skipping bad records


class SkipBadRecords(grain.IterDataset):
    """Drops (or, with ``replacement``, replaces) ``Skipped`` markers and counts them; counts
    and unwraps ``Truncated`` examples (cut at max_length, kept).

    Args:
      parent: elements that are examples or ``Skipped``.
      on_error: ``skip`` or ``raise`` (raise the marker's DataError).
      epoch_length: elements per epoch upstream (for the per-epoch summary).
      name: what the summary calls this stream.
      replacement: if given, a bad record is replaced by ``replacement()`` instead of
        dropped (evaluation: keeps the number of rows per host fixed).
    """

    def __init__(self, parent: grain.IterDataset, *, on_error: str = "skip",
                 epoch_length: int = 0, name: str = "data",
                 replacement: Callable[[], Any] | None = None):
        super().__init__(parent)
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.epoch_length = epoch_length
        self.name = name
        self.replacement = replacement

    def __iter__(self) -> _SkipIterator:
        return _SkipIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"SkipBadRecords(on_error={self.on_error})"


class _SkipIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, dataset: SkipBadRecords):
        super().__init__(parent)
        self._dataset = dataset
        self._consumed = 0  # elements taken from the parent (good and bad)
        self._total = SkipCounter()
        self._epoch = SkipCounter(max_logged=0)
        self._good_in_epoch = 0
        self._truncated = [0, 0]  # in all, in this epoch
        self._finished = False

    def __next__(self):
        dataset = self._dataset
        while True:
            try:
                element = next(self._parent)
            except StopIteration:
                if not self._finished:
                    self._finished = True
                    self._log_summary(f"{dataset.name}: end of data", self._total,
                                      self._truncated[0])
                raise
            self._consumed += 1
            if isinstance(element, Truncated):
                self._truncated = [count + 1 for count in self._truncated]
                element = element.example
            if isinstance(element, Skipped):
                if dataset.on_error == "raise":
                    raise element.error
                self._total.add(element.error)
                self._epoch.add(element.error)
            else:
                self._good_in_epoch += 1
            length = dataset.epoch_length
            if length and self._consumed % length == 0:
                epoch = self._consumed // length - 1
                what = f"{dataset.name}: epoch {epoch}"
                self._log_summary(what, self._epoch, self._truncated[1])
                if not self._good_in_epoch:  # an endless stream would spin here forever
                    raise DataError(next(iter(self._epoch.counts)),
                                    f"{self._epoch.summary(what)}: no usable record at "
                                    f"all; the first messages are logged above")
                self._epoch = SkipCounter(max_logged=0)
                self._good_in_epoch = 0
                self._truncated[1] = 0
            if not isinstance(element, Skipped):
                return element
            if dataset.replacement is not None:
                return dataset.replacement()

    @staticmethod
    def _log_summary(what: str, counter: SkipCounter, truncated: int) -> None:
        cut = f"; {truncated} cut at max_length" if truncated else ""
        logger.log(logging.WARNING if counter.total else logging.INFO,
                   counter.summary(what) + cut)

    @property
    def skipped(self) -> dict[str, int]:
        """Records skipped so far, by reason."""
        return self._total.as_dict()

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "consumed": self._consumed,
                SKIP_STATE_KEY: self._total.as_dict(), "epoch_skipped": self._epoch.as_dict(),
                "epoch_good": self._good_in_epoch, TRUNCATED_STATE_KEY: list(self._truncated)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._consumed = int(state["consumed"])
        self._total = SkipCounter(state[SKIP_STATE_KEY])
        self._epoch = SkipCounter(state["epoch_skipped"], max_logged=0)
        self._good_in_epoch = int(state["epoch_good"])
        self._truncated = [int(count) for count in state.get(TRUNCATED_STATE_KEY, (0, 0))]
        self._finished = False


def _find_state(state: Any, key: str) -> Any:
    """The value under ``key`` in the first mapping of a nested iterator state holding it
    (None if none does)."""
    stack = [state]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            if key in item:
                return item[key]
            stack.extend(item.values())
    return None


def _state(iterator_or_state: Any) -> Any:
    if isinstance(iterator_or_state, grain.DatasetIterator):
        return iterator_or_state.get_state()
    return iterator_or_state


def skipped_records(iterator_or_state: Any) -> dict[str, int]:
    """Records skipped so far by reason, from a pipeline iterator or its state."""
    counts = _find_state(_state(iterator_or_state), SKIP_STATE_KEY)
    if counts is None:
        raise ValueError("no SkipBadRecords state found in this iterator state")
    return dict(counts)


def record_counts(iterator_or_state: Any) -> dict[str, int]:
    """What the pipeline did to records so far: ``skipped`` (all reasons), ``truncated``
    (cut at max_length) and, packing, ``deferred_by_tiles`` (sent to a later row by the
    row's tile budget)."""
    state = _state(iterator_or_state)
    counts = {"skipped": sum(skipped_records(state).values()),
              "truncated": int(_find_state(state, TRUNCATED_STATE_KEY)[0])}
    deferred = _find_state(state, packing.DEFERRED_STATE_KEY)
    if deferred is not None:  # packed rows
        counts["deferred_by_tiles"] = int(deferred)
    return counts


# ---------------------------------------------------------------------------------------------
# Batching


def collate(examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows -> a batch: every key stacked on a new leading axis."""
    return {key: np.stack([example[key] for example in examples]) for key in batch_lib.KEYS}


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
        rows = collate([self.padding()] * missing)
        return {key: np.concatenate([batch[key], rows[key]]) for key in batch}


# ---------------------------------------------------------------------------------------------
# Sources


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


@functools.lru_cache(maxsize=4)
def _llava_source(paths: tuple[str, ...], stamps: tuple) -> LlavaSource:
    """Parsing a large annotation file takes seconds; the trainer asks for a split's source
    more than once (its length, then its records). ``stamps`` (modification times) keys
    the cache, so a rewritten file is read anew."""
    del stamps
    return LlavaSource(paths)


def make_source(data_config: Any, split: str):
    """The random-access record source of ``split`` from ``config.data``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if data_config.source == "llava":
        paths = tuple(split_paths(data_config.files[split]))
        if not paths:
            raise ValueError(f"data.files.{split}: no annotation file given for the "
                             f"{split!r} split")
        stamps = tuple(os.stat(p).st_mtime_ns if os.path.exists(p) else None for p in paths)
        return _llava_source(paths, stamps)
    if data_config.source == "tfds":
        tfds_config = data_config.tfds
        return TfdsCaptionSource(
            tfds_config.name, tfds_config.splits[split], data_dir=tfds_config.data_dir or None,
            image_key=tfds_config.image_key, caption_key=tfds_config.caption_key,
            id_key=tfds_config.id_key or None, prompt=tfds_config.prompt)
    raise ValueError(f"data.source must be 'llava' or 'tfds', got {data_config.source!r}")


# ---------------------------------------------------------------------------------------------
# The dataset


def image_settings(data_config: Any, tokenizer: Any = None) -> ImageSettings:
    """ImageSettings from ``config.data``; HD separator ids of -1 are looked up in the
    tokenizer (the last id of ``encode(',')`` / ``encode('\\n')``)."""
    image, hd_config = data_config.image, data_config.hd
    comma, newline = int(hd_config.comma_id), int(hd_config.newline_id)
    if (comma < 0 or newline < 0) and image.aspect_mode == "slice":
        if tokenizer is None:
            raise ValueError("data.hd.comma_id / newline_id = -1 need the tokenizer")
        encode = text_tokenizer(tokenizer).encode
        comma = encode(",")[-1] if comma < 0 else comma
        newline = encode("\n")[-1] if newline < 0 else newline
    return ImageSettings(mode=image.aspect_mode, size=int(image.image_size),
                         mean=tuple(image.mean), std=tuple(image.std),
                         patch_num=int(hd_config.patch_num), comma_id=comma,
                         newline_id=newline,
                         global_view=hd.check_global_view(hd_config.global_view))


def example_builder(data_config: Any, tokenizer: Any, tokens_per_tile: int) -> ExampleBuilder:
    """The record -> example function for ``config.data``."""
    system = data_config.get("system_prompt")
    template = get_template(data_config.template, system)
    return ExampleBuilder(ConversationTokenizer(template, tokenizer),
                          image_settings(data_config, tokenizer), tokens_per_tile,
                          data_config.max_length, data_config.image_folder)


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


def tokens_per_tile(model_config: Any) -> int:
    """Visual tokens per image tile of an ``MLLMConfig`` (the projector's output count)."""
    return num_output_tokens(model_config.projector, model_config.vision.grid_size)


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


class _Head:
    """The first ``count`` records of a source."""

    def __init__(self, source: Any, count: int):
        self.source, self.count = source, min(count, len(source))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return self.source[index]


def head_of_source(data_config: Any, split: str, count: int, seed: int | None = None) -> _Head:
    """The first ``count`` records of ``split`` (train: of the source shuffled with ``seed``
    when ``data.shuffle``): a sample of it for estimates."""
    source = make_source(data_config, split)
    if split == "train" and data_config.shuffle:
        source = grain.MapDataset.source(source).shuffle(seed=0 if seed is None else seed)
    return _Head(source, count)


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
    return collate([row] * per_host_batch_size(data_config, process_count))


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
        return rows.batch(batch_size, drop_remainder=True, batch_fn=collate)
    pad_id = example_builder(data_config, tokenizer, tokens_per_tile).pad_id
    batches = rows.batch(batch_size, batch_fn=collate).map(_FillBatch(batch_size, functools.partial(
        batch_lib.padding_row, batch_lib.Dims.of_data(data_config), pad_id)))
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
        ``conversation.TextTokenizer``.
      tokens_per_tile: visual tokens per image tile (the projector's M; ``tokens_per_tile``).
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


# ---------------------------------------------------------------------------------------------
# Global arrays


def global_batch(batch: Mapping[str, np.ndarray], mesh: Any,
                 shardings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """This host's batch -> global jax arrays (leading axis over the mesh's batch axes).

    Every host calls this with its own per-host batch; the global leading size is
    per-host size * process_count. ``shardings`` (name -> NamedSharding) overrides the
    default ``sharding.batch_sharding`` (leading axis over ``('data', 'fsdp')``).
    """
    arrays = {}
    for name, value in batch.items():
        value = np.asarray(value)
        target = (shardings or {}).get(name) or sharding_lib.batch_sharding(mesh, value.ndim)
        shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        arrays[name] = jax.make_array_from_process_local_data(target, value, shape)
    return arrays
