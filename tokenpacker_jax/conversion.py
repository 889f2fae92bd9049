"""Checkpoints to and from PyTorch: ``python -m tokenpacker_jax.convert import|export``,
and LoRA adapters folded into their base: ``merge-lora``.

    python -m tokenpacker_jax.convert import --checkpoint=REF_DIR --vision=CLIP_DIR \\
        --out=WORKDIR [--tokenizer=DIR]
    python -m tokenpacker_jax.convert export --checkpoint=WORKDIR --out=DIR \\
        --format=reference|hf|vision [--dtype=float32|bfloat16]
    python -m tokenpacker_jax.convert merge-lora --checkpoint=WORKDIR --out=WORKDIR2

``import`` reads a checkpoint in the reference TokenPacker / LLaVA layout plus a local HF
CLIP / SigLIP tower and writes a run workdir (``tokenpacker_jax.reference_import``: what
the run config takes from the reference config). ``export`` writes a run in the reference
layout, as a transformers LLM + the projector (LoRA runs: + a PEFT adapter) or as a
vision-only tower; ``merge-lora`` writes the run without its adapters
(``tokenpacker_jax.run_export``: each format's files). Every command writes into a new or
empty ``--out`` and prints its path.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tokenpacker_jax import user_error
from tokenpacker_jax.reference_import import import_checkpoint
from tokenpacker_jax.run_export import FORMATS, export_checkpoint, merge_lora


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got "
                                         f"{text!r}") from err


def parser() -> argparse.ArgumentParser:
    root = user_error.ArgumentParser(prog="python -m tokenpacker_jax.convert",
                                     description=__doc__.split("\n\n")[0])
    commands = root.add_subparsers(dest="command", required=True)

    imp = commands.add_parser("import", help="reference TokenPacker / LLaVA checkpoint -> "
                                             "run workdir")
    imp.add_argument("--checkpoint", required=True, help="reference checkpoint directory")
    imp.add_argument("--out", required=True, help="workdir to create")
    imp.add_argument("--vision", help="HF CLIP / SigLIP directory (default: mm_vision_tower, "
                                      "if it is a local directory)")
    imp.add_argument("--tokenizer", help="tokenizer directory (default: --checkpoint)")
    imp.add_argument("--multi_layers", type=_layers,
                     help="multi-level feature layers, e.g. 12,16,22,23 (default: the "
                          "config's mm_vision_multi_layers, else the reference's)")
    imp.add_argument("--projector_heads", type=int,
                     help="projector attention heads (default: width / 128)")
    imp.add_argument("--patch_num", type=int, help="HD tile budget (default: patch_num)")
    imp.add_argument("--dtype", default="float32", help="compute dtype of the run config")
    imp.add_argument("--param_dtype", default="float32", help="parameter dtype")

    exp = commands.add_parser("export", help="run workdir -> PyTorch layouts")
    exp.add_argument("--checkpoint", required=True, help="run workdir")
    exp.add_argument("--out", required=True, help="directory to create")
    exp.add_argument("--format", required=True, choices=FORMATS)
    exp.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                     help="cast tensors (default: as stored)")
    exp.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    exp.add_argument("--mm_vision_tower",
                     help="reference: the tower name to write instead of exporting the tower")
    exp.add_argument("--projector_file", default="mm_projector.bin",
                     help="hf: the projector's file name (.bin or .safetensors)")
    exp.add_argument("--max_shard_gb", type=float, default=5.0,
                     help="largest safetensors shard")

    merge = commands.add_parser("merge-lora", help="LoRA run workdir -> run workdir with the "
                                                   "adapters folded in")
    merge.add_argument("--checkpoint", required=True, help="run workdir of a LoRA run")
    merge.add_argument("--out", required=True, help="workdir to create")
    merge.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    return root


def main(argv: Sequence[str] | None = None) -> str:
    args = parser().parse_args(argv)
    if args.command == "merge-lora":
        result = merge_lora(args.checkpoint, args.out, step=args.step)
    elif args.command == "import":
        result = import_checkpoint(
            args.checkpoint, args.out, vision=args.vision, tokenizer=args.tokenizer,
            multi_layers=args.multi_layers, num_heads=args.projector_heads,
            patch_num=args.patch_num, dtype=args.dtype, param_dtype=args.param_dtype)
    else:
        result = export_checkpoint(
            args.checkpoint, args.out, args.format, dtype=args.dtype, step=args.step,
            mm_vision_tower=args.mm_vision_tower, projector_file=args.projector_file,
            max_shard_gb=args.max_shard_gb)
    print(result)
    return result
