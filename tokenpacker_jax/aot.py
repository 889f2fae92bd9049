"""Compiles the real training step for a Cloud TPU slice on this machine (no TPU needed).

    python -m tokenpacker_jax.aot --config=configs/tokenpacker.py:llm=vicuna7b,stage=2 \\
        --topology=v5e:4x4 [--config.train.microbatches=16]

libtpu (``pip install "jax[tpu]==0.10.2"``) describes the slice
(``jax.experimental.topologies``): its compile-only devices make the mesh, and the step that
``train.py`` runs (``assembly.assemble``: same shardings, donated state, the config's
microbatches) is lowered on abstract arguments (``ShapeDtypeStruct`` with shardings: no
parameter is ever allocated, so a 13B model costs only the compiler's memory) and compiled
for the TPU. The report gives XLA's per-chip memory (arguments, outputs, temporaries,
generated code), the chip's HBM, FLOPs per step (XLA's and ``flops.py``'s), and ends with
``fits: yes`` or ``fits: no``.

BENCHMARKS.md's "TPU fit" table of the paper's models on several slices is
``python -m tokenpacker_jax.bench tpu_fit`` (``bench/tpu_fit.py``).

Topologies: ``GEN:AxB`` (v5e, v6e) or ``GEN:AxBxC`` (v4, v5p) in chips, or a slice name as
Cloud TPU spells it: ``v5e-16`` (chips) or ``v5p-8`` / ``v4-8`` (TensorCores: 4 chips).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

# libtpu on a machine without TPUs: do not ask a GCE metadata server for the TPU's type, do
# not take the multi-process lockfile (a training job on a TPU VM may hold it), and give it
# the worker fields it would otherwise warn about. Only libtpu reads these.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_WORKER_ID", "0")

import jax
import ml_collections
from absl import flags
from jax.experimental import mesh_utils, topologies
from ml_collections import config_flags

from tokenpacker_jax import assembly, configuration, flops, sharding, user_error
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.models import attention
from tokenpacker_jax.user_error import InputError, UserError

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """What a topology string needs to become libtpu's description, and the chip's HBM."""

    libtpu_name: str  # libtpu's topology prefix ("v5" is v5p)
    chip_config: str  # "megacore": both TensorCores of a chip as one device
    hbm_bytes: int
    dims: int  # 2 (v5e, v6e: AxB chips) or 3 (v4, v5p: AxBxC chips)
    cores_per_chip_in_name: int  # v4-8 and v5p-8 count TensorCores: 4 chips


GENERATIONS: dict[str, TpuGeneration] = {
    "v4": TpuGeneration("v4", "megacore", 32 * GiB, 3, 2),
    "v5e": TpuGeneration("v5e", "default", 16 * GiB, 2, 1),
    "v5p": TpuGeneration("v5", "megacore", 95 * GiB, 3, 2),
    "v6e": TpuGeneration("v6e", "default", 32 * GiB, 2, 1),
}

# Chips -> the slice's shape, as Cloud TPU lays them out.
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8)}


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: str  # key of GENERATIONS
    shape: tuple[int, ...]  # chips per dimension

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def hbm_bytes(self) -> int:
        return GENERATIONS[self.generation].hbm_bytes

    @property
    def name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def slice_name(self) -> str:
        """Cloud TPU's accelerator type (v5e-16, v5p-8)."""
        gen = GENERATIONS[self.generation]
        return f"{self.generation}-{self.chips * gen.cores_per_chip_in_name}"


def parse_topology(text: str) -> Topology:
    """``v5e:4x4``, ``v5p:2x2x1``, ``v5e-16`` or ``v5p-8`` -> Topology."""
    match = re.fullmatch(r"(v\d+[a-z]?)(?::([\dx]+)|-(\d+))", text.strip().lower())
    if not match or match.group(1) not in GENERATIONS:
        raise InputError(f"topology {text!r}: expected GEN:AxB[xC] or GEN-N with GEN one of "
                         f"{sorted(GENERATIONS)} (e.g. v5e:4x4, v5e-16, v5p:2x2x2, v5p-16)")
    generation = GENERATIONS[match.group(1)]
    if match.group(2):
        shape = tuple(int(d) for d in match.group(2).split("x"))
        if len(shape) != generation.dims or min(shape) < 1:
            raise InputError(f"topology {text!r}: {match.group(1)} slices have "
                             f"{generation.dims} dimensions of chips")
    else:
        count = int(match.group(3))
        chips, rest = divmod(count, generation.cores_per_chip_in_name)
        shapes = _SHAPES_2D if generation.dims == 2 else _SHAPES_3D
        if rest or chips not in shapes:
            raise InputError(f"topology {text!r}: no known {match.group(1)} slice of {count} "
                             f"(known: {[c * generation.cores_per_chip_in_name for c in shapes]};"
                             f" or give the shape, e.g. {match.group(1)}:"
                             f"{'x'.join(['2'] * generation.dims)})")
        shape = shapes[chips]
    return Topology(match.group(1), shape)


def topology_devices(topology: Topology) -> list[Any]:
    """libtpu's compile-only devices of the slice (one per chip)."""
    gen = GENERATIONS[topology.generation]
    shape3 = tuple(topology.shape) + (1,) * (3 - len(topology.shape))
    # Hosts of 2x2x1 chips (a single host for the smallest slices); wrap-around links only
    # where a dimension is a full ring (16 chips in 2D, all of 4+ in 3D).
    per_host = tuple(min(d, b) for d, b in zip(shape3, (2, 2, 1), strict=True))
    if gen.dims == 3:
        wrap = (min(shape3) >= 4,) * 3
    else:
        wrap = tuple(d == 16 for d in shape3[:2]) + (False,)
    dims = shape3 if gen.dims == 3 else topology.shape
    try:
        description = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{gen.libtpu_name}:{'x'.join(map(str, dims))}",
            chip_config_name=gen.chip_config, chips_per_host_bounds=per_host, num_slices=1,
            wrap=wrap)
    except RuntimeError as err:
        if "TPU support not installed" in str(err):
            raise UserError('aot needs libtpu: pip install "jax[tpu]==0.10.2" (it runs on '
                            "a machine without TPUs too)") from err
        raise
    devices = list(description.devices)
    if len(devices) != topology.chips:
        raise RuntimeError(f"libtpu described {len(devices)} devices for {topology.name}, "
                           f"expected {topology.chips}")
    return devices


def keep_jax_on_the_host() -> None:
    """Runs jax on the CPU unless JAX_PLATFORMS says otherwise: the host's own devices hold
    nothing here, and a local TPU may be in use by a training job."""
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")


def _mesh(config: ml_collections.ConfigDict, devices: Sequence[Any]) -> jax.sharding.Mesh:
    """The config's (data, fsdp, tensor) mesh over the slice, laid out along its links."""
    sizes = sharding.mesh_shape(config.mesh.to_dict(), len(devices))
    shape = tuple(sizes[axis] for axis in sharding.MESH_AXES)
    ordered = mesh_utils.create_device_mesh(shape, list(devices),
                                            allow_split_physical_axes=True).reshape(-1)
    return sharding.make_mesh(sizes, devices=list(ordered))


@dataclasses.dataclass
class FitReport:
    """Per-chip memory of the compiled step and its FLOPs. Byte counts are per chip."""

    config_name: str
    topology: Topology
    device_kind: str
    mesh: dict[str, int]
    batch: int
    length: int
    microbatches: int
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    xla_flops: float | None = None  # whole step, all chips (XLA's cost analysis)
    analytic_flops: float = 0.0  # flops.train_step_flops
    compile_seconds: float = 0.0
    out_of_memory: str = ""  # the compiler's message when the program exceeded HBM
    rows: str = "one sample per row"  # or "packed (STRATEGY: up to N tile slots and K ...)"
    attention: str = ""  # the packed rows' attention kernel (models/attention.py)

    @property
    def total_bytes(self) -> int:
        """What the step holds on a chip at its peak: its arguments, the outputs that do not
        reuse (alias) a donated argument's buffer, temporaries and the program itself."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    @property
    def hbm_bytes(self) -> int:
        return self.topology.hbm_bytes

    @property
    def fits(self) -> bool:
        return not self.out_of_memory and self.total_bytes <= self.hbm_bytes

    @property
    def peak_flops_per_chip(self) -> float | None:
        return flops.peak_flops_per_device(self.device_kind)

    def step_seconds_at_mfu(self, mfu: float = 0.4) -> float | None:
        peak = self.peak_flops_per_chip
        if not peak:
            return None
        return self.analytic_flops / (mfu * self.topology.chips * peak)

    def lines(self) -> list[str]:
        def gib(n: float) -> str:
            return f"{n / GiB:8.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:8.1f} MiB"

        mesh = " ".join(f"{axis}={size}" for axis, size in self.mesh.items())
        per_micro = self.batch // self.microbatches
        replicas = self.mesh["data"] * self.mesh["fsdp"]
        out = [
            f"config: {self.config_name}",
            f"topology: {self.topology.name} ({self.topology.slice_name}, "
            f"{self.topology.chips} chips, {self.device_kind}); mesh {mesh}",
            f"step: global batch {self.batch} x {self.length} tokens in {self.microbatches} "
            f"microbatch(es) of {per_micro} ({per_micro / replicas:g} per data-parallel shard)",
            f"rows: {self.rows}; attention: {self.attention}",
        ]
        if self.out_of_memory:
            out.append(f"compile: out of memory: {self.out_of_memory}")
        else:
            out += [
                "memory per chip:",
                f"  arguments:      {gib(self.argument_bytes)}",
                f"  outputs:        {gib(self.output_bytes)}  (reusing donated arguments: "
                f"{gib(self.alias_bytes).strip()})",
                f"  temporaries:    {gib(self.temp_bytes)}",
                f"  generated code: {gib(self.code_bytes)}",
                f"  total:          {gib(self.total_bytes)}",
            ]
        out.append(f"HBM per chip:     {gib(self.hbm_bytes)}")
        if self.xla_flops is not None:
            # XLA's HloCostAnalysis counts a while loop's body once: the layer scan and the
            # microbatch loop make its figure a fraction of the step's.
            out.append(f"FLOPs per step (XLA cost analysis, loop bodies counted once): "
                       f"{self.xla_flops:.4g}")
        out.append(f"FLOPs per step (analytic, flops.py): {self.analytic_flops:.4g}")
        seconds = self.step_seconds_at_mfu()
        if seconds is not None:
            out.append(f"step time at 40% MFU: {seconds:.3g} s "
                       f"(peak {self.peak_flops_per_chip / 1e12:.0f} TFLOP/s per chip)")
        out.append(f"compile time: {self.compile_seconds:.1f} s")
        out.append(f"fits: {'yes' if self.fits else 'no'}")
        return out


def _out_of_memory_message(error: Exception) -> str | None:
    """The compiler's sentence when the program does not fit in HBM (None: another error).

    libtpu says e.g. "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory
    required for HLO temporaries (18.89G) exceeds available HBM (15.75G)."
    """
    text = str(error)
    found = re.search(r"Ran out of memory[^\n]*", text)
    if found:
        return found.group(0).strip()
    if "RESOURCE_EXHAUSTED" in text:
        return text.strip().splitlines()[0][:300]
    return None


def check_microbatches(config: ml_collections.ConfigDict, mesh: dict[str, int]) -> None:
    """Each microbatch must still split evenly over the data-parallel chips."""
    batch, micro = config.data.batch_size, config.train.microbatches
    replicas = mesh["data"] * mesh["fsdp"]
    valid = [m for m in range(1, batch + 1) if batch % m == 0 and (batch // m) % replicas == 0]
    if micro not in valid:
        raise configuration.ConfigError(
            f"train.microbatches: {micro} splits the global batch {batch} into pieces that "
            f"do not divide over the data x fsdp = {replicas} chips (valid: {valid})")


def compile_step(config: ml_collections.ConfigDict, topology: str | Topology,
                 config_name: str = "") -> FitReport:
    """Compiles the training step of ``config`` for ``topology`` and measures it.

    Nothing is allocated: parameters, optimizer state and the batch are ShapeDtypeStructs
    carrying their shardings on the slice's compile-only devices.
    """
    topology = parse_topology(topology) if isinstance(topology, str) else topology
    devices = topology_devices(topology)
    configuration.validate(config, num_devices=len(devices))
    mesh = _mesh(config, devices)
    mesh_sizes = dict(mesh.shape)
    check_microbatches(config, mesh_sizes)
    # The schedule's length changes constants only, not the program's memory.
    total_steps = config.train.num_steps if config.train.num_steps > 0 else 1000
    run = assembly.assemble(config, mesh, total_steps=total_steps)
    batch_args = batch_lib.abstract_batch(batch_lib.Dims.of_config(config),
                                          config.data.batch_size, mesh)
    dims = batch_lib.Dims.of_config(config)
    report = FitReport(
        config_name=config_name, topology=topology, device_kind=devices[0].device_kind,
        mesh=mesh_sizes, batch=config.data.batch_size, length=config.data.max_length,
        microbatches=config.train.microbatches, analytic_flops=run.step_flops())
    if batch_lib.is_packed(config.data):
        report.rows = (f"packed ({config.data.packing}: up to {dims.tiles} tile slots and "
                       f"{dims.samples} samples a row)")

    start = time.perf_counter()
    with run.use_mesh():
        report.attention = attention.attention_kernel(run.model.config.decoder, dims.length)
        lowered = run.train_step.lower(run.state_targets(), batch_args)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as err:
            message = _out_of_memory_message(err)
            if message is None:
                raise
            report.out_of_memory = message
            report.compile_seconds = time.perf_counter() - start
            return report
    report.compile_seconds = time.perf_counter() - start

    memory = compiled.memory_analysis()
    report.argument_bytes = memory.argument_size_in_bytes
    report.output_bytes = memory.output_size_in_bytes
    report.alias_bytes = memory.alias_size_in_bytes
    report.temp_bytes = memory.temp_size_in_bytes
    report.code_bytes = memory.generated_code_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops") is not None:
        report.xla_flops = float(cost["flops"]) * topology.chips
    return report


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    keep_jax_on_the_host()
    if FLAGS.table:
        raise flags.IllegalFlagValueError(
            "the TPU fit table moved: python -m tokenpacker_jax.bench tpu_fit (or python -m "
            "tokenpacker_jax.bench.tpu_fit --jobs=N to print it)")
    if FLAGS.config is None or not FLAGS.topology:
        raise flags.IllegalFlagValueError("--config and --topology are required")
    overrides = config_flags.get_override_values(FLAGS["config"])
    name = " ".join([config_flags.get_config_filename(FLAGS["config"]),
                     *(f"--config.{key}={value}" for key, value in overrides.items())])
    report = compile_step(FLAGS.config, FLAGS.topology, name)
    print("\n".join(report.lines()))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Config file (with :variant).",
                                    lock_config=True)
    flags.DEFINE_string("topology", "", "TPU slice: v5e:4x4, v5e-16, v5p:2x2x2, v5p-16, ...")
    flags.DEFINE_bool("table", False, "Moved: python -m tokenpacker_jax.bench tpu_fit.")
    user_error.run_absl(main, "tokenpacker_jax.aot")
