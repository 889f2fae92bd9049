"""A run to talk to without training: synthetic images and tokenizer, ``configs/tiny.py``'s
model with random weights, saved as a run ``load_trained`` reads (for the serving tests,
the load benchmark and trying the server).

    python -m tokenpacker_jax.serving.random_run --out DIR    # DIR/run, DIR/data

The dense kernels are scaled up (x4) so that greedy choices are well separated, and the
output head's columns are zero but for whole words (pieces that are one word with its
leading space and encode back to themselves): answers are then words whose text encodes
back to the same ids, as a trained model's are, rather than byte-fallback pieces.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np

from tokenpacker_jax import assembly, checkpoint, user_error
from tokenpacker_jax.configs import tiny
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.data import synthetic
from tokenpacker_jax.tokenizer import load_tokenizer


def write_random_run(root: str, *, images: int = 4, seed: int = 3, vision_layers: int = 0,
                     decoder_layers: int = 0) -> tuple[str, str]:
    """(run directory, data directory: images/test/00000.png ... and test_questions.jsonl).
    ``vision_layers`` / ``decoder_layers``: fewer layers than tiny's (0: tiny's)."""
    data, run = os.path.join(root, "data"), os.path.join(root, "run")
    synthetic.generate(data, images, seed=1, num_eval=images, size=48, tokenizer_vocab=400)
    config = tiny.get_config(f"stage=2,data={data}")
    if vision_layers:
        config.model.vision.num_layers = vision_layers
        config.model.features.multi_layers = tuple(
            1 + i % vision_layers for i in range(len(config.model.features.multi_layers)))
    if decoder_layers:
        config.model.decoder.num_layers = decoder_layers
    tokenizer = load_tokenizer(config.model.tokenizer)
    config.model.decoder.vocab_size = tokenizer.vocab_size
    model = assembly.build_model(config)
    inputs = batch_lib.example_inputs(batch_lib.Dims.of_model(model.config, 8))
    params = jax.jit(model.init)(jax.random.key(seed), **inputs)
    params = jax.tree.map(lambda p: p * 4.0 if p.ndim >= 2 else p,
                          nn.meta.unbox(params["params"]))
    words = [i for piece, i in tokenizer.hf.get_vocab().items()
             if piece.startswith("\u2581") and piece[1:].isalpha() and len(piece) > 2
             and tokenizer.encode(" " + piece[1:], add_bos=False) == [i]]
    if len(words) < 8:
        raise RuntimeError(f"the synthetic tokenizer has only {len(words)} whole words")
    head = params["decoder"]["lm_head"]["kernel"]
    params["decoder"]["lm_head"]["kernel"] = head * np.isin(np.arange(head.shape[1]), words)
    checkpoint.save_params(run, params, config.to_json())
    return run, data


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """--checkpoint and --data for scripts that make a random run when given none."""
    parser.add_argument("--checkpoint", help="run directory (default: a random tiny run)")
    parser.add_argument("--data", help="with --checkpoint: a synthetic dataset directory "
                                       "(its test_questions.jsonl and images)")


def run_from_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, workdir: str,
                   images: int) -> tuple[str, str]:
    """(run directory, data directory): the flags', or a random run with ``images`` test
    images written in ``workdir``."""
    if (args.checkpoint is None) != (args.data is None):
        parser.error("--checkpoint and --data go together")
    if args.checkpoint is not None:
        return args.checkpoint, args.data
    return write_random_run(os.path.join(workdir, "random"), images=images)


def main(argv: Sequence[str] | None = None) -> None:
    parser = user_error.ArgumentParser(prog="python -m tokenpacker_jax.serving.random_run",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="a new directory")
    parser.add_argument("--images", type=int, default=16, help="test images to write")
    args = parser.parse_args(argv)
    run, data = write_random_run(args.out, images=args.images)
    print(f"run: {run}\nimages and questions: {data}")


if __name__ == "__main__":
    user_error.run_argparse(main, "tokenpacker_jax.serving.random_run")
