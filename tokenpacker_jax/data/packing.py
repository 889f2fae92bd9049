"""Packed rows: several whole samples per training row, by grain's packing datasets.

``data.packing`` names the strategy: ``none`` (one sample per row, padded to
``data.max_length``), ``first_fit`` or ``best_fit``
(``grain.experimental.FirstFitPackIterDataset`` / ``BestFitPackIterDataset``). A packer keeps
as many rows open as a host's batch has, puts each sample into the first (or the fullest)
open row with room for all of it, and emits the rows once a sample fits none of them; that
sample opens the next ones.

Room means three budgets, all static, so that every row has the shapes of the batch
contract (``tokenpacker_jax.data.batch``, ``Dims.of_data``):

    T positions   data.max_length          a sample's text and visual positions
    N tile slots  data.max_images_per_row  its images' tiles (HD: every tile, the global
                                           view included; otherwise one per image)
    K samples     data.max_samples_per_row (0: T / 16)

Every tile slot goes through the vision tower at every step, used or not: N trades compute
spent on empty slots against samples deferred for want of one (``python -m
tokenpacker_jax.data.stats`` shows how many tiles rows take).

A sample is never split across rows; one longer than T was cut as without packing
(``tokenpacker_jax.data.example``: never inside an image). A packed row holds, per position,
its sample's arrays; ``segment_ids`` number the row's samples 1, 2, ... in order (0:
padding) and ``positions`` restart at 0 with each; the samples' tiles fill the first tile
slots in the same order (so the k-th visual position of the row takes the row's k-th
visual token, ``models/mllm.py``), and ``sample_id`` [K] lists their source indices (-1
after the last).

State: grain's packers checkpoint the position upstream of the rows not yet emitted and
rebuild those rows on restore, so a resumed run sees the rows an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.data.errors import logger

STRATEGIES = {"first_fit": grain.experimental.FirstFitPackIterDataset,
              "best_fit": grain.experimental.BestFitPackIterDataset}
PACKING = (batch_lib.NO_PACKING, *STRATEGIES)
DEFAULT_STRATEGY = "first_fit"
DEFERRED_STATE_KEY = "deferred_by_tiles"
# What the packer packs: the samples' own arrays (it writes the segment keys itself).
PACKED_KEYS = tuple(key for key in batch_lib.KEYS if key not in batch_lib.SEGMENT_KEYS)


def is_sample(example: Mapping[str, np.ndarray]) -> bool:
    """False for the padding rows an evaluation split pads its hosts' shares with."""
    return int(example["sample_id"]) >= 0


@dataclasses.dataclass(frozen=True)
class Unpad:
    """An example padded to T (tiles to N) -> its arrays cut to its own positions and valid
    tiles, with ``sample_id`` [1]: what the packer takes."""

    def __call__(self, example: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        length = int(np.asarray(example["attention_mask"]).sum())
        tiles = int(np.asarray(example["tile_mask"]).sum())
        cut = {key: np.asarray(example[key])[:length] for key in batch_lib.SEQUENCE_KEYS
               if key in PACKED_KEYS}
        cut.update({key: np.asarray(example[key])[:tiles] for key in batch_lib.TILE_KEYS})
        cut["sample_id"] = np.asarray([example["sample_id"]], np.int64)
        return cut


def packed_row(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The packer's output -> a row of the batch contract: ``segment_ids`` and
    ``positions`` are the token arrays' own (grain's per-array ids of the others dropped)."""
    row = {key: packed[key] for key in PACKED_KEYS}
    row["segment_ids"] = packed["input_ids_segment_ids"].astype(np.int32)
    row["positions"] = packed["input_ids_positions"].astype(np.int32)
    return row


def _packer(stream: grain.IterDataset, strategy: str, dims: batch_lib.Dims, rows: int,
            pad_id: int) -> grain.IterDataset:
    fields = batch_lib.FIELDS
    sizes = {"length": dims.length, "tiles": dims.tiles, "samples": dims.samples}
    lengths = {key: sizes[fields[key].dims[0]] for key in PACKED_KEYS}
    padding = {key: pad_id if fields[key].fill == batch_lib.PAD_ID else fields[key].fill
               for key in PACKED_KEYS}
    return STRATEGIES[strategy](stream, length_struct=lengths, num_packing_bins=rows,
                                shuffle_bins=False, padding_struct=padding)


class _Arrivals(grain.IterDataset):
    """Passes unpadded examples through, noting (sample id, positions, tiles) of each in
    ``log``: the order in which the packer takes them."""

    def __init__(self, parent: grain.IterDataset, log: list):
        super().__init__(parent)
        self.log = log

    def __iter__(self):
        return _ArrivalsIterator(self._parent.__iter__(), self.log)


class _ArrivalsIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, log: list):
        super().__init__(parent)
        self._log = log

    def __next__(self):
        example = next(self._parent)
        self._log.append((int(example["sample_id"][0]), len(example["input_ids"]),
                          len(example["pixel_values"])))
        return example

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class PackRows(grain.IterDataset):
    """Unpadded examples (``Unpad``) -> packed rows (see the module docstring), counting
    the samples the tile budget sends to another row than their positions would.

    Args:
      strategy: ``first_fit`` or ``best_fit``.
      dims: the rows' sizes (``batch.Dims`` with ``samples`` set).
      rows: rows the packer keeps open (a host's batch).
      pad_id: what pads ``input_ids`` and ``target_ids``.
      name: what the log calls the stream.
    """

    def __init__(self, parent: grain.IterDataset, strategy: str, dims: batch_lib.Dims, *,
                 rows: int, pad_id: int, name: str = "data"):
        super().__init__(parent)
        if strategy not in STRATEGIES:
            raise ValueError(f"data.packing must be one of {PACKING}, got {strategy!r}")
        if dims.samples is None:
            raise ValueError("packed rows need dims.samples")
        self.strategy, self.dims, self.rows, self.pad_id = strategy, dims, rows, pad_id
        self.name = name

    def __iter__(self) -> _PackRowsIterator:
        log: list = []
        packer = _packer(_Arrivals(self._parent, log), self.strategy, self.dims, self.rows,
                         self.pad_id)
        return _PackRowsIterator(packer.__iter__(), self, log)

    def __str__(self) -> str:
        return f"PackRows({self.strategy}, {self.dims})"


class _PackRowsIterator(grain.DatasetIterator):
    """grain's packer emits its open rows together, once a sample fits none of them (that
    sample opens the next group). After each group the placements (the rows' sample ids,
    in order) and the arrival order (``_Arrivals``) tell, for each sample, which rows had
    room for its positions but not for its tiles when it came."""

    def __init__(self, parent: grain.DatasetIterator, dataset: PackRows, log: list):
        super().__init__(parent)
        self._dataset = dataset
        self._log = log
        self._group: list[list[int]] = []  # sample ids of the current group's rows so far
        self._deferred = 0
        self._logged = 0

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            packed = next(self._parent)
        except StopIteration:
            if self._group:
                self._count_group()
            raise
        self._group.append([int(i) for i in packed["sample_id"] if i >= 0])
        if len(self._group) == self._dataset.rows:
            self._count_group()
        return packed_row(packed)

    def _count_group(self) -> None:
        dims, rows = self._dataset.dims, self._group
        taken = sum(len(row) for row in rows)
        arrivals, rest = self._log[:taken], self._log[taken:]
        used = np.zeros((len(rows), 3), np.int64)  # positions, tiles, samples per row
        room = np.asarray([dims.length, dims.tiles, dims.samples])
        next_segment = [0] * len(rows)

        def moved(length, tiles, placed=None):
            """Whether a row the sample was not put in (first fit: an earlier one; best
            fit: a fuller one) had room for all of it but its tiles."""
            fits_text = (used[:, 0] + length <= room[0]) & (used[:, 2] < room[2])
            short_of_tiles = fits_text & (used[:, 1] + tiles > room[1])
            if placed is None:
                return bool(short_of_tiles.any())
            if self._dataset.strategy == "first_fit":
                return bool(short_of_tiles[:placed].any())
            return bool((short_of_tiles & (used[:, 0] > used[placed, 0])).any())

        deferred = 0
        for sample_id, length, tiles in arrivals:
            placed = next(r for r, row in enumerate(rows) if next_segment[r] < len(row)
                          and row[next_segment[r]] == sample_id)
            deferred += moved(length, tiles, placed)
            used[placed] += (length, tiles, 1)
            next_segment[placed] += 1
        if rest:  # the sample that fit no row of the group and opened the next
            deferred += moved(rest[0][1], rest[0][2])
        self._log[:] = rest
        self._group = []
        self._deferred += deferred
        if self._deferred >= max(1, 10 * self._logged):
            self._logged = self._deferred
            logger.warning("%s: %d samples so far went to a later row than their positions "
                           "allowed, their tiles exceeding the row's data.max_images_per_row "
                           "= %d", self._dataset.name, self._deferred, dims.tiles)

    @property
    def deferred(self) -> int:
        """Samples the tile budget has sent to another row so far."""
        return self._deferred

    def get_state(self) -> dict[str, Any]:
        return {"packer": self._parent.get_state(), "group": [list(r) for r in self._group],
                DEFERRED_STATE_KEY: self._deferred, "logged": self._logged}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["packer"])
        self._log.clear()  # the packer reads its open rows' samples again
        self._group = [list(r) for r in state["group"]]
        self._deferred = int(state[DEFERRED_STATE_KEY])
        self._logged = int(state["logged"])
