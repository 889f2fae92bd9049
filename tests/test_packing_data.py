"""Packed rows from the grain pipeline: each segment is its sample's example as the unpacked
pipeline builds it, the budgets hold (positions, tile slots, samples), samples are whole,
truncated and deferred samples are counted, HD tiles of varying counts pack, the state
resumes mid-row-group, evaluation streams pad on."""

import json

import numpy as np
import pytest
from PIL import Image

from tokenpacker_jax.data import bad_records, pipeline, synthetic
from tokenpacker_jax.data import example as example_lib
from tokenpacker_jax.data.llava import LlavaSource
from tokenpacker_jax.tokenizer import load_tokenizer

from data_helpers import TOKENS_PER_TILE, data_config

NUM = 120


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(str(out), NUM, seed=3, num_eval=24, size=48, tokenizer_vocab=512)
    # Two text-only samples and one far longer than a row join the records.
    records = json.loads((out / "train_qa.json").read_text())
    text = [{"from": "human", "value": "what is a circle?"},
            {"from": "gpt", "value": "a round shape"}]
    records += [{"id": f"text-{i}", "conversations": text} for i in range(2)]
    records.append({**records[0], "id": "long", "conversations": records[0]["conversations"]
                    + [{"from": "human", "value": "and the digit again?"},
                       {"from": "gpt", "value": "it is the digit shown " * 30}]})
    (out / "train_mixed.json").write_text(json.dumps(records))
    return out


@pytest.fixture(scope="module")
def tokenizer(synthetic_dir):
    return load_tokenizer(synthetic_dir / "tokenizer")


def config_for(synthetic_dir, **overrides):
    base = {"files.train": str(synthetic_dir / "train_mixed.json"),
            "files.val": str(synthetic_dir / "val_qa.json"), "image_folder": str(synthetic_dir),
            "batch_size": 4, "read_threads": 2, "template": "vicuna_v1",
            "image.aspect_mode": "square", "max_length": 256, "packing": "first_fit",
            "system_prompt": "",
            "max_images_per_row": 2, "max_samples_per_row": 5}
    return data_config(**{**base, **overrides})


def rows(config, tokenizer, count, split="train", **kwargs):
    iterator = iter(pipeline.make_rows(config, tokenizer, TOKENS_PER_TILE, split, process_index=0,
                                       process_count=1, **kwargs))
    return [next(iterator) for _ in range(count)], iterator


def check_segments(row, builder, source):
    """Segment k of the row is sample_id[k - 1]'s example, cut to its positions and tiles."""
    ids = [int(i) for i in row["sample_id"] if i >= 0]
    assert (row["sample_id"][len(ids):] == -1).all()
    slot = tile = 0
    for segment, sample_id in enumerate(ids, 1):
        example = builder.build(source[sample_id])
        length, tiles = int(example["attention_mask"].sum()), int(example["tile_mask"].sum())
        where = slice(slot, slot + length)
        assert (row["segment_ids"][where] == segment).all()
        np.testing.assert_array_equal(row["positions"][where], np.arange(length))
        for key in ("input_ids", "target_ids", "loss_mask", "attention_mask", "image_mask"):
            np.testing.assert_array_equal(row[key][where], example[key][:length], err_msg=key)
        np.testing.assert_array_equal(row["pixel_values"][tile:tile + tiles],
                                      example["pixel_values"][:tiles])
        slot, tile = slot + length, tile + tiles
    assert (row["segment_ids"][slot:] == 0).all() and not row["attention_mask"][slot:].any()
    assert not row["loss_mask"][slot:].any() and not row["image_mask"][slot:].any()
    assert (row["input_ids"][slot:] == builder.pad_id).all()
    assert row["tile_mask"][:tile].all() and not row["tile_mask"][tile:].any()
    assert not row["pixel_values"][tile:].any()
    # The row's visual positions are as many as its tiles' tokens, in the tiles' order.
    assert int(row["image_mask"].sum()) == tile * TOKENS_PER_TILE
    return ids


def test_rows_hold_whole_samples_within_the_budgets(synthetic_dir, tokenizer):
    config = config_for(synthetic_dir)
    got, iterator = rows(config, tokenizer, 40)
    builder = example_lib.example_builder(config, tokenizer, TOKENS_PER_TILE)
    source = LlavaSource([str(synthetic_dir / "train_mixed.json")])
    seen = []
    for row in got:
        assert row["input_ids"].shape == (256,) and row["pixel_values"].shape == (2, 48, 48, 3)
        assert row["sample_id"].shape == (5,)
        seen += check_segments(row, builder, source)
    assert len(seen) == len(set(seen)) > 40  # several samples a row, none twice
    assert {NUM, NUM + 1} <= set(seen)  # text-only ones (no tiles) among them
    real = np.mean([row["attention_mask"].mean() for row in got])
    assert real > 0.7, real
    counts = bad_records.record_counts(iterator)
    # 2 tile slots bind (the samples are short): samples went to later rows; the long
    # sample was cut.
    assert counts["truncated"] == 1 and counts["deferred_by_tiles"] > 0
    assert NUM + 2 in seen


def test_deferred_count_is_zero_when_tiles_do_not_bind(synthetic_dir, tokenizer):
    config = config_for(synthetic_dir, max_images_per_row=8, max_samples_per_row=12)
    got, iterator = rows(config, tokenizer, 12)
    assert bad_records.record_counts(iterator)["deferred_by_tiles"] == 0
    assert max(int(row["tile_mask"].sum()) for row in got) < 8  # positions bind first


def test_best_fit_and_hd_tiles(synthetic_dir, tokenizer, tmp_path):
    """Images of several aspect ratios take 2 to 4 tiles (+ the global view) in HD; rows
    take them whole, up to 12 tile slots."""
    records = json.loads((synthetic_dir / "train_qa.json").read_text())[:24]
    rng = np.random.default_rng(0)
    for index, record in enumerate(records):
        height, width = (48, 48 * int(rng.integers(1, 4)))
        path = tmp_path / f"wide{index}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8)).save(path)
        record["image"] = str(path)
    (tmp_path / "hd.json").write_text(json.dumps(records))
    config = config_for(synthetic_dir, **{"files.train": str(tmp_path / "hd.json"),
                                          "image.aspect_mode": "slice", "hd.patch_num": 9,
                                          "max_length": 640, "max_images_per_row": 12,
                                          "packing": "best_fit"})
    got, _ = rows(config, tokenizer, 6)
    builder = example_lib.example_builder(config, tokenizer, TOKENS_PER_TILE)
    source = LlavaSource([str(tmp_path / "hd.json")])
    tiles = []
    for row in got:
        assert row["pixel_values"].shape == (12, 48, 48, 3)
        for sample_id in check_segments(row, builder, source):
            tiles.append(int(builder.build(source[sample_id])["tile_mask"].sum()))
    assert len(set(tiles)) > 1 and max(tiles) > 1


def test_state_resumes_inside_a_group_of_rows(synthetic_dir, tokenizer):
    """The packer fills 4 rows at a time: a state taken after row 6 (inside a group)
    restores to the same rows and counts as an uninterrupted run."""
    config = config_for(synthetic_dir)
    expected, reference = rows(config, tokenizer, 14, seed=5)
    _, iterator = rows(config, tokenizer, 6, seed=5)
    state = json.loads(json.dumps(iterator.get_state()))
    resumed = iter(pipeline.make_rows(config, tokenizer, TOKENS_PER_TILE, "train", seed=5,
                                      process_index=0, process_count=1))
    resumed.set_state(state)
    for want in expected[6:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert bad_records.record_counts(resumed) == bad_records.record_counts(reference)


def test_batches_and_evaluation_padding(synthetic_dir, tokenizer):
    """Training batches stack rows; an evaluation split packs too and, once its rows run
    out, yields padding batches without end (hosts pack different numbers of rows)."""
    config = config_for(synthetic_dir)
    batch = next(iter(pipeline.make_dataset(config, tokenizer, TOKENS_PER_TILE, "train",
                                            process_index=0, process_count=1)))
    assert batch["segment_ids"].shape == (4, 256) and batch["sample_id"].shape == (4, 5)
    evaluation = iter(pipeline.make_dataset(config, tokenizer, TOKENS_PER_TILE, "val",
                                            process_index=0, process_count=1))
    batches = [next(evaluation) for _ in range(8)]
    ids = np.concatenate([b["sample_id"].ravel() for b in batches])
    assert sorted(ids[ids >= 0].tolist()) == list(range(24))
    assert not batches[-1]["attention_mask"].any() and (batches[-1]["sample_id"] == -1).all()
    assert batches[-1]["pixel_values"].shape == (4, 2, 48, 48, 3)
