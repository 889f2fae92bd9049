"""Where a compiled program spends its time on the CPU: thread time per XLA operation,
from a ``jax.profiler`` trace, each operation named as in the optimised HLO.

XLA:CPU runs independent operations of one program on different threads at once, so the
figures are thread time (summed over the threads an operation ran on), not wall time; their
shares say what the cores spent the call on.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax

from tokenpacker_jax.bench import measurement

# ``%name = f32[8,144]{1,0} fusion(...), kind=kLoop, calls=%fused_computation.3, ...``
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) (\S+?)\(.*?(?:calls=%(\S+?)[,\s]|$)")
COMPUTATION = re.compile(r"^%(\S+) \(.*\{$")
OP_NAME = re.compile(r'op_name="(?:jit\([^)]*\)/)?([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation of the program's entry computation and its thread time per call."""

    name: str  # as in the optimised HLO (``ynn_fusion.12``, ``dot.8``)
    shape: str  # its result, e.g. ``f32[4608,1024]{1,0}``
    matmul: bool  # a dot, or a fusion holding one
    source: str  # the JAX operation it came from (``TokenPacker/k_proj_1_0/dot_general``)
    ms: float  # thread time per call


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, bool, str]]:
    """{entry instruction name: (result shape, holds a matmul, source)} of an optimised HLO
    module (``compiled.as_text()``); the source is the instruction's ``op_name`` less its
    ``jit(...)/`` prefix (Flax modules name their scope in it)."""
    bodies: dict[str, list[str]] = collections.defaultdict(list)
    entry: list[str] = []
    current: list[str] | None = None
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY "):
            current = entry
        elif (match := COMPUTATION.match(line)) is not None:
            current = bodies[match.group(1)]
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    ops = {}
    for line in entry:
        if (match := INSTRUCTION.match(line)) is None:
            continue
        name, shape, opcode, called = match.groups()
        holds_dot = opcode in ("dot", "convolution") or any(
            " dot(" in body or " convolution(" in body for body in bodies.get(called or "", ()))
        source = OP_NAME.search(line)
        ops[name] = (shape, holds_dot, source.group(1) if source else "")
    return ops


def profile(compiled: Any, call: Callable[[], Any], runs: int = measurement.MIN_RUNS
            ) -> list[Op]:
    """Thread time per operation of ``compiled`` (a ``compile_jit`` program) over ``runs``
    calls of ``call`` (which runs it), slowest first. Calls made before it (warm-up) are not
    counted; operations of other programs are left out."""
    ops = hlo_ops(compiled.as_text())
    nanoseconds: collections.Counter[str] = collections.Counter()
    measurement.wait(call())
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            for _ in range(runs):
                measurement.wait(call())
        (path,) = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in ops:
                    nanoseconds[event.name] += event.duration_ns
    return [Op(name, *ops[name], ms=total / runs / 1e6)
            for name, total in nanoseconds.most_common()]
