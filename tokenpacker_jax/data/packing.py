"""Packed rows: several whole samples per training row, by grain's packing datasets.

``data.packing`` names the strategy: ``none`` (one sample per row, padded to
``data.max_length``), ``first_fit`` or ``best_fit`` (``grain.experimental.FirstFitPackIterDataset``
/ ``BestFitPackIterDataset``). A packer keeps as many rows open as a host's batch has, puts
each sample into the first (or the tightest) open row with room for all of it, and emits the
rows once a sample fits none of them; that sample opens the next ones.

Room means three budgets, all static, so every row has the shapes of the batch contract:

    T positions   data.max_length          a sample's text and visual positions
    P tile slots  data.max_images_per_row  its images' tiles (HD: every tile, the global
                                           view included; otherwise one per image)
    K samples     data.max_samples_per_row (0: T / 16)

A sample is never split across rows; one longer than T was cut as without packing
(``tokenpacker_jax.data.example``: never inside an image). A packed row holds, per position,
its sample's arrays; ``segment_ids`` [T] number the row's samples 1, 2, ... in order
(0: padding) and ``positions`` [T] restart at 0 with each; the samples' tiles fill the
first tile slots in the same order (so the k-th visual position of the row takes the row's
k-th visual token, ``models/mllm.py``), and ``sample_id`` [K] lists their source indices
(-1 after the last). Unpacked rows carry ``segment_ids`` (1 on the sample, 0 on padding) and
``positions`` too, so that the model reads both kinds alike.

State: grain's packers checkpoint the position upstream of the rows not yet emitted and
rebuild those rows on restore, so a resumed run sees the rows an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

NONE = "none"
STRATEGIES = {"first_fit": grain.experimental.FirstFitPackIterDataset,
              "best_fit": grain.experimental.BestFitPackIterDataset}
PACKING = (NONE, *STRATEGIES)
DEFAULT_STRATEGY = "first_fit"
# Positions per sample at least (a template, a question and an answer), for the default K.
MIN_SAMPLE_POSITIONS = 16

# Per-position keys, per-tile keys; what pads each in a packed row (None: the pad id).
POSITION_FILL = {"input_ids": None, "target_ids": None, "loss_mask": 0.0,
                 "attention_mask": 0, "image_mask": False}
TILE_FILL = {"pixel_values": 0.0, "tile_mask": False}


def check_strategy(name: str) -> str:
    if name not in PACKING:
        raise ValueError(f"data.packing must be one of {PACKING}, got {name!r}")
    return name


@dataclasses.dataclass(frozen=True)
class Budgets:
    """A packed row's static sizes: T positions, P tile slots, K samples."""

    length: int
    tiles: int
    samples: int

    @classmethod
    def of_config(cls, data_config: Any, tiles_per_sample: int) -> Budgets:
        """From ``config.data``; P defaults to one sample's tiles, K to T / 16."""
        length = int(data_config.max_length)
        tiles = int(data_config.get("max_images_per_row", 0)) or tiles_per_sample
        samples = int(data_config.get("max_samples_per_row", 0)) or max(
            1, length // MIN_SAMPLE_POSITIONS)
        if tiles < tiles_per_sample:
            raise ValueError(f"data.max_images_per_row {tiles} is less than one sample's "
                             f"{tiles_per_sample} tiles")
        return cls(length, tiles, samples)


def segment_keys(example: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``segment_ids`` and ``positions`` of an unpacked example (one segment, then
    padding)."""
    real = np.asarray(example["attention_mask"]).astype(np.int32)
    return {"segment_ids": real, "positions": (np.cumsum(real) - 1).clip(0) * real}


@dataclasses.dataclass(frozen=True)
class Unpad:
    """An example padded to T (tiles to N) -> its arrays cut to its own positions and valid
    tiles, with ``sample_id`` [1]: what the packer takes."""

    def __call__(self, example: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        length = int(np.asarray(example["attention_mask"]).sum())
        tiles = int(np.asarray(example["tile_mask"]).sum())
        cut = {key: np.asarray(example[key])[:length] for key in POSITION_FILL}
        cut.update({key: np.asarray(example[key])[:tiles] for key in TILE_FILL})
        cut["sample_id"] = np.asarray([example["sample_id"]], np.int64)
        return cut


@dataclasses.dataclass(frozen=True)
class PackedRow:
    """The packer's output -> a row of the batch contract (``segment_ids`` and ``positions``
    from the token arrays' own; grain's per-feature ids of the other arrays dropped)."""

    keys: tuple[str, ...]

    def __call__(self, packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        row = {key: packed[key] for key in self.keys if key in packed}
        row["segment_ids"] = packed["input_ids_segment_ids"].astype(np.int32)
        row["positions"] = packed["input_ids_positions"].astype(np.int32)
        return row


def pack(stream: grain.IterDataset, strategy: str, budgets: Budgets, *, rows: int,
         pad_id: int, keys: tuple[str, ...]) -> grain.IterDataset:
    """Unpadded examples (``Unpad``) -> packed rows of ``keys`` (see the module docstring).

    Args:
      strategy: ``first_fit`` or ``best_fit``.
      rows: rows the packer keeps open (a host's batch).
    """
    def fill(value):
        return pad_id if value is None else value

    lengths = {**{key: budgets.length for key in POSITION_FILL},
               **{key: budgets.tiles for key in TILE_FILL}, "sample_id": budgets.samples}
    padding = {**{key: fill(value) for key, value in POSITION_FILL.items()}, **TILE_FILL,
               "sample_id": -1}
    packed = STRATEGIES[check_strategy(strategy)](
        stream, length_struct=lengths, num_packing_bins=rows, shuffle_bins=False,
        padding_struct=padding)
    return packed.map(PackedRow(keys))


def real_share(rows: Mapping[str, np.ndarray]) -> float:
    """Share of a batch's positions that hold a sample's token."""
    return float(np.asarray(rows["attention_mask"]).mean())
