"""Samples per second of the data pipeline (decode, preprocess, tokenize, batch).

``python -m tokenpacker_jax.bench.data_pipeline [--size 336] [--images synthetic|photo]
[--mode pad] [--workers 0] [--threads 8] [--batch 32] [--batches 20]``

Writes a dataset to a temporary folder (or reads ``--data DIR`` written by
``tokenpacker_jax.data.synthetic``), builds the training pipeline with the ``vicuna_v1``
template and a tiny sentencepiece tokenizer, skips two warm-up batches and times the next
``--batches``. ``--images photo`` replaces the synthetic PNGs with 640 x 480 JPEG photos-like
images (smooth gradients plus noise, like COCO sizes), whose decoding and resizing cost what
real LLaVA data costs; ``synthetic`` PNGs are mostly flat and decode faster.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from tokenpacker_jax import user_error
from tokenpacker_jax.configs import common
from tokenpacker_jax.data import pipeline, synthetic
from tokenpacker_jax.tokenizer import load_tokenizer


def _photo_like(rng: np.random.Generator, height: int = 480, width: int = 640) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    base = 127 + 60 * np.sin(x[..., None] / rng.uniform(40, 120) + phase) \
        + 40 * np.cos(y[..., None] / rng.uniform(30, 90) + phase)
    noise = rng.normal(0, 18, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def prepare(out: str, num: int, size: int, images: str, seed: int = 0) -> None:
    synthetic.generate(out, num, seed, num_eval=1, size=size, tokenizer_vocab=512)
    if images == "photo":
        records = json.loads(open(os.path.join(out, "train_qa.json")).read())
        rng = np.random.default_rng(seed)
        for record in records:
            name = record["image"].replace(".png", ".jpg")
            _photo_like(rng).save(os.path.join(out, name), quality=90)
            record["image"] = name
        with open(os.path.join(out, "train_qa.json"), "w") as file:
            json.dump(records, file)


def measure(data_dir: str, *, size: int, mode: str, workers: int, threads: int, batch: int,
            batches: int, tokens_per_tile: int) -> float:
    """Samples per second over ``batches`` batches after two warm-up batches."""
    config = common.base_config().data
    config.update(dict(source="llava", image_folder=data_dir, template="vicuna_v1",
                       max_length=2048 if mode == "slice" else 1024, batch_size=batch,
                       worker_count=workers, read_threads=threads))
    config.files.train = os.path.join(data_dir, "train_qa.json")
    config.image.update(dict(aspect_mode=mode, image_size=size))
    config.hd.update(dict(comma_id=-1, newline_id=-1))
    tokenizer = load_tokenizer(os.path.join(data_dir, "tokenizer"))
    dataset = pipeline.make_dataset(config, tokenizer, tokens_per_tile, "train",
                                    process_index=0, process_count=1)
    iterator = iter(dataset)
    try:
        for _ in range(2):
            next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        return batches * batch / (time.perf_counter() - start)
    finally:
        iterator.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = user_error.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="", help="a synthetic dataset folder to reuse")
    parser.add_argument("--images", choices=("synthetic", "photo"), default="synthetic")
    parser.add_argument("--size", type=int, default=336)
    parser.add_argument("--mode", choices=("square", "pad", "slice"), default="pad")
    parser.add_argument("--num", type=int, default=256, help="records to write")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--tokens-per-tile", type=int, default=144)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data
        if not data_dir:
            data_dir = scratch
            prepare(scratch, args.num, args.size, args.images)
        rate = measure(data_dir, size=args.size, mode=args.mode, workers=args.workers,
                       threads=args.threads, batch=args.batch, batches=args.batches,
                       tokens_per_tile=args.tokens_per_tile)
    print(f"data pipeline: {rate:.1f} samples/s ({args.images} images -> {args.size} px "
          f"{args.mode}, batch {args.batch}, {args.threads} threads, {args.workers} worker "
          f"processes, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    user_error.run_argparse(main, "tokenpacker_jax.bench.data_pipeline")
