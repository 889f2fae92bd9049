"""The random-access record source of a split, from ``config.data``.

``data.source`` picks it: ``llava`` (LLaVA JSON / JSONL annotation files,
``tokenpacker_jax.data.llava``; a split may list several, concatenated) or ``tfds`` (an
image-caption TFDS dataset, ``tokenpacker_jax.data.tfds``). A source has a length and gives
``SourceRecord`` i by index; ``head_of_source`` is its first records (training: of the
shuffled source), for estimates.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import grain

from tokenpacker_jax.data.llava import LlavaSource, split_paths
from tokenpacker_jax.data.tfds import TfdsCaptionSource

SPLITS = ("train", "val", "test")


@functools.lru_cache(maxsize=4)
def _llava_source(paths: tuple[str, ...], stamps: tuple) -> LlavaSource:
    """Parsing a large annotation file takes seconds; the trainer asks for a split's source
    more than once (its length, then its records). ``stamps`` (modification times) keys
    the cache, so a rewritten file is read anew."""
    del stamps
    return LlavaSource(paths)


def make_source(data_config: Any, split: str):
    """The random-access record source of ``split`` from ``config.data``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if data_config.source == "llava":
        paths = tuple(split_paths(data_config.files[split]))
        if not paths:
            raise ValueError(f"data.files.{split}: no annotation file given for the "
                             f"{split!r} split")
        stamps = tuple(os.stat(p).st_mtime_ns if os.path.exists(p) else None for p in paths)
        return _llava_source(paths, stamps)
    if data_config.source == "tfds":
        tfds_config = data_config.tfds
        return TfdsCaptionSource(
            tfds_config.name, tfds_config.splits[split], data_dir=tfds_config.data_dir or None,
            image_key=tfds_config.image_key, caption_key=tfds_config.caption_key,
            id_key=tfds_config.id_key or None, prompt=tfds_config.prompt)
    raise ValueError(f"data.source must be 'llava' or 'tfds', got {data_config.source!r}")


class _Head:
    """The first ``count`` records of a source."""

    def __init__(self, source: Any, count: int):
        self.source, self.count = source, min(count, len(source))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return self.source[index]


def head_of_source(data_config: Any, split: str, count: int, seed: int | None = None) -> _Head:
    """The first ``count`` records of ``split`` (train: of the source shuffled with ``seed``
    when ``data.shuffle``): a sample of it for estimates."""
    source = make_source(data_config, split)
    if split == "train" and data_config.shuffle:
        source = grain.MapDataset.source(source).shuffle(seed=0 if seed is None else seed)
    return _Head(source, count)
