"""One record -> one training example of static shapes (``tokenpacker_jax.data.batch``
defines its arrays; ``tokenpacker_jax.data.pipeline`` batches them).

What the arrays hold, with T = max_length: ``target_ids`` is ``input_ids`` shifted left (at
the last kept position of a truncated sample, the first token cut off); ``loss_mask`` is 1
for answers and their end marker, 0 at padding and where the target is visual.

The image slot of the conversation becomes ``tokens_per_tile`` visual positions
(``square``/``pad``), or for ``slice`` (TokenPacker-HD, docs/reference.md §4) the tiles'
tokens row by row with the ',' id between the tiles of a row and the '\\n' id closing each
row, then the global view's tokens and '\\n' (``tokenpacker_jax.data.hd.hd_layout``); the
k-th visual position takes visual token k of the sample (its valid tiles' tokens in tile
order).

Truncation to T never cuts inside an image's positions (separators included): a sample
whose cut would is rejected (``too_long``), as is one left without a supervised token. An
image whose positions all lie past the cut is dropped with them (no tiles, no positions).

``example_builder(config.data, tokenizer, tokens_per_tile)`` makes the builder of a run
(its template, ``image_settings`` and lengths); ``tokens_per_tile`` is the projector's M
for a model config.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.data import errors, hd
from tokenpacker_jax.data.conversation import (
    IMAGE_TOKEN_ID,
    ConversationTokenizer,
    get_template,
    parse_turns,
)
from tokenpacker_jax.data.errors import DataError
from tokenpacker_jax.data.image import ImageError, load_image, normalize, preprocess, to_rgb
from tokenpacker_jax.data.llava import SourceRecord
from tokenpacker_jax.data.text_tokenizer import text_tokenizer
from tokenpacker_jax.models.projectors import num_output_tokens


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """How images become tiles and positions.

    mode: square | pad | slice.  size: tile side S.  patch_num: HD candidate list (slice).
    comma_id / newline_id: HD separator ids.  global_view: the HD global view,
    ``reference_canvas`` (the reference's) or ``fit_image`` (see ``tokenpacker_jax.data.hd``).
    """

    mode: str = "square"
    size: int = 336
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    patch_num: int = 9
    comma_id: int = hd.COMMA_TOKEN_ID
    newline_id: int = hd.NEWLINE_TOKEN_ID
    global_view: str = hd.REFERENCE_CANVAS

    @property
    def max_tiles(self) -> int:
        return batch_lib.tiles_per_sample(self.mode, self.patch_num)


@dataclasses.dataclass(frozen=True)
class Truncated:
    """Stands in the stream for an example cut at max_length: counted, then used."""

    example: dict
    length: int  # positions before the cut


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Stands in the stream for a record that could not be used."""

    error: DataError
    sample_id: int


def _open_image(source: SourceRecord, image_folder: str) -> tuple[Image.Image, str]:
    """The record's image and a name for it in messages."""
    if source.image is not None:  # supplied by the source (TFDS): pixels or encoded bytes
        name = f"{source.where} image"
        try:
            if isinstance(source.image, (bytes, bytearray)):
                with Image.open(io.BytesIO(source.image)) as image:
                    image.load()
                    return image.copy(), name
            pixels = np.asarray(source.image)
            if pixels.ndim == 3 and pixels.shape[-1] == 1:
                pixels = pixels[..., 0]
            return Image.fromarray(pixels), name
        except (OSError, ValueError, TypeError, Image.DecompressionBombError) as err:
            raise DataError(errors.CORRUPT_IMAGE, f"{name}: cannot decode ({err})") from err
    relative = source.record["image"]
    if not isinstance(relative, str):
        raise DataError(errors.BAD_RECORD, f"'image' must be one path (one image per "
                                           f"sample), got {relative!r:.80}")
    path = os.path.join(image_folder, relative)
    try:
        return load_image(path), path
    except ImageError as err:
        reason = (errors.MISSING_IMAGE if isinstance(err.__cause__, FileNotFoundError)
                  else errors.CORRUPT_IMAGE)
        raise DataError(reason, str(err)) from err
    except Image.DecompressionBombError as err:
        raise DataError(errors.CORRUPT_IMAGE, f"{path}: {err}") from err


def splice_image(ids: Sequence[int], supervised: Sequence[bool], span_ids: np.ndarray | None,
                 span_visual: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int] | None]:
    """Text ids with the image slot (``IMAGE_TOKEN_ID``) -> the image's positions in its place.

    Args:
      ids, supervised: [L] the text's ids and supervision.
      span_ids, span_visual: [P] the image's positions (``ExampleBuilder.image_tiles``), or
        None for a sample without an image.
    Returns:
      (ids int64 [L - 1 + P], supervised bool, visual bool (True where a visual token goes),
      the image's (start, end) or None).
    Raises DataError (bad_record) when the ids hold no slot for the image, or a slot for none.
    """
    ids = np.asarray(ids, np.int64)
    supervised = np.asarray(supervised, bool)
    slots = np.flatnonzero(ids == IMAGE_TOKEN_ID)
    if len(slots) != (0 if span_ids is None else 1):
        raise DataError(errors.BAD_RECORD, f"{len(slots)} image slots in the tokens for "
                                           f"{0 if span_ids is None else 1} image")
    visual = np.zeros(len(ids), bool)
    if span_ids is None:
        return ids, supervised, visual, None
    slot = int(slots[0])
    ids = np.concatenate([ids[:slot], span_ids, ids[slot + 1:]])
    supervised = np.concatenate([supervised[:slot], np.zeros(len(span_ids), bool),
                                 supervised[slot + 1:]])
    visual = np.concatenate([visual[:slot], span_visual, visual[slot + 1:]])
    return ids, supervised, visual, (slot, slot + len(span_ids))


class ExampleBuilder:
    """Callable: SourceRecord -> example dict (see the module docstring) or ``Skipped``.

    Picklable, so grain can run it in worker processes.

    Args:
      conversation: the template + tokenizer.
      image: ImageSettings.
      tokens_per_tile: visual tokens per tile (the projector's output count).
      max_length: T.
      image_folder: what image paths in records are relative to.
    """

    def __init__(self, conversation: ConversationTokenizer, image: ImageSettings,
                 tokens_per_tile: int, max_length: int, image_folder: str = ""):
        if image.mode not in ("square", "pad", "slice"):
            raise ValueError(f"image mode must be square, pad or slice, got {image.mode!r}")
        hd.check_global_view(image.global_view)
        self.conversation = conversation
        self.image = image
        self.tokens_per_tile = int(tokens_per_tile)
        self.max_length = int(max_length)
        self.image_folder = image_folder
        self.pad_id = conversation.tokenizer.pad_id
        self.dims = batch_lib.Dims(self.max_length, image.max_tiles, image.size)

    def __call__(self, source: SourceRecord) -> dict[str, np.ndarray] | Truncated | Skipped:
        """The stream's element for ``source``: its example, ``Truncated`` around it when it
        was cut at max_length, or ``Skipped`` (with the record's name) when it cannot be used."""
        try:
            example, length = self.build_with_length(source)
            return Truncated(example, length) if length > self.max_length else example
        except DataError as err:
            return Skipped(err.with_record(source.describe()), source.index)

    def padding_example(self) -> dict[str, np.ndarray]:
        """An all-padding row (every mask zero, sample_id -1)."""
        return batch_lib.padding_row(self.dims, self.pad_id)

    def build(self, source: SourceRecord) -> dict[str, np.ndarray]:
        """Raises DataError (without the record's name) for a record that cannot be used."""
        return self.build_with_length(source)[0]

    def build_with_length(self, source: SourceRecord) -> tuple[dict[str, np.ndarray], int]:
        """``build``, and the sample's positions before any cut at max_length."""
        if source.error is not None:
            raise DataError(source.error_reason, source.error)
        record = source.record
        if not isinstance(record, dict):
            raise DataError(errors.BAD_RECORD, f"a record must be a JSON object, got "
                                               f"{type(record).__name__}")
        has_image = source.image is not None or record.get("image") not in (None, "")
        turns = parse_turns(record.get("conversations"), has_image=has_image)
        tokens = self.conversation(turns)
        pixels, tile_mask = self.no_image()
        span_ids = span_visual = None
        if has_image:
            image, name = _open_image(source, self.image_folder)
            pixels, tile_mask, span_ids, span_visual = self.image_tiles(image, name)
        example = self.assemble(tokens.ids, tokens.supervised, span_ids, span_visual)
        if not example.pop("image_kept"):
            tile_mask = np.zeros_like(tile_mask)
        example.update(pixel_values=pixels, tile_mask=tile_mask,
                       sample_id=np.int64(source.index))
        return example, example.pop("length")

    def no_image(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixels [N, S, S, 3] and tile mask [N] of a sample without an image (zeros)."""
        row = batch_lib.padding_row(self.dims, self.pad_id, ("pixel_values", "tile_mask"))
        return row["pixel_values"], row["tile_mask"]

    def image_tiles(self, image: Image.Image, name: str = "image"
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Pixels [N, S, S, 3], tile mask [N], and the image's positions: ids [L] (pad at
        visual positions, separator ids between) and visual [L] bool."""
        settings, g = self.image, self.tokens_per_tile
        try:
            if settings.mode != "slice":
                pixels = preprocess(image, mode=settings.mode, image_size=settings.size,
                                    mean=settings.mean, std=settings.std)[None]
                return (pixels, np.ones(1, bool), np.full(g, self.pad_id, np.int32),
                        np.ones(g, bool))
            full = normalize(np.asarray(to_rgb(image)), settings.mean, settings.std)
            tiles = hd.hd_tiles(full, settings.patch_num, tile_size=settings.size,
                                num_slots=settings.max_tiles,
                                global_view=settings.global_view)
        except (ImageError, ValueError) as err:
            raise DataError(errors.CORRUPT_IMAGE, f"{name}: {err}") from err
        layout = hd.hd_layout(*tiles.grid, g)
        ids = layout.token_ids(settings.comma_id, settings.newline_id, fill=self.pad_id)
        return tiles.pixels, tiles.mask, ids, layout.kind == hd.TILE

    def assemble(self, ids: Sequence[int], supervised: Sequence[bool],
                 span_ids: np.ndarray | None, span_visual: np.ndarray | None
                 ) -> dict[str, Any]:
        """Text ids with the image slot -> the padded sequence arrays (+ ``image_kept``,
        and ``length``: the positions before any cut)."""
        ids, supervised, visual, span = splice_image(ids, supervised, span_ids, span_visual)
        length = len(ids)
        target = np.full(length, self.pad_id, np.int64)
        target[:-1] = ids[1:]
        loss = np.zeros(length, bool)
        loss[:-1] = supervised[1:]
        kept = length
        image_kept = span is not None
        if length > self.max_length:
            kept = self.max_length
            if span is not None and span[0] < kept < span[1]:
                raise DataError(errors.TOO_LONG, f"{length} positions > max_length "
                                                 f"{kept}, and the cut falls inside the "
                                                 f"image's positions {span[0]}..{span[1]}")
            if span is not None and span[0] >= kept:
                image_kept = False
            if not loss[:kept].any():
                raise DataError(errors.TOO_LONG, f"{length} positions > max_length {kept}, "
                                                 f"and no answer token is left before the cut")
        if (ids[:kept] < 0).any():
            raise DataError(errors.TOKENIZATION, "negative token id in the sequence")
        pad = batch_lib.padding_row(self.dims, self.pad_id, batch_lib.SEQUENCE_KEYS)

        def padded(key, values):
            return np.concatenate([values[:kept], pad[key][kept:]]).astype(pad[key].dtype)

        return dict(
            input_ids=padded("input_ids", ids),
            target_ids=padded("target_ids", target),
            loss_mask=padded("loss_mask", loss),
            attention_mask=padded("attention_mask", np.ones(length)),
            image_mask=padded("image_mask", visual),
            segment_ids=padded("segment_ids", np.ones(length)),
            positions=padded("positions", np.arange(length)),
            image_kept=image_kept, length=length)


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


def tokens_per_tile(model_config: Any) -> int:
    """Visual tokens per image tile of an ``MLLMConfig`` (the projector's output count)."""
    return num_output_tokens(model_config.projector, model_config.vision.grid_size)
