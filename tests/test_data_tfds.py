"""A tiny image-caption TFDS dataset, prepared here in ArrayRecord format (no TensorFlow),
read with tfds.data_source through the same pipeline."""

import io
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tokenpacker_jax.data import pipeline, sources
from tokenpacker_jax.data.errors import DataError
from tokenpacker_jax.data.image import preprocess

from data_helpers import data_config, vicuna_like

NUM = 6


def picture(index):
    rng = np.random.default_rng(index)
    return rng.integers(0, 255, (20 + 4 * index, 30, 3), dtype=np.uint8)


def caption(index):
    return f"a red circle and {index} blue squares"


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    """Images as PNG bytes (encoding arrays would need TensorFlow)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "caption": tfds.features.Text(), "name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(range(NUM)),
                "validation": self._generate_examples(range(NUM, NUM + 2))}

    def _generate_examples(self, indices):
        for index in indices:
            buffer = io.BytesIO()
            Image.fromarray(picture(index)).save(buffer, format="PNG")
            yield index, {"image": buffer.getvalue(), "caption": caption(index),
                          "name": f"pic-{index}"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    TinyCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return vicuna_like(str(tmp_path_factory.mktemp("tok")))


def config_for(data_dir, **overrides):
    return data_config(**{"source": "tfds", "tfds.name": "tiny_captions",
                          "tfds.data_dir": str(data_dir), "tfds.caption_key": "caption",
                          "tfds.id_key": "name", "template": "plain",
                          "image.aspect_mode": "square", "batch_size": 3, "shuffle": False,
                          "max_length": 64, **overrides})


def test_tfds_captions_through_the_pipeline(prepared, tokenizer):
    config = config_for(prepared)
    iterator = iter(pipeline.make_dataset(config, tokenizer, 4, "train", num_epochs=1,
                                          process_index=0, process_count=1))
    batches = list(iterator)
    assert len(batches) == 2
    source = sources.make_source(config, "train")
    assert len(source) == NUM
    seen = set()
    for batch in batches:
        for row in range(3):
            index = int(batch["sample_id"][row])
            record = source[index]
            number = int(record.record["id"].split("-")[1])  # TFDS orders examples itself
            seen.add(number)
            supervised = batch["loss_mask"][row] == 1
            text = tokenizer.decode(batch["target_ids"][row][supervised],
                                    skip_special_tokens=False)
            assert text == caption(number) + "\n"
            assert batch["image_mask"][row].sum() == 4 and batch["tile_mask"][row].all()
            np.testing.assert_array_equal(
                batch["pixel_values"][row, 0],
                preprocess(Image.fromarray(picture(number)), mode="square", image_size=48))
    assert seen == set(range(NUM))
    assert "tensorflow" not in sys.modules  # reading needed no TensorFlow


def test_tfds_eval_split_and_names(prepared, tokenizer):
    config = config_for(prepared, template="vicuna_v1")
    batches = list(pipeline.make_dataset(config, tokenizer, 4, "val", process_index=0,
                                         process_count=1))
    assert len(batches) == 1
    assert list(batches[0]["sample_id"]) == [0, 1, -1]
    record = sources.make_source(config, "val")[1]
    assert record.describe().startswith("record id='pic-") and "validation" in record.where
    assert record.record["conversations"][0]["value"] == \
        "<image>\nDescribe the image briefly."


def test_missing_feature_is_a_bad_record(prepared, tokenizer):
    config = config_for(prepared, **{"tfds.caption_key": "text"})
    iterator = iter(pipeline.make_dataset(config, tokenizer, 4, "val", process_index=0,
                                          process_count=1))
    # Both records lack the feature: no usable record in the split is an error, not
    # a split of padding rows.
    with pytest.raises(DataError, match=r"data\[val\]: epoch 0: 2 records skipped "
                                        r"\(bad_record: 2\): no usable record"):
        next(iterator)
    record = sources.make_source(config, "val")[0]
    assert record.error_reason == "bad_record" and "['text']" in record.error
