"""What a config's data looks like to the trainer: lengths, images, and how much of each row
holds a token with and without packing.

    python -m tokenpacker_jax.data.stats --config=CONFIG[:ARGS] [--config.a.b=V] \\
        [--split=train] [--samples=N]

Reads N samples of the split (train: a seeded random subset, as the trainer shuffles it)
through the real pipeline (``pipeline.make_rows``: decoding, templates, tiling, truncation,
bad-record handling), and prints the distribution of positions per sample (text and visual
tokens), visual tokens, images and tiles per sample, then the same samples in packed rows.
Its last line is

    real tokens: padded X%, packed Y% (max_length T)

the share of row positions that hold a sample's token, one sample per row (padded to
``data.max_length``) and packed with the config's ``data.packing`` (``first_fit`` when the
config has ``none``, its tile slots then as many as the positions hold: T / visual tokens
per tile), rows as one host would fill them (a host's batch of open rows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from tokenpacker_jax import assembly, configuration, user_error
from tokenpacker_jax.data import bad_records, packing, pipeline, sources
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.data import example as example_lib
from tokenpacker_jax.tokenizer import load_tokenizer


@dataclasses.dataclass
class RowStats:
    """Positions, tokens and samples of a stream of rows."""

    length: int
    rows: int = 0
    tokens: int = 0
    samples: int = 0
    row_tiles: list[int] = dataclasses.field(default_factory=list)
    per_sample: dict[str, list[int]] = dataclasses.field(
        default_factory=lambda: {"positions": [], "visual": [], "images": [], "tiles": []})

    def add(self, row: Mapping[str, np.ndarray]) -> None:
        ids = np.atleast_1d(row["sample_id"])
        if not (ids >= 0).any():
            return  # an evaluation split's padding row
        self.row_tiles.append(int(row["tile_mask"].sum()))
        self.rows += 1
        self.tokens += int(row["attention_mask"].sum())
        self.samples += int((ids >= 0).sum())
        if ids.size == 1:  # one sample per row: its own figures
            tiles = int(row["tile_mask"].sum())
            for key, value in (("positions", int(row["attention_mask"].sum())),
                               ("visual", int(row["image_mask"].sum())),
                               ("images", int(tiles > 0)), ("tiles", tiles)):
                self.per_sample[key].append(value)

    @property
    def real_share(self) -> float:
        return self.tokens / max(self.rows * self.length, 1)


def collect(rows: Iterable[Mapping[str, np.ndarray]], length: int, samples: int) -> RowStats:
    """Rows until ``samples`` samples are in (or the stream ends)."""
    stats = RowStats(length)
    for row in rows:
        stats.add(row)
        if stats.samples >= samples:
            break
    return stats


def distribution(values: list[int]) -> str:
    array = np.asarray(values, np.float64)
    return (f"min {array.min():.0f}, median {np.median(array):.0f}, mean {array.mean():.1f}, "
            f"p90 {np.percentile(array, 90):.0f}, max {array.max():.0f}")


def histogram(values: list[int]) -> str:
    counts = np.bincount(np.asarray(values, np.int64))
    return ", ".join(f"{value}: {count}" for value, count in enumerate(counts) if count)


def report(config: ml_collections.ConfigDict, split: str = "train",
           samples: int = 2000) -> list[str]:
    """The lines ``python -m tokenpacker_jax.data.stats`` prints (see the module docstring)."""
    configuration.validate_data(config)
    tokenizer = load_tokenizer(configuration.tokenizer_source(config))
    tokens_per_tile = example_lib.tokens_per_tile(assembly.build_model(config).config)
    data = config.data
    length = int(data.max_length)
    packed_data = ml_collections.ConfigDict(data.to_dict())
    if not batch_lib.is_packed(data):
        packed_data.packing = packing.DEFAULT_STRATEGY
        packed_data.max_images_per_row = max(batch_lib.max_tiles(data),
                                             length // tokens_per_tile)
    unpacked_data = ml_collections.ConfigDict(data.to_dict())
    unpacked_data.packing = batch_lib.NO_PACKING
    source = sources.head_of_source(data, split, samples, config.seed)

    def stream(data_config):
        return iter(pipeline.make_rows(data_config, tokenizer, tokens_per_tile, split,
                                       source=source, shuffle=False, num_epochs=1,
                                       process_index=0, process_count=1))

    padded = collect(stream(unpacked_data), length, len(source))
    packed_rows = stream(packed_data)
    packed = collect(packed_rows, length, len(source))
    counts = bad_records.record_counts(packed_rows)
    dims = batch_lib.Dims.of_data(packed_data)
    if not padded.samples:
        raise user_error.InputError(f"no usable sample among the first {len(source)} records "
                                    f"of the {split!r} split")
    per_sample = padded.per_sample
    lines = [
        f"{split}: {padded.samples} samples of {len(source)} records read "
        f"({counts['skipped']} skipped, {counts['truncated']} cut at max_length {length})",
        f"positions per sample (text + visual): {distribution(per_sample['positions'])}",
        f"visual tokens per sample: {distribution(per_sample['visual'])}",
        f"images per sample: {histogram(per_sample['images'])}",
        f"tiles per sample: {histogram(per_sample['tiles'])}",
        f"packed ({packed_data.packing}; {dims.length} positions, {dims.tiles} tile slots, "
        f"{dims.samples} samples per row; {pipeline.per_host_batch_size(data, 1)} rows "
        f"open): {packed.rows} rows for {packed.samples} samples, "
        f"{packed.samples / max(packed.rows, 1):.2f} per row, "
        f"{counts.get('deferred_by_tiles', 0)} deferred by the tile budget",
        f"tiles per packed row: {distribution(packed.row_tiles)}",
        f"real tokens: padded {100 * padded.real_share:.1f}%, packed "
        f"{100 * packed.real_share:.1f}% (max_length {length})",
    ]
    return lines


def main(argv):
    del argv
    print("\n".join(report(flags.FLAGS.config, flags.FLAGS.split, flags.FLAGS.samples)))


def define_flags() -> None:
    """The command's flags (``data/stats/__main__.py`` defines them before parsing)."""
    config_flags.DEFINE_config_file("config", None, "Config file (with :variant).",
                                    lock_config=True)
    flags.DEFINE_enum("split", "train", sources.SPLITS, "Which split to read.")
    flags.DEFINE_integer("samples", 2000, "How many records to read.")
    flags.mark_flags_as_required(["config"])
