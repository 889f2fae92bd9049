"""Ahead-of-time compilation for a TPU slice on this CPU machine (libtpu's compile-only
devices): the tiny config's real training step and the printed report."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tokenpacker_jax import aot, configuration
from tokenpacker_jax.configs import tokenpacker

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


@pytest.mark.parametrize("text,generation,shape,chips,slice_name", [
    ("v5e:4x4", "v5e", (4, 4), 16, "v5e-16"),
    ("v5e-32", "v5e", (4, 8), 32, "v5e-32"),
    ("v5e-8", "v5e", (2, 4), 8, "v5e-8"),
    ("v5p-8", "v5p", (2, 2, 1), 4, "v5p-8"),
    ("v5p:2x2x2", "v5p", (2, 2, 2), 8, "v5p-16"),
    ("v4-8", "v4", (2, 2, 1), 4, "v4-8"),
    ("v6e:2x4", "v6e", (2, 4), 8, "v6e-8"),
])
def test_topology_names(text, generation, shape, chips, slice_name):
    topology = aot.parse_topology(text)
    assert (topology.generation, topology.shape) == (generation, shape)
    assert topology.chips == chips and topology.slice_name == slice_name


@pytest.mark.parametrize("text,message", [
    ("v5e:4x4x4", "2 dimensions"), ("v5p:4x4", "3 dimensions"), ("v9-8", "GEN"),
    ("v5p-6", "no known v5p slice"), ("v5e", "GEN")])
def test_bad_topology_names(text, message):
    with pytest.raises(ValueError, match=message):
        aot.parse_topology(text)


def test_hbm_per_generation():
    assert {g: aot.GENERATIONS[g].hbm_bytes / GIB for g in aot.GENERATIONS} == {
        "v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


def test_microbatches_must_divide_over_the_data_parallel_chips():
    config = tokenpacker.get_config("llm=vicuna7b,stage=2")  # 32 packed rows, 2 microbatches
    aot.check_microbatches(config, {"data": 1, "fsdp": 16, "tensor": 1})
    with pytest.raises(configuration.ConfigError, match=r"train.microbatches: 2 .* 32 chips"):
        aot.check_microbatches(config, {"data": 2, "fsdp": 16, "tensor": 1})


def test_out_of_memory_message_and_verdict():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
               "HLO temporaries (18.89G) exceeds available HBM (15.75G).\nmore detail")
    assert aot._out_of_memory_message(RuntimeError(message)) == (
        "Ran out of memory on HBM, the total memory required for HLO temporaries (18.89G) "
        "exceeds available HBM (15.75G).")
    assert aot._out_of_memory_message(RuntimeError("INVALID_ARGUMENT: bad shapes")) is None
    report = aot.FitReport("x", aot.parse_topology("v5e:2x2"), "TPU v5 lite",
                           {"data": 1, "fsdp": 4, "tensor": 1}, 16, 256, 1,
                           argument_bytes=10 * GIB, output_bytes=10 * GIB,
                           alias_bytes=10 * GIB, temp_bytes=7 * GIB, analytic_flops=4 * 197e12)
    assert report.total_bytes == 17 * GIB and not report.fits
    assert report.lines()[-1] == "fits: no"
    assert report.step_seconds_at_mfu(0.5) == pytest.approx(2.0)


def test_cli_compiles_the_tiny_step_for_v5e_2x2():
    """The real step of train.py (stage 2: tower, projector and LLM train) compiled for four
    v5e chips; the report's fields and its last line."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "tokenpacker_jax.aot", "--config=configs/tiny.py:stage=2",
         "--topology=v5e:2x2", "--config.train.microbatches=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    text = "\n".join(lines)
    assert lines[-1] == "fits: yes"
    assert "config: configs/tiny.py:stage=2 --config.train.microbatches=2" in text
    assert "topology: v5e:2x2 (v5e-4, 4 chips, TPU v5 lite); mesh data=1 fsdp=4 tensor=1" \
        in text
    assert "global batch 16 x 88 tokens in 2 microbatch(es) of 8 (2 per data-parallel " \
        "shard)" in text

    def size(field):
        value, unit = re.search(rf"^\s*{field}:\s+([\d.]+) (MiB|GiB)", text, re.M).groups()
        return float(value) * (1 if unit == "MiB" else 1024)

    memory = {f: size(f) for f in ("arguments", "outputs", "temporaries", "generated code",
                                   "total")}
    assert all(v > 0 for v in memory.values()), memory
    assert memory["total"] < 16 * 1024
    assert re.search(r"^HBM per chip:\s+16.00 GiB$", text, re.M)
    xla = float(re.search(r"FLOPs per step \(XLA cost analysis.*\): ([\d.e+]+)", text).group(1))
    analytic = float(re.search(r"FLOPs per step \(analytic, flops.py\): ([\d.e+]+)",
                               text).group(1))
    assert xla > 0 and analytic > 0
    assert re.search(r"step time at 40% MFU: [\d.e+-]+ s \(peak 197 TFLOP/s per chip\)", text)
