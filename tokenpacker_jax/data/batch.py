"""The batch contract: every array of a training batch, its dtype, its shape and what pads it.

Per row, with T = max_length, N = tile slots, S = image size, C = channels (3):

    input_ids      int32   [T]           text ids; the pad id at visual positions and padding
    target_ids     int32   [T]           the next token; the pad id after the last one
    loss_mask      float32 [T]           1 where target_ids[t] is supervised
    attention_mask int32   [T]           1 for real positions (text or visual), 0 for padding
    image_mask     bool    [T]           True where the model puts a visual token
    segment_ids    int32   [T]           the sample of each position, 1, 2, ... (0: padding)
    positions      int32   [T]           RoPE positions, from 0 in each sample (0: padding)
    pixel_values   float32 [N, S, S, C]  valid tiles first, then zeros
    tile_mask      bool    [N]
    sample_id      int64   [] or [K]     the record's index in its source (-1: padding)

A row holds one sample (N: the most tiles a sample takes, ``sample_id`` a scalar), or with
``data.packing`` several whole ones (``tokenpacker_jax.data.packing``): N is then
``data.max_images_per_row`` tile slots, the samples' tiles first in their order, and
``sample_id`` [K] lists the row's samples (K = ``data.max_samples_per_row``). A batch stacks
rows on a leading axis B. ``FIELDS`` is the one table: the example builder
pads with it, the pipeline stacks its keys, the trainer and ``aot`` take their inputs from
it, and adding a key is one entry there. ``MODEL_INPUTS`` are the keyword arguments of
``MultimodalLM.__call__`` and ``PREFILL_INPUTS`` those of its ``prefill`` (a test keeps them
equal), ``STEP_KEYS`` what the training step reads. ``collate`` stacks rows into a batch
[B, ...]; ``global_batch`` makes each host's batch [B / hosts, ...] its part of global arrays
[B, ...] sharded on the batch axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from tokenpacker_jax import sharding
from tokenpacker_jax.data import hd

PAD_ID = "pad_id"  # a Field.fill: the tokenizer's pad id


@dataclasses.dataclass(frozen=True)
class Field:
    """One array of a sample: its dtype, its dimensions (``Dims`` attribute names) and the
    value of a padding row (``PAD_ID``: the tokenizer's pad id)."""

    dtype: type
    dims: tuple[str, ...]
    fill: Any


FIELDS: dict[str, Field] = {
    "input_ids": Field(np.int32, ("length",), PAD_ID),
    "target_ids": Field(np.int32, ("length",), PAD_ID),
    "loss_mask": Field(np.float32, ("length",), 0.0),
    "attention_mask": Field(np.int32, ("length",), 0),
    "image_mask": Field(np.bool_, ("length",), False),
    "segment_ids": Field(np.int32, ("length",), 0),
    "positions": Field(np.int32, ("length",), 0),
    "pixel_values": Field(np.float32, ("tiles", "image_size", "image_size", "channels"), 0.0),
    "tile_mask": Field(np.bool_, ("tiles",), False),
    "sample_id": Field(np.int64, ("samples",), -1),
}
KEYS = tuple(FIELDS)
SEQUENCE_KEYS = tuple(key for key, field in FIELDS.items() if field.dims == ("length",))
TILE_KEYS = tuple(key for key, field in FIELDS.items() if field.dims[:1] == ("tiles",))
SEGMENT_KEYS = ("segment_ids", "positions")  # what a packer writes, not the samples
# MultimodalLM.prefill's arguments (prompts: one per row, left-padded), then __call__'s.
PREFILL_INPUTS = ("input_ids", "image_mask", "pixel_values", "attention_mask")
MODEL_INPUTS = (*PREFILL_INPUTS, *SEGMENT_KEYS)
STEP_KEYS = (*MODEL_INPUTS, "target_ids", "loss_mask")

NO_PACKING = "none"  # data.packing of one sample per row
# Positions a sample takes at least (a template, a question, an answer): K's default.
MIN_SAMPLE_POSITIONS = 16


def tiles_per_sample(aspect_mode: str, patch_num: int) -> int:
    """N: 1, or for ``slice`` (TokenPacker-HD) the most tiles an image can take."""
    return hd.max_tiles(patch_num) if aspect_mode == "slice" else 1


def max_tiles(data_config: Any) -> int:
    """N of ``config.data``."""
    return tiles_per_sample(data_config.image.aspect_mode, int(data_config.hd.patch_num))


def is_packed(data_config: Any) -> bool:
    """Whether ``config.data`` packs several samples per row."""
    return data_config.get("packing", NO_PACKING) != NO_PACKING


@dataclasses.dataclass(frozen=True)
class Dims:
    """Per-row sizes: T positions, N tiles of S x S pixels with C channels, and K samples
    (None: one sample per row)."""

    length: int
    tiles: int
    image_size: int
    channels: int = 3
    samples: int | None = None

    @classmethod
    def of_config(cls, config: Any) -> Dims:
        """The sizes the data pipeline produces for a run config."""
        return cls.of_data(config.data)

    @classmethod
    def of_data(cls, data_config: Any) -> Dims:
        """The sizes the data pipeline produces for ``config.data``: packed, N =
        ``max_images_per_row`` (at least one sample's tiles) and K = ``max_samples_per_row``
        (0: T / 16)."""
        length, tiles = int(data_config.max_length), max_tiles(data_config)
        size = int(data_config.image.image_size)
        if not is_packed(data_config):
            return cls(length, tiles, size)
        per_row = int(data_config.get("max_images_per_row", 0))
        if per_row < tiles:
            raise ValueError(f"data.max_images_per_row: {per_row} tile slots per packed row "
                             f"hold less than one sample's {tiles} (with data.packing="
                             f"{data_config.packing}, set the slots a row has; "
                             "python -m tokenpacker_jax.data.stats shows how many rows take)")
        samples = int(data_config.get("max_samples_per_row", 0)) or max(
            1, length // MIN_SAMPLE_POSITIONS)
        return cls(length, per_row, size, samples=samples)

    @classmethod
    def of_model(cls, model_config: Any, length: int, tiles: int = 1) -> Dims:
        """Sizes of inputs for an ``MLLMConfig``'s tower."""
        vision = model_config.vision
        return cls(length, tiles, vision.image_size, vision.num_channels)

    def shape(self, key: str) -> tuple[int, ...]:
        """The per-row shape of ``key``."""
        return tuple(getattr(self, name) for name in FIELDS[key].dims
                     if getattr(self, name) is not None)


def select(batch: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """``batch`` restricted to ``keys`` (e.g. MODEL_INPUTS, STEP_KEYS)."""
    return {key: batch[key] for key in keys}


def padding_row(dims: Dims, pad_id: int, keys: Sequence[str] = KEYS) -> dict[str, np.ndarray]:
    """One all-padding sample: every mask zero, ids the pad id, sample_id -1."""
    return {key: np.full(dims.shape(key), pad_id if FIELDS[key].fill == PAD_ID
                         else FIELDS[key].fill, FIELDS[key].dtype) for key in keys}


def collate(examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows -> a batch: every key stacked on a new leading axis."""
    return {key: np.stack([example[key] for example in examples]) for key in KEYS}



def pad_rows(rows: Sequence[Sequence[Any]], fill: Any, length: int | None = None, *,
             side: str = "left", dtype: Any = np.int32) -> tuple[np.ndarray, np.ndarray]:
    """Rows of different lengths as one array [B, L] (L = ``length``, default the longest)
    padded with ``fill``, and the mask of the rows' own entries [B, L] int32.

    Left padding is the decoding convention (see ``models.decoder``); right padding is the
    usual one for training.
    """
    if side not in ("left", "right"):
        raise ValueError(f"pad side must be 'left' or 'right', got {side!r}")
    longest = max((len(row) for row in rows), default=0)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a sequence of {longest} tokens does not fit length {length}")
    out = np.full((len(rows), length), fill, dtype)
    mask = np.zeros((len(rows), length), np.int32)
    for index, row in enumerate(rows):
        start = length - len(row) if side == "left" else 0
        out[index, start:start + len(row)] = row
        mask[index, start:start + len(row)] = 1
    return out, mask


def abstract_batch(dims: Dims, batch_size: int, mesh: jax.sharding.Mesh | None = None,
                   keys: Sequence[str] = STEP_KEYS) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a global batch, with the batch axis over the mesh's (data, fsdp)
    axes when ``mesh`` is given: what the training step is lowered on."""

    def struct(key):
        shape = (batch_size, *dims.shape(key))
        return jax.ShapeDtypeStruct(
            shape, FIELDS[key].dtype,
            sharding=None if mesh is None else sharding.batch_sharding(mesh, len(shape)))

    return {key: struct(key) for key in keys}


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
        target = (shardings or {}).get(name) or sharding.batch_sharding(mesh, value.ndim)
        shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        arrays[name] = jax.make_array_from_process_local_data(target, value, shape)
    return arrays



def example_inputs(dims: Dims, batch_size: int = 1) -> dict[str, np.ndarray]:
    """Model inputs for ``init`` / ``eval_shape``: zeros, every position attended (one
    sample per row, so that a forward over them is well defined). Parameter shapes depend on
    S, C and N only."""
    inputs = {key: np.zeros((batch_size, *dims.shape(key)), FIELDS[key].dtype)
              for key in MODEL_INPUTS}
    inputs["attention_mask"][:] = 1
    inputs["segment_ids"][:] = 1
    inputs["positions"][:] = np.arange(dims.length)
    return inputs


def synthetic_batch(dims: Dims, batch_size: int, *, visual_tokens: int, vocab_size: int,
                    seed: int = 0, image_every: int = 1, bos_id: int = 1,
                    pad_id: int = 0) -> dict[str, np.ndarray]:
    """A generated batch of the contract's keys for benchmarks and tests: every row is one
    sample [BOS, ``visual_tokens`` visual positions, random text ids in 3..vocab_size), the
    text after the image supervised; rows 0, ``image_every``, 2 * ``image_every``, ... carry
    an image (one tile of random pixels; the other rows' image positions are text), no
    padding. ``dims.samples`` set: ``sample_id`` [K] lists the row's one sample."""
    length = dims.length
    if visual_tokens + 2 > length:
        raise ValueError(f"a sample of {length} positions cannot hold {visual_tokens} visual "
                         f"tokens")
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, (batch_size, length)).astype(np.int32)
    ids[:, 0] = bos_id
    image_mask = np.zeros((batch_size, length), bool)
    image_mask[::image_every, 1:1 + visual_tokens] = True
    ids[image_mask] = pad_id
    loss_mask = np.zeros((batch_size, length), np.float32)
    loss_mask[:, 1 + visual_tokens:-1] = 1.0
    tile_mask = np.zeros((batch_size, dims.tiles), bool)
    tile_mask[::image_every, 0] = True
    pixels = rng.standard_normal((batch_size, *dims.shape("pixel_values")), np.float32)
    sample_id = np.full((batch_size, *dims.shape("sample_id")), -1, np.int64)
    sample_id.reshape(batch_size, -1)[:, 0] = np.arange(batch_size)
    return dict(
        input_ids=ids, target_ids=np.roll(ids, -1, axis=1), loss_mask=loss_mask,
        attention_mask=np.ones((batch_size, length), np.int32), image_mask=image_mask,
        segment_ids=np.ones((batch_size, length), np.int32),
        positions=np.tile(np.arange(length, dtype=np.int32), (batch_size, 1)),
        pixel_values=pixels, tile_mask=tile_mask, sample_id=sample_id)
