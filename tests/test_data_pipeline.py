"""The grain pipeline on a 200-sample synthetic set: the batch contract, exactly-once epochs,
resuming from a saved state, per-host shards, evaluation padding, worker processes, global
arrays, text-only records among image records; the LLaVA source's and the data config's
errors. (One record at a time through the example builder: test_data_example.py.)"""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from tokenpacker_jax.configs import tiny
from tokenpacker_jax.configuration import ConfigError, validate
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.data import pipeline
from tokenpacker_jax.data.image import preprocess
from tokenpacker_jax.data.llava import LlavaSource

import data_helpers
from data_helpers import TOKENS_PER_TILE, data_config

NUM = 200  # records of the generated set (data_helpers.synthetic_dir)

# The generated set and its tokenizer (test_data_example's too).
synthetic_dir = data_helpers.synthetic_dir
tokenizer = data_helpers.synthetic_tokenizer


@pytest.fixture(scope="module")
def records(synthetic_dir):
    return json.loads((synthetic_dir / "train_qa.json").read_text())


def config_for(synthetic_dir, **overrides):
    base = {"files.train": str(synthetic_dir / "train_qa.json"),
            "files.val": str(synthetic_dir / "val_qa.json"),
            "image_folder": str(synthetic_dir), "batch_size": 8, "read_threads": 2,
            "template": "vicuna_v1", "image.aspect_mode": "square", "max_length": 256}
    return data_config(**{**base, **overrides})


def batches(config, tokenizer, split="train", count=None, **kwargs):
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    iterator = iter(pipeline.make_dataset(config, tokenizer, TOKENS_PER_TILE, split, **kwargs))
    try:
        if count is None:
            return list(iterator)
        return [next(iterator) for _ in range(count)]
    finally:
        iterator.close()


def test_batch_contract(synthetic_dir, tokenizer, records):
    config = config_for(synthetic_dir)
    batch = batches(config, tokenizer, count=1)[0]
    b, t = 8, config.max_length
    expected = {"input_ids": ((b, t), np.int32), "target_ids": ((b, t), np.int32),
                "loss_mask": ((b, t), np.float32), "attention_mask": ((b, t), np.int32),
                "image_mask": ((b, t), np.bool_), "pixel_values": ((b, 1, 48, 48, 3),
                                                                    np.float32),
                "tile_mask": ((b, 1), np.bool_), "sample_id": ((b,), np.int64),
                "segment_ids": ((b, t), np.int32), "positions": ((b, t), np.int32)}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    pad = tokenizer.pad_id
    for row in range(b):
        ids, target = batch["input_ids"][row], batch["target_ids"][row]
        attention, image = batch["attention_mask"][row], batch["image_mask"][row]
        loss = batch["loss_mask"][row]
        length = int(attention.sum())
        assert (attention[:length] == 1).all() and (attention[length:] == 0).all()
        assert (target[:-1] == ids[1:]).all() and target[length - 1] == pad
        assert image.sum() == TOKENS_PER_TILE * batch["tile_mask"][row].sum() == TOKENS_PER_TILE
        assert (ids[image] == pad).all() and (ids[length:] == pad).all()
        # Supervised targets are real text tokens, never visual or padding.
        supervised = loss == 1
        assert (attention[1:][supervised[:-1]] == 1).all()
        assert not image[1:][supervised[:-1]].any() and not supervised[length - 1:].any()
        # ... and decode to exactly the record's answers, each closed by </s>.
        record = records[int(batch["sample_id"][row])]
        answers = [turn["value"] for turn in record["conversations"][1::2]]
        text = tokenizer.decode(target[supervised], skip_special_tokens=False)
        assert text.replace("</s> ", "</s>") == "</s>".join(answers) + "</s>"
        # The image is the record's image, preprocessed (pad mode of the tiny config's
        # square default: CLIP-normalised pixels of the right file).
        pixels = batch["pixel_values"][row, 0]
        image_file = Image.open(synthetic_dir / record["image"])
        np.testing.assert_array_equal(pixels, preprocess(image_file, mode="square",
                                                         image_size=48))


def sample_ids(batch_list):
    return np.concatenate([b["sample_id"] for b in batch_list])


def test_two_epochs_every_sample_exactly_once(synthetic_dir, tokenizer):
    config = config_for(synthetic_dir)
    result = batches(config, tokenizer, num_epochs=2, seed=3)
    assert len(result) == 2 * NUM // 8
    ids = sample_ids(result)
    first, second = ids[:NUM], ids[NUM:]
    assert sorted(first) == list(range(NUM)) and sorted(second) == list(range(NUM))
    assert (first != second).any() and (first != np.arange(NUM)).any()
    # The same seed gives the same order; another seed another.
    again = sample_ids(batches(config, tokenizer, count=5, seed=3))
    other = sample_ids(batches(config, tokenizer, count=5, seed=4))
    np.testing.assert_array_equal(again, ids[:40])
    assert (other != ids[:40]).any()


def test_endless_by_default_and_steps_per_epoch(synthetic_dir, tokenizer):
    config = config_for(synthetic_dir)
    assert pipeline.steps_per_epoch(config, "train", process_count=1) == NUM // 8
    assert pipeline.steps_per_epoch(config, "val", process_count=1) == 3
    ids = sample_ids(batches(config, tokenizer, count=NUM // 8 * 3 + 1))
    for epoch in range(3):
        assert sorted(ids[epoch * NUM:(epoch + 1) * NUM]) == list(range(NUM))


def test_restored_state_reproduces_the_rest(synthetic_dir, tokenizer):
    config = config_for(synthetic_dir)
    dataset = pipeline.make_dataset(config, tokenizer, TOKENS_PER_TILE, "train", seed=1,
                                    process_index=0, process_count=1)
    iterator = iter(dataset)
    for _ in range(7):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # as a checkpoint stores it
    rest = [next(iterator) for _ in range(25)]  # crosses into the second epoch
    iterator.close()

    resumed = iter(pipeline.make_dataset(config, tokenizer, TOKENS_PER_TILE, "train", seed=1,
                                         process_index=0, process_count=1))
    resumed.set_state(state)
    for expected in rest:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    resumed.close()
    # Together with the first 7 batches: epoch 0 exactly once.
    head = sample_ids(batches(config, tokenizer, count=7, seed=1))
    assert sorted(np.concatenate([head, sample_ids(rest)])[:NUM]) == list(range(NUM))


def test_hosts_get_disjoint_equal_shares(synthetic_dir, tokenizer):
    config = config_for(synthetic_dir, batch_size=6)
    shards = []
    for host in range(3):
        ids = sample_ids(batches(config, tokenizer, count=NUM // 3 // 2, process_index=host,
                                 process_count=3))
        assert len(ids) == NUM // 3 == len(set(ids.tolist()))
        shards.append(set(ids.tolist()))
    assert not (shards[0] & shards[1]) and not (shards[0] & shards[2]) and \
        not (shards[1] & shards[2])
    assert len(set.union(*shards)) == 3 * (NUM // 3)


def test_eval_split_in_order_padded_and_split_over_hosts(synthetic_dir, tokenizer):
    config = config_for(synthetic_dir)
    seen = []
    for host in range(2):
        result = batches(config, tokenizer, "val", process_index=host, process_count=2)
        assert len(result) == 3  # ceil(ceil(20 / 2) / 4)
        ids = sample_ids(result)
        real = ids[ids >= 0]
        assert list(real) == list(range(host, 20, 2))
        padding = np.concatenate([b["sample_id"] < 0 for b in result])
        assert padding.sum() == 2
        for b in result:
            rows = b["sample_id"] < 0
            assert not b["attention_mask"][rows].any() and not b["loss_mask"][rows].any()
            assert not b["tile_mask"][rows].any() and not b["image_mask"][rows].any()
        seen.extend(real.tolist())
    assert sorted(seen) == list(range(20))


def test_worker_processes_match_threads_and_resume(synthetic_dir, tokenizer):
    threads = batches(config_for(synthetic_dir), tokenizer, count=4)
    config = config_for(synthetic_dir, worker_count=1)
    iterator = iter(pipeline.make_dataset(config, tokenizer, TOKENS_PER_TILE, "train",
                                          process_index=0, process_count=1))
    got = [next(iterator) for _ in range(2)]
    state = json.loads(json.dumps(iterator.get_state()))
    got += [next(iterator) for _ in range(2)]
    iterator.close()
    for expected, batch in zip(threads, got, strict=True):
        for key in expected:
            np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
    resumed = iter(pipeline.make_dataset(config, tokenizer, TOKENS_PER_TILE, "train",
                                         process_index=0, process_count=1))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["sample_id"], threads[2]["sample_id"])
    resumed.close()


def test_global_batch(synthetic_dir, tokenizer, mesh8):
    batch = batches(config_for(synthetic_dir), tokenizer, count=1)[0]
    arrays = batch_lib.global_batch(batch, mesh8)
    for key, value in batch.items():
        assert arrays[key].shape == value.shape
        assert arrays[key].sharding.spec[0] == ("data", "fsdp")
        np.testing.assert_array_equal(np.asarray(arrays[key]), value)
        # 4 batch shards of 2 rows, each on 2 devices (tensor axis).
        assert {s.data.shape[0] for s in arrays[key].addressable_shards} == {2}
    assert len(jax.devices()) == 8


def test_text_only_records_mix_with_image_records(synthetic_dir, tokenizer, tmp_path):
    records = json.loads((synthetic_dir / "train_qa.json").read_text())[:6]
    for record in records[::2]:
        del record["image"]
        record["conversations"][0]["value"] = record["conversations"][0]["value"].replace(
            "<image>\n", "")
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = config_for(synthetic_dir, **{"files.train": str(path)}, batch_size=6,
                        shuffle=False)
    batch = batches(config, tokenizer, count=1)[0]
    has_image = np.array(["image" in r for r in records])
    np.testing.assert_array_equal(batch["tile_mask"][:, 0], has_image)
    np.testing.assert_array_equal(batch["image_mask"].sum(1), has_image * TOKENS_PER_TILE)
    assert not batch["pixel_values"][~has_image].any()
    assert (batch["loss_mask"].sum(1) > 0).all()


def test_llava_source_names_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": "x", "conversations": []}\n\n{broken\n')
    source = LlavaSource(str(path))
    assert len(source) == 2
    assert source[0].describe() == f"record id='x' ({path}:1)"
    assert source[1].error and source[1].where == f"{path}:3"
    array = tmp_path / "b.json"
    array.write_text('[{"id": 5}, {"id": 6}]')
    both = LlavaSource([str(path), str(array)])
    assert len(both) == 4 and both[3].record == {"id": 6} and both[3].where == f"{array}[1]"
    (tmp_path / "c.json").write_text("[{")
    with pytest.raises(ValueError, match="c.json: not valid JSON"):
        LlavaSource(str(tmp_path / "c.json"))


@pytest.mark.parametrize("field, value, message", [
    ("data.on_error", "ignore", "data.on_error"),
    ("data.template", "chatml", "data.template"),
    ("data.source", "webdataset", "data.source"),
    ("data.batch_size", 6, "data x fsdp"),
    ("data.max_length", 9, "no room for text"),
    ("data.max_length", 4096, "max_position_embeddings"),
    ("data.num_epochs", 0, "data.num_epochs"),
    ("data.worker_count", -1, "data.worker_count"),
])
def test_validate_data_names_the_field(field, value, message):
    config = tiny.get_config()
    config.mesh.update(dict(data=2, fsdp=4, tensor=1))
    validate(config, num_devices=8)
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message) as info:
        validate(config, num_devices=8)
    assert str(info.value).startswith(field)
