"""The example builder on its own (``data/example.py``), one record at a time: an HD image's
tiles and positions follow the layout, the HD separator ids come from the tokenizer, and
truncation to max_length keeps an image whole or drops it whole."""

import numpy as np
import pytest

from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.data import errors, hd
from tokenpacker_jax.data import example as example_lib
from tokenpacker_jax.data.conversation import ConversationTokenizer, parse_turns
from tokenpacker_jax.data.errors import DataError
from tokenpacker_jax.data.example import ExampleBuilder, ImageSettings
from tokenpacker_jax.data.image import normalize
from tokenpacker_jax.data.llava import SourceRecord

import data_helpers
from data_helpers import TOKENS_PER_TILE, data_config

# The generated set's tokenizer (test_data_pipeline's too).
tokenizer = data_helpers.synthetic_tokenizer
synthetic_dir = data_helpers.synthetic_dir


def vicuna_builder(tokenizer, *, mode="square", max_length=256, comma=7, newline=9):
    settings = ImageSettings(mode=mode, size=48, patch_num=9, comma_id=comma,
                             newline_id=newline)
    return ExampleBuilder(ConversationTokenizer("vicuna_v1", tokenizer), settings, TOKENS_PER_TILE,
                          max_length)


def image_record(index, image, conversation=None):
    conversation = conversation or [{"from": "human", "value": "<image>\nWhat is it?"},
                                    {"from": "gpt", "value": "a red circle"}]
    return SourceRecord(index, f"test #{index}", {"id": f"r{index}",
                                                  "conversations": conversation},
                        image=image)


def test_hd_slice_positions_follow_the_layout(tokenizer):
    builder = vicuna_builder(tokenizer, mode="slice")
    wide = np.random.default_rng(0).integers(0, 255, (40, 110, 3), dtype=np.uint8)
    example = builder.build(image_record(3, wide))
    rows, cols = hd.select_hd_grid(40, 110, 9, tile_size=48)
    assert rows * cols > 1
    tiles = rows * cols + 1
    assert example["tile_mask"].sum() == tiles and example["pixel_values"].shape == (10, 48,
                                                                                      48, 3)
    layout = hd.hd_layout(rows, cols, TOKENS_PER_TILE)
    start = int(np.flatnonzero(example["image_mask"])[0])
    span = slice(start, start + layout.length)
    np.testing.assert_array_equal(example["image_mask"][span], layout.kind == hd.TILE)
    assert example["image_mask"].sum() == tiles * TOKENS_PER_TILE
    ids = example["input_ids"][span]
    assert (ids[layout.kind == hd.COMMA] == 7).all() and (ids[layout.kind == hd.NEWLINE]
                                                           == 9).all()
    assert (layout.kind == hd.COMMA).sum() == rows * (cols - 1)
    assert not example["loss_mask"][start - 1:span.stop].any()
    reference = hd.hd_tiles(normalize(wide, builder.image.mean, builder.image.std), 9,
                            tile_size=48, num_slots=10)
    np.testing.assert_array_equal(example["pixel_values"], reference.pixels)


def test_hd_separator_ids_from_the_tokenizer(tokenizer):
    config = data_config(**{"image.aspect_mode": "slice"})
    settings = example_lib.image_settings(config, tokenizer)
    assert settings.comma_id == tokenizer.encode(",", add_bos=False)[-1]
    assert settings.newline_id == tokenizer.encode("\n", add_bos=False)[-1]
    assert batch_lib.max_tiles(config) == 10


def conversation_length(builder, record):
    turns = parse_turns(record.record["conversations"], has_image=True)
    return len(builder.conversation(turns).ids) - 1 + TOKENS_PER_TILE


def test_truncation_keeps_images_whole(tokenizer):
    long_conversation = [{"from": "human", "value": "<image>\nWhat is it?"},
                         {"from": "gpt", "value": "a red circle"}] + [
        {"from": "human", "value": "and where is the blue square?"},
        {"from": "gpt", "value": "at the top left of the image"}] * 6
    image = np.zeros((48, 48, 3), np.uint8)
    record = image_record(0, image, long_conversation)
    full = conversation_length(vicuna_builder(tokenizer, max_length=2048), record)
    # A cut after the image: truncated to max_length, the last target is the next token.
    untruncated = vicuna_builder(tokenizer, max_length=full + 5).build(record)
    cut = full - 20
    example = vicuna_builder(tokenizer, max_length=cut).build(record)
    assert example["attention_mask"].all() and example["tile_mask"].all()
    for key in ("input_ids", "loss_mask", "image_mask"):
        np.testing.assert_array_equal(example[key], untruncated[key][:cut])
    assert example["target_ids"][-1] == untruncated["target_ids"][cut - 1]
    # A cut inside the image's positions: rejected.
    start = int(np.flatnonzero(untruncated["image_mask"])[0])
    with pytest.raises(DataError) as info:
        vicuna_builder(tokenizer, max_length=start + 5).build(record)
    assert info.value.reason == errors.TOO_LONG and "inside the image" in str(info.value)


def test_truncation_before_a_late_image_drops_it(tokenizer):
    conversation = [{"from": "human", "value": "what is a circle?"},
                    {"from": "gpt", "value": "a round shape"},
                    {"from": "human", "value": "<image>\nand this one?"},
                    {"from": "gpt", "value": "a square"}]
    record = image_record(0, np.zeros((48, 48, 3), np.uint8), conversation)
    whole = vicuna_builder(tokenizer, max_length=512).build(record)
    start = int(np.flatnonzero(whole["image_mask"])[0])
    example = vicuna_builder(tokenizer, max_length=start).build(record)
    assert not example["tile_mask"].any() and not example["image_mask"].any()
    assert example["loss_mask"].sum() == whole["loss_mask"][:start].sum() > 0
    # Cut before any answer: nothing to learn, rejected.
    with pytest.raises(DataError, match="no answer token"):
        vicuna_builder(tokenizer, max_length=20).build(record)
