"""Table 5: the paper's 7B / 13B training steps compiled for Cloud TPU slices on this
machine (BENCHMARKS.md "TPU fit").

    python -m tokenpacker_jax.bench.tpu_fit [--jobs=2] [--models=vicuna7b:2,...] \\
        [--slices=v5e-16,...] [--[no-]recipes]     # --models= --recipes: the recipes alone

Each entry is ``configs/tokenpacker.py:llm=...,stage=...`` (packed rows, splash attention on
the TPU) on a slice, with ``train.microbatches`` set so that each data-parallel shard holds
one row per microbatch; ``aot.compile_step`` compiles it with libtpu's compile-only devices
and measures it. Samples per step are its rows times the samples a packed row holds on
LLaVA-shaped data (``tokenpacker.PACKED_ROWS``); beside its step time at 40% MFU per 1,000
samples stands the padded config's (``packing=none``: the recipe's batch, one sample per
row; the same analytic FLOPs, not compiled). Prints a line per entry as it finishes, then the
Markdown table. The stage-2 recipes ``lean=true``, ``lora=true`` and
``qlora=true`` follow on the slices they are for, with their own rows per microbatch
(``recipe_microbatches``).
``python -m tokenpacker_jax.bench tpu_fit`` runs this command in a process of its own and
writes the table into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import re
from collections.abc import Sequence

import ml_collections

from tokenpacker_jax import aot, configuration, flops, sharding, user_error
from tokenpacker_jax.configs import tokenpacker
from tokenpacker_jax.user_error import InputError

TABLE_SLICES = ("v5e-8", "v5e-16", "v5e-32", "v5p-8", "v5p-16")
TABLE_MODELS = (("vicuna7b", 1), ("vicuna7b", 2), ("vicuna13b", 1), ("vicuna13b", 2))
# Stage 2 recipes for smaller slices: (llm, variant, slices).
TABLE_RECIPES = (
    ("vicuna7b", "lean=true", ("v5e-8",)),
    ("vicuna13b", "lean=true", ("v5e-16",)),
    ("vicuna7b", "lora=true", ("v5e-4", "v5e-8")),
    ("vicuna13b", "lora=true", ("v5e-4", "v5e-8")),
    ("vicuna7b", "qlora=true", ("v5e-4", "v5e-8")),
    ("vicuna13b", "qlora=true", ("v5e-4", "v5e-8")),
)
GiB = aot.GiB


@dataclasses.dataclass(frozen=True)
class TableEntry:
    label: str  # e.g. "vicuna7b stage 2"
    config: ml_collections.ConfigDict
    topology: aot.Topology
    samples_per_step: float  # rows x samples a row (measured, PACKED_ROWS)
    padded_flops_per_sample: float  # the padded config's analytic FLOPs / its batch


def padded_flops_per_sample(llm: str, stage: int, extra: str = "") -> float:
    """Analytic FLOPs per sample of the padded config (one sample per 2,048 positions);
    ``extra``: more variant settings, e.g. ",lora=true"."""
    config = tokenpacker.get_config(f"llm={llm},stage={stage}{extra},packing=none")
    step = flops.train_step_flops(
        configuration.mllm_config(config), batch=config.data.batch_size,
        length=config.data.max_length, tiles=1, trainable=tuple(config.train.trainable))
    return step.total / config.data.batch_size


def one_sequence_per_shard(config: ml_collections.ConfigDict, topology: aot.Topology) -> None:
    """Sets train.microbatches so that each data-parallel shard (a chip, or a tensor-parallel
    group) holds one sequence per microbatch, the least activation memory the mesh allows;
    the global batch stays. A slice with more data-parallel shards than the step has rows
    (packed stage 1: 16 rows, on 32 chips of FSDP) gives the rest of its chips to the tensor
    axis, so that each shard still holds a whole row."""
    sizes = sharding.mesh_shape(config.mesh.to_dict(), topology.chips)
    replicas = sizes["data"] * sizes["fsdp"]
    if config.data.batch_size < replicas and replicas % config.data.batch_size == 0:
        config.mesh.tensor = sizes["tensor"] * replicas // config.data.batch_size
        config.mesh.fsdp = -1
        sizes = sharding.mesh_shape(config.mesh.to_dict(), topology.chips)
        replicas = sizes["data"] * sizes["fsdp"]
    config.train.microbatches = max(1, config.data.batch_size // replicas)


def recipe_microbatches(config: ml_collections.ConfigDict, topology: aot.Topology) -> None:
    """Keeps a stage-2 recipe's rows per microbatch (``configs/tokenpacker.py`` chose them
    for the slice the recipe is for: lean=true a whole step at once, LoRA one row per
    data-parallel shard of v5e-4) where the slice's data-parallel shards divide them; else
    one row per shard."""
    sizes = sharding.mesh_shape(config.mesh.to_dict(), topology.chips)
    per_microbatch = config.data.batch_size // config.train.microbatches
    if per_microbatch % (sizes["data"] * sizes["fsdp"]):
        one_sequence_per_shard(config, topology)


def paper_table_entries(slices: Sequence[str] = TABLE_SLICES,
                        models: Sequence[tuple[str, int]] = TABLE_MODELS,
                        recipes: Sequence[tuple[str, str, Sequence[str]]] = TABLE_RECIPES
                        ) -> list[TableEntry]:
    """The paper's 7B / 13B stages (scale 2, 2048 positions; the recipe's batches,
    docs/reference.md §7, in packed rows) on each slice, then the stage-2 recipes (lean,
    LoRA, QLoRA) on the slices they are for."""
    runs = [(llm, stage, "", name) for llm, stage in models for name in slices]
    runs += [(llm, 2, f",{variant}", name) for llm, variant, names in recipes for name in names]
    entries = []
    for llm, stage, extra, name in runs:
        topology = aot.parse_topology(name)
        config = tokenpacker.get_config(f"llm={llm},stage={stage}{extra}")
        if extra:
            recipe_microbatches(config, topology)
        else:
            one_sequence_per_shard(config, topology)
        samples_per_row = tokenpacker.PACKED_ROWS[stage, 2][0]
        label = f"{llm} stage {stage}" + (f" {extra[1:]}" if extra else "")
        entries.append(TableEntry(label, config, topology,
                                  config.data.batch_size * samples_per_row,
                                  padded_flops_per_sample(llm, stage, extra)))
    return entries


def _compile_entry(entry: TableEntry) -> aot.FitReport:
    aot.keep_jax_on_the_host()  # a worker process
    return aot.compile_step(entry.config, entry.topology, entry.label)


def fit_table(entries: Sequence[TableEntry], log=None, jobs: int = 1) -> list[aot.FitReport]:
    """Compiles each entry; ``log`` gets a line as each finishes.

    ``jobs`` > 1 compiles that many entries at once in worker processes (the TPU compiler is
    mostly single-threaded: on 2 idle cores, jobs=2 halves the time; each needs up to
    ~4.5 GB of RAM for a 13B model).
    """

    def done(entry: TableEntry, report: aot.FitReport) -> aot.FitReport:
        if log is not None:
            used = (report.out_of_memory if report.out_of_memory else
                    f"{report.total_bytes / GiB:.2f} GiB of {report.hbm_bytes / GiB:.0f} GiB")
            log(f"{entry.label} on {entry.topology.slice_name}: {used}, "
                f"fits: {'yes' if report.fits else 'no'} ({report.compile_seconds:.0f} s)")
        return report

    if jobs <= 1:
        return [done(entry, _compile_entry(entry)) for entry in entries]
    with concurrent.futures.ProcessPoolExecutor(
            max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_compile_entry, entry) for entry in entries]
        for entry, future in zip(entries, futures, strict=True):
            done(entry, future.result())
        return [future.result() for future in futures]


def _short_out_of_memory(message: str) -> str:
    found = re.search(r"temporaries \(([\d.]+\w?)\) exceeds available HBM \(([\d.]+\w?)\)",
                      message)
    if found:
        return f"temporaries alone {found.group(1)} > {found.group(2)} available"
    return message


def fit_table_markdown(reports: Sequence[aot.FitReport],
                       entries: Sequence[TableEntry]) -> str:
    """The reports of ``entries`` as a Markdown table (memory per chip in GiB)."""
    lines = ["| model | slice | mesh fsdp x tensor | rows (microbatches) | samples per step "
             "| arguments | temporaries | total | HBM | fits | PFLOP per step "
             "| step at 40% MFU | per 1,000 samples (padded) | compile |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, entry in zip(reports, entries, strict=True):
        shards = r.mesh["data"] * r.mesh["fsdp"]
        mesh = f"{shards} x {r.mesh['tensor']}" if r.mesh["data"] == 1 else (
            f"{r.mesh['data']} data x {r.mesh['fsdp']} x {r.mesh['tensor']}")
        seconds = r.step_seconds_at_mfu()
        per_thousand = "-"
        if seconds is not None:
            padded = (1000 * entry.padded_flops_per_sample
                      / (0.4 * r.topology.chips * r.peak_flops_per_chip))
            per_thousand = (f"{1000 * seconds / entry.samples_per_step:.1f} s "
                            f"({padded:.1f} s)")
        if r.out_of_memory:
            arguments = temporaries = total = "-"
            fits = f"no: {_short_out_of_memory(r.out_of_memory)}"
        else:
            arguments = f"{r.argument_bytes / GiB:.2f}"
            temporaries = f"{r.temp_bytes / GiB:.2f}"
            total = f"{r.total_bytes / GiB:.2f}"
            fits = "yes" if r.fits else "no"
        lines.append(
            f"| {r.config_name} | {r.topology.slice_name} ({r.topology.name}) | {mesh} | "
            f"{r.batch} ({r.microbatches}) | {entry.samples_per_step:.0f} | {arguments} | "
            f"{temporaries} | {total} | {r.hbm_bytes / GiB:.0f} | {fits} | "
            f"{r.analytic_flops / 1e15:.2f} | "
            f"{'-' if seconds is None else f'{seconds:.1f} s'} | {per_thousand} | "
            f"{r.compile_seconds:.0f} s |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = user_error.ArgumentParser(prog="python -m tokenpacker_jax.bench.tpu_fit",
                                       description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1,
                        help="compile this many entries at once (worker processes)")
    parser.add_argument("--models", default=",".join(f"{m}:{s}" for m, s in TABLE_MODELS),
                        help="the table's rows: LLM:STAGE, comma-separated (empty: none, e.g. with "
                             "--recipes for the recipes alone)")
    parser.add_argument("--slices", default=",".join(TABLE_SLICES),
                        help="the slices each model is compiled for, comma-separated")
    parser.add_argument("--recipes", action=argparse.BooleanOptionalAction, default=None,
                        help="also the stage-2 recipes (lean, LoRA, QLoRA) on their slices "
                             "(default: only when neither --models nor --slices is given)")
    args = parser.parse_args(argv)
    with_recipes = args.recipes
    if with_recipes is None:
        with_recipes = (args.models == parser.get_default("models")
                        and args.slices == parser.get_default("slices"))
    models = []
    for item in filter(None, args.models.split(",")):
        llm, _, stage = item.partition(":")
        if llm not in tokenpacker.LLMS or stage not in ("1", "2"):
            parser.error(f"--models: {item!r} is not LLM:STAGE with LLM one of "
                         f"{', '.join(tokenpacker.LLMS)} and STAGE 1 or 2")
        models.append((llm, int(stage)))
    slices = args.slices.split(",")
    for name in slices:
        try:
            aot.parse_topology(name)
        except InputError as error:
            parser.error(f"--slices: {error}")
    aot.keep_jax_on_the_host()
    entries = paper_table_entries(slices, models, TABLE_RECIPES if with_recipes else ())
    reports = fit_table(entries, log=print, jobs=args.jobs)
    print(fit_table_markdown(reports, entries))


if __name__ == "__main__":
    user_error.run_argparse(main, "tokenpacker_jax.bench.tpu_fit")
