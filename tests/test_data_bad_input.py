"""Every kind of bad record: counted by reason and logged naming the record (skip), or raised
naming the record (raise); the epoch runs to its end either way in skip mode."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from tokenpacker_jax.data import bad_records, errors, pipeline
from tokenpacker_jax.data.conversation import ConversationTokenizer
from tokenpacker_jax.data.errors import DataError
from tokenpacker_jax.data.example import ExampleBuilder, ImageSettings
from tokenpacker_jax.data.llava import SourceRecord

from data_helpers import TOKENS_PER_TILE, data_config, vicuna_like

MAX_LENGTH = 256


def qa(question="<image>\nWhat colour is the circle?", answer="red"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return vicuna_like(str(tmp_path_factory.mktemp("tok")))


def image_starts_inside_the_cut(tokenizer, folder):
    """A first answer long enough that an image in the second question straddles
    MAX_LENGTH."""
    builder = ExampleBuilder(ConversationTokenizer("vicuna_v1", tokenizer),
                             ImageSettings(size=48), TOKENS_PER_TILE, 1024, str(folder))
    for words in range(20, 400, 3):
        conversation = qa("hi", " ".join(["circle"] * words)) + qa()
        record = {"id": "x", "image": "good.png", "conversations": conversation}
        example = builder.build(SourceRecord(0, "probe", record))
        start = int(np.flatnonzero(example["image_mask"])[0])
        if start < MAX_LENGTH - 5 < MAX_LENGTH < start + TOKENS_PER_TILE - 5:
            return conversation
    raise AssertionError("no answer length puts the image across the cut")


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    for name in ("good.png", "good2.png"):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / name)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    good = [
        {"id": "good-1", "image": "good.png", "conversations": qa()},
        {"id": "good-2", "image": "good2.png", "conversations": qa("Where? <image>", "left")},
        {"id": "good-3", "conversations": qa("What is a circle?", "a round shape")},
        {"id": "good-4", "image": "good.png", "conversations": qa() + qa("More?", "no")},
        {"id": "good-5", "conversations": qa("Count to 3.", "1 2 3")},
        {"id": "good-6", "image": "good2.png", "conversations": qa()},
    ]
    bad = [
        ("missing", errors.MISSING_IMAGE, {"image": "nowhere.png", "conversations": qa()}),
        ("corrupt", errors.CORRUPT_IMAGE, {"image": "corrupt.png", "conversations": qa()}),
        ("order", errors.ROLE_ORDER, {"image": "good.png",
                                      "conversations": qa()[::-1]}),
        ("no-image", errors.PLACEHOLDER_WITHOUT_IMAGE, {"conversations": qa()}),
        ("no-placeholder", errors.IMAGE_WITHOUT_PLACEHOLDER,
         {"image": "good.png", "conversations": qa("What colour?")}),
        ("empty", errors.EMPTY_CONVERSATION, {"image": "good.png", "conversations": []}),
        ("malformed", errors.BAD_RECORD, {"conversations": "hello"}),
        ("cut-in-image", errors.TOO_LONG,
         {"image": "good.png", "conversations": image_starts_inside_the_cut(tokenizer,
                                                                            folder)}),
        ("no-answer-left", errors.TOO_LONG,
         {"image": "good.png", "conversations": qa("<image>\n" + "where is it " * 200)}),
    ]
    lines, expected = [], {}
    for record in good[:3]:
        lines.append(json.dumps(record))
    lines.append('{"id": "broken", "image": "good.png", "conversations": [')  # bad JSON
    expected[len(lines)] = (errors.BAD_JSON, None)
    for name, reason, record in bad:
        lines.append(json.dumps({"id": f"bad-{name}", **record}))
        expected[len(lines)] = (reason, f"bad-{name}")
    for record in good[3:]:
        lines.append(json.dumps(record))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return folder, path, expected


def config_for(folder, path, **overrides):
    return data_config(**{"files.train": str(path), "files.val": str(path),
                          "image_folder": str(folder), "batch_size": 2, "shuffle": False,
                          "template": "vicuna_v1", "image.aspect_mode": "pad",
                          "max_length": MAX_LENGTH, "read_threads": 2, **overrides})


def expected_counts(expected, epochs=1):
    counts = {}
    for reason, _ in expected.values():
        counts[reason] = counts.get(reason, 0) + epochs
    return counts


def test_skip_counts_and_messages(bad_dataset, tokenizer, caplog):
    folder, path, expected = bad_dataset
    config = config_for(folder, path)
    dataset = pipeline.make_dataset(config, tokenizer, TOKENS_PER_TILE, "train", num_epochs=2,
                                    process_index=0, process_count=1)
    with caplog.at_level(logging.INFO, logger="tokenpacker_jax.data"):
        iterator = iter(dataset)
        result = list(iterator)
    ids = np.concatenate([b["sample_id"] for b in result])
    good_lines = [0, 1, 2, 13, 14, 15]
    assert list(ids) == good_lines * 2  # both epochs complete, in order, nothing else
    assert bad_records.skipped_records(iterator) == expected_counts(expected, epochs=2)
    assert sum(bad_records.skipped_records(iterator).values()) == 20
    messages = [r.getMessage() for r in caplog.records]
    for line, (reason, record_id) in expected.items():
        name = f"id={record_id!r}" if record_id else f"#{line - 1}"
        hits = [m for m in messages if f"{name} ({path}:{line})" in m and f"[{reason}]" in m]
        assert hits, f"no message naming line {line} ({reason})"
    summaries = [m for m in messages if "records skipped" in m]
    assert sum("epoch 0: 10 records skipped" in m for m in summaries) == 1
    assert sum("epoch 1: 10 records skipped" in m for m in summaries) == 1
    assert any("end of data: 20 records skipped (bad_json: 2," in m for m in summaries)
    assert any("too_long: 4" in m for m in summaries)
    # Specific messages say what is wrong.
    text = "\n".join(messages)
    assert "nowhere.png: image file not found" in text
    assert "corrupt.png: cannot decode image" in text
    assert "inside the image's positions" in text and "no answer token" in text


def test_skip_counts_survive_a_restore(bad_dataset, tokenizer):
    folder, path, expected = bad_dataset
    config = config_for(folder, path)
    iterator = iter(pipeline.make_dataset(config, tokenizer, TOKENS_PER_TILE, "train", num_epochs=1,
                                          process_index=0, process_count=1))
    next(iterator)
    next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    iterator.close()
    resumed = iter(pipeline.make_dataset(config, tokenizer, TOKENS_PER_TILE, "train", num_epochs=1,
                                         process_index=0, process_count=1))
    resumed.set_state(state)
    rest = list(resumed)
    assert [int(i) for b in rest for i in b["sample_id"]] == [14, 15]
    assert bad_records.skipped_records(resumed) == expected_counts(expected)


def test_raise_names_the_record(bad_dataset, tokenizer):
    folder, path, _ = bad_dataset
    config = config_for(folder, path, on_error="raise")
    iterator = iter(pipeline.make_dataset(config, tokenizer, TOKENS_PER_TILE, "train",
                                          process_index=0, process_count=1))
    next(iterator)  # good-1, good-2
    with pytest.raises(DataError) as info:
        next(iterator)  # good-3, then the broken line
    assert info.value.reason == errors.BAD_JSON
    assert f"record #3 ({path}:4)" in str(info.value)
    iterator.close()

    # A record further on: its id and line.
    config = config_for(folder, path, on_error="raise", **{"files.train": str(path)})
    lines = path.read_text().splitlines()
    only_missing = folder / "missing.jsonl"
    only_missing.write_text(lines[0] + "\n" + lines[4] + "\n")
    config.files.train = str(only_missing)
    iterator = iter(pipeline.make_dataset(config, tokenizer, TOKENS_PER_TILE, "train",
                                          process_index=0, process_count=1))
    with pytest.raises(DataError, match=r"record id='bad-missing' \(.*missing.jsonl:2\): "
                                        r".*nowhere.png: image file not found"):
        next(iterator)
    iterator.close()


def test_eval_split_turns_bad_records_into_padding_rows(bad_dataset, tokenizer):
    folder, path, expected = bad_dataset
    config = config_for(folder, path, batch_size=4)
    iterator = iter(pipeline.make_dataset(config, tokenizer, TOKENS_PER_TILE, "val",
                                          process_index=0, process_count=1))
    result = list(iterator)
    assert len(result) == 4  # 16 rows
    ids = np.concatenate([b["sample_id"] for b in result])
    assert list(ids[ids >= 0]) == [0, 1, 2, 13, 14, 15]
    assert (ids < 0).sum() == 10
    assert bad_records.skipped_records(iterator) == expected_counts(expected)


def test_an_epoch_without_usable_records_raises_instead_of_spinning(bad_dataset, tokenizer):
    folder, path, _ = bad_dataset
    lines = path.read_text().splitlines()
    only_bad = folder / "only_bad.jsonl"
    only_bad.write_text("\n".join(lines[3:6]) + "\n")
    config = config_for(folder, path, **{"files.train": str(only_bad)})
    iterator = iter(pipeline.make_dataset(config, tokenizer, TOKENS_PER_TILE, "train",
                                          process_index=0, process_count=1))  # endless
    with pytest.raises(DataError, match=r"epoch 0: 3 records skipped .*no usable record"):
        next(iterator)
    iterator.close()


def test_on_error_must_be_known(bad_dataset, tokenizer):
    folder, path, _ = bad_dataset
    with pytest.raises(ValueError, match="on_error"):
        pipeline.make_dataset(config_for(folder, path, on_error="ignore"), tokenizer,
                              TOKENS_PER_TILE, process_index=0, process_count=1)
