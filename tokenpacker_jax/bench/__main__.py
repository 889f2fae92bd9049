"""Regenerates the tables of BENCHMARKS.md.

    python -m tokenpacker_jax.bench [which ...] [--sizes=full|tiny] [--runs=5] [--write[=FILE]]

``which``: table names or numbers (``tokenpacker_jax/bench/__init__.py``); default: tables
1-5 (``projector token_budget llava_torch training tpu_fit``). ``tpu_fit`` (table 5) runs
``python -m tokenpacker_jax.bench.tpu_fit --jobs=N --no-recipes`` (``--jobs``, default 2:
compiles at once); ``paper`` (table 6) trains the projector comparison for hours, is asked
for by name, and has its own flags (``--seeds``, ``--stage1_steps``, ...; see ``paper_table.py``).

Without ``--write`` the sections are printed (Markdown, for pasting); with it each replaces
the text between its markers in BENCHMARKS.md (``<!-- bench:NAME -->`` ...
``<!-- /bench:NAME -->``; a section without markers is appended), leaving the prose around
them alone. ``--sizes=tiny`` runs tables 1-4 and 6 on toy sizes in seconds (what the tests
do; ``tpu_fit`` has no toy size) and never writes. Timings are polluted by other jobs: run
on an otherwise idle machine.

Tables 1-4 run where JAX runs. With jax on a GPU (``python -m
tokenpacker_jax.bench 1 2 3 4 --write``) their sections are ``projector_gpu``, ... titled
with the device's name, beside the CPU's; float32 matmuls run at full precision on both
sides (``hardware.full_float32``) and the PyTorch side of tables 1 and 3 runs on the same GPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence

from tokenpacker_jax import user_error
from tokenpacker_jax.bench import (
    hardware,
    llava_torch,
    measurement,
    packing,
    paper_table,
    projector,
    report,
    token_budget,
    training,
)

TABLES = ("projector", "token_budget", "llava_torch", "training", "tpu_fit", "paper",
          "packing")
DEFAULT = (*TABLES[:5], "packing")  # paper (6) trains for hours: by name only
BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "BENCHMARKS.md")


def tpu_fit(jobs: int, log=print) -> report.Section:
    """Table 5: runs ``python -m tokenpacker_jax.bench.tpu_fit --no-recipes`` (its own
    process: libtpu's compile-only devices stay out of this one) and keeps its Markdown table
    (the recipes' table, ``--models= --recipes``, is BENCHMARKS.md's "TPU fit of the recipes")."""
    command = [sys.executable, "-m", "tokenpacker_jax.bench.tpu_fit", f"--jobs={jobs}",
               "--no-recipes"]
    log(" ".join(command))
    process = subprocess.run(command, capture_output=True, text=True, check=False)
    if process.returncode:
        raise RuntimeError(f"bench.tpu_fit failed ({process.returncode}):\n"
                           f"{process.stderr[-3000:]}")
    lines = process.stdout.splitlines()
    table = [line for line in lines if line.startswith("|")]
    for line in lines:
        if not line.startswith("|"):
            log(line)
    # The table alone: BENCHMARKS.md's "TPU fit" prose around its markers says the rest.
    return report.Section("tpu_fit", "TPU fit table", "\n".join(table))


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = user_error.ArgumentParser(prog="python -m tokenpacker_jax.bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("which", nargs="*", default=[],
                        help=f"tables by name or number 1-7: {', '.join(TABLES)} "
                             f"(default: {' '.join(DEFAULT)})")
    parser.add_argument("--sizes", choices=("full", "tiny"), default="full")
    parser.add_argument("--runs", type=int, default=measurement.MIN_RUNS,
                        help="timed calls per figure (median; at least 5)")
    parser.add_argument("--write", nargs="?", const=BENCHMARKS, default=None, metavar="FILE",
                        help=f"update the sections in FILE (default {BENCHMARKS})")
    parser.add_argument("--torch_threads", type=int, default=0,
                        help="torch.set_num_threads (0: torch's default, one per core)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="tpu_fit: compiles at once (each takes one core and ~2.7 GB)")
    paper = parser.add_argument_group("paper (table 6); unset: the main job's (recipe.Recipe)")
    paper.add_argument("--workdir", default="/tmp/tokenpacker_bench_paper")
    paper.add_argument("--seeds", type=int, default=3)
    paper.add_argument("--stage0_steps", type=int, default=None,
                       help="tower pretraining steps (0: none)")
    paper.add_argument("--stage1_steps", type=int, default=None)
    paper.add_argument("--stage2_steps", type=int, default=None)
    paper.add_argument("--num", type=int, default=None, help="training images")
    paper.add_argument("--num_eval", type=int, default=None, help="val / test images each")
    paper.add_argument("--jitter", type=int, default=None,
                       help="px items may sit off their cells' centres (-1: anywhere)")
    paper.add_argument("--projectors", default=",".join(paper_table.PROJECTORS),
                       help="projectors compared (mlp2x_gelu: at all tokens; the others at "
                            "each budget)")
    paper.add_argument("--budgets", default="2,3", help="scale factors (2: 9 tokens, 3: 4)")
    args = parser.parse_args(argv)
    names = []
    for item in args.which:
        name = TABLES[int(item) - 1] if item.isdigit() and 1 <= int(item) <= 7 else item
        if name not in TABLES:
            parser.error(f"unknown table {item!r}; known: {', '.join(TABLES)} or 1-7")
        names.append(name)
    if args.sizes == "tiny" and "tpu_fit" in names:
        parser.error("tpu_fit has no tiny size (it compiles the 7B / 13B table for TPU slices)")
    if not names:
        names = [n for n in DEFAULT if args.sizes == "full" or n != "tpu_fit"]
    args.which = names
    if args.runs < measurement.MIN_RUNS and args.sizes == "full":
        parser.error(f"--runs must be at least {measurement.MIN_RUNS} (medians of 5 runs)")
    if args.write and args.sizes != "full":
        parser.error("--write records full-size figures only (drop --sizes=tiny)")
    return args


def run_table(name: str, args: argparse.Namespace) -> report.Section:
    if name == "projector":
        return projector.run(args.sizes, args.runs)
    if name == "token_budget":
        return token_budget.run(args.sizes, args.runs)
    if name == "llava_torch":
        return llava_torch.run(args.sizes, args.runs)
    if name == "training":
        return training.run(args.sizes, args.runs)
    if name == "tpu_fit":
        return tpu_fit(args.jobs)
    if name == "packing":
        return packing.run(args.sizes, args.runs)
    sizes = dict(stage0_steps=args.stage0_steps, stage1_steps=args.stage1_steps,
                 stage2_steps=args.stage2_steps,
                 num=args.num, num_eval=args.num_eval, jitter=args.jitter)
    if args.sizes == "tiny":  # unset sizes: a few steps on a few images
        tiny = dict(stage0_steps=2, stage1_steps=1, stage2_steps=2, num=16, num_eval=2, jitter=0)
        sizes = {k: tiny[k] if v is None else v for k, v in sizes.items()}
    return paper_table.run(
        workdir=args.workdir, seeds=args.seeds,
        projectors=[p for p in args.projectors.split(",") if p],
        budgets=[int(b) for b in args.budgets.split(",") if b],
        adjust=training.shrink if args.sizes == "tiny" else None, **sizes)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    if hardware.accelerator() is not None:
        hardware.full_float32()
    if args.torch_threads:
        import torch  # noqa: PLC0415 (torch: optional, the PyTorch side of a comparison)

        torch.set_num_threads(args.torch_threads)
    for name in args.which:
        start = time.perf_counter()
        section = run_table(name, args)
        print(f"[{name}: {time.perf_counter() - start:.0f} s]", file=sys.stderr)
        if args.write:
            report.update_section(args.write, section)
            print(f"updated section {section.name!r} of {args.write}", file=sys.stderr)
        else:
            print(section.markdown(), flush=True)


if __name__ == "__main__":
    user_error.run_argparse(main, "tokenpacker_jax.bench")
