"""An image-caption TFDS dataset as a record source for the same pipeline.

Reading uses ``tfds.data_source`` (random access to an ArrayRecord-format dataset), which
needs ``tensorflow-datasets`` and ``array_record`` but not TensorFlow: images come back as
uint8 arrays decoded with PIL. Preparing a dataset (``download_and_prepare``) needs no
TensorFlow either when the builder hands images over as encoded bytes or file paths and
asks for ``file_format='array_record'`` (arrays to encode would need TensorFlow).

Each example becomes a LLaVA-style record: ``<image>\\n{prompt}`` from the user, the
caption from the assistant (the ``plain`` template drops the prompt, as stage 1 does).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tokenpacker_jax.data import errors
from tokenpacker_jax.data.conversation import IMAGE_PLACEHOLDER
from tokenpacker_jax.data.llava import SourceRecord


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in ("S", "O", "U"):
        if value.ndim == 0:
            return _text(value.item())
        return _text(value.reshape(-1)[0]) if value.size else ""  # first of several
    if isinstance(value, (list, tuple)):
        return _text(value[0]) if value else ""
    return str(value)


class TfdsCaptionSource:
    """``tfds.data_source(name, split)`` -> SourceRecords.

    Args:
      name: the dataset's registered name, or ``name/config:version``.
      split: a TFDS split (``train``, ``validation[:10%]``, ...).
      data_dir: where the dataset was prepared.
      image_key / caption_key: the features holding the image and its caption (a text, or
        a sequence of texts of which the first is used).
      id_key: a feature naming the example in messages (default: its index).
      prompt: the user's question the caption answers.
    """

    def __init__(self, name: str, split: str, *, data_dir: str | None = None,
                 image_key: str = "image", caption_key: str = "caption",
                 id_key: str | None = None, prompt: str = "Describe the image briefly."):
        import tensorflow_datasets as tfds  # noqa: PLC0415 (tensorflow_datasets: only this source)

        if not name:
            raise ValueError("data.tfds.name: no TFDS dataset named")
        self.name, self.split = name, split
        self.image_key, self.caption_key, self.id_key = image_key, caption_key, id_key
        self.prompt = prompt
        self._source = tfds.data_source(name, split=split, data_dir=data_dir)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> SourceRecord:
        index = int(index)
        example = self._source[index]
        where = f"tfds {self.name}[{self.split}] #{index}"
        missing = [k for k in (self.image_key, self.caption_key) if k not in example]
        if missing:
            return SourceRecord(index, where, None, f"feature(s) {missing} not in "
                                                    f"{sorted(example)}",
                                error_reason=errors.BAD_RECORD)
        record = {
            "id": _text(example[self.id_key]) if self.id_key else index,
            "conversations": [
                {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{self.prompt}"},
                {"from": "gpt", "value": _text(example[self.caption_key])},
            ],
        }
        return SourceRecord(index, where, record, image=example[self.image_key])

    def __repr__(self) -> str:
        return f"TfdsCaptionSource({self.name}[{self.split}], {len(self)} examples)"
