"""What every benchmark table shares: timing, the machine, Markdown, BENCHMARKS.md sections.

Timing rule: a figure is the median of at least ``runs`` (5) calls after
``warmup`` calls; compilation is done beforehand (``compile_jit``: ``lower().compile()``) and
reported apart; every call ends in ``wait`` (JAX's ``block_until_ready``, and PyTorch's CUDA
queue drained), so asynchronous dispatch does not hide work. The sides of a comparison are
timed in turns (``time_interleaved``), so a machine whose speed drifts slows both alike.

Tables run where JAX runs: on the CPU their sections are ``projector``, ``training``, ...; on
a GPU ``projector_gpu``, ... titled with the device's name, so both stay in
BENCHMARKS.md, and the PyTorch side of a comparison runs on the same GPU (``torch_device``).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MIN_RUNS = 5
MiB = 1024**2


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds of the timed calls (compilation and warm-up excluded)."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def ms(self) -> float:
        return 1e3 * self.median


def compile_jit(fn: Callable, *args, **jit_kwargs) -> tuple[Any, float]:
    """(compiled program, compile seconds) of ``jax.jit(fn, **jit_kwargs)`` for ``args``."""
    start = time.perf_counter()
    compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
    return compiled, time.perf_counter() - start


def wait(result: Any) -> Any:
    """Returns ``result`` once it is computed: JAX arrays are waited for, and so is PyTorch's
    CUDA queue (a torch call on a GPU returns before its kernels have run; on the CPU it
    returns when done)."""
    jax.block_until_ready(result)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return result


def time_calls(call: Callable[[], Any], *, runs: int = MIN_RUNS, warmup: int = 1) -> Timing:
    """Median-ready timings of ``call()``, each ended by ``wait``."""
    return time_interleaved({"call": call}, runs=runs, warmup=warmup)["call"]


def time_interleaved(calls: Mapping[str, Callable[[], Any]], *, runs: int = MIN_RUNS,
                     warmup: int = 1) -> dict[str, Timing]:
    """Timings of the two sides of a comparison (or more), taken in turns: every round times
    each call once, the order rotating from round to round. On a shared machine whose speed
    drifts over seconds, each side then sees the same conditions; one side timed after the
    other would carry the drift into the ratio."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            wait(calls[name]())
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(runs):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            wait(calls[name]())
            seconds[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(values)) for name, values in seconds.items()}


def random_params(module: Any, *args, seed: int = 0, **kwargs) -> Any:
    """Parameters of ``module`` for ``module.init(key, *args, **kwargs)``'s shapes, drawn with
    NumPy: N(0, 0.02) (the models' own init scale), LayerNorm / RMSNorm scales 1, biases 0.

    Speed does not depend on the values; drawing them on the host skips compiling the init
    (seconds for each model on a CPU, more than the timed work at small sizes).
    """
    abstract = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args,
                                            **kwargs))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            value = np.ones(leaf.shape, np.float32)
        elif name == "bias":
            value = np.zeros(leaf.shape, np.float32)
        else:
            value = 0.02 * rng.standard_normal(leaf.shape, np.float32)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def program_bytes(compiled: Any) -> int:
    """Peak bytes XLA plans for one compiled program: arguments + outputs not aliasing an
    argument + temporaries (+ generated code)."""
    memory = compiled.memory_analysis()
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes
            + memory.generated_code_size_in_bytes)


# -- the machine ---------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else ``platform``)."""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def accelerator() -> str | None:
    """JAX's default backend when it is not the CPU (``"gpu"``, ``"tpu"``), else None."""
    backend = jax.default_backend()
    return None if backend == "cpu" else backend


def torch_device() -> Any:
    """The ``torch.device`` of a comparison's PyTorch side: JAX's device kind, so that both
    are measured on the same hardware (CUDA when JAX runs on a GPU)."""
    import torch  # noqa: PLC0415 (torch: optional, the PyTorch side of a comparison)

    backend = accelerator()
    if backend is None:
        return torch.device("cpu")
    if backend == "gpu" and torch.cuda.is_available():
        return torch.device("cuda")
    raise RuntimeError(f"JAX runs on {backend} ({jax.devices()[0].device_kind}) but PyTorch "
                       f"{torch.__version__} has no device of that kind: a comparison "
                       "measures both sides on the same hardware")


def full_float32() -> None:
    """float32 matmuls at full precision in JAX, as PyTorch does by default (``machine``
    reports PyTorch's TF32 setting), so the tables compare like with like and stay float32
    as on the CPU: JAX on a GPU otherwise rounds matmul inputs to TF32."""
    jax.config.update("jax_default_matmul_precision", "highest")


def machine(torch_threads: bool = False) -> str:
    """One line naming where the figures were taken: CPU, cores, JAX device, versions, load
    (and on an accelerator, the matmul precision)."""
    device = jax.devices()[0]
    parts = [f"{cpu_model()}, {usable_cores()} cores",
             f"JAX {jax.__version__} on {device.platform} ({device.device_kind}, "
             f"{jax.device_count()} device{'s' if jax.device_count() > 1 else ''})"]
    if accelerator() is not None:
        parts.append("float32 matmul precision "
                     f"{jax.config.jax_default_matmul_precision or 'default'}")
    if torch_threads:
        import torch  # noqa: PLC0415 (torch: optional, the PyTorch side of a comparison)

        threads = torch.get_num_threads()
        if torch_device().type == "cuda":
            tf32 = "on" if torch.backends.cuda.matmul.allow_tf32 else "off"
            where = f"on {torch.cuda.get_device_name()}, TF32 {tf32}"
        else:
            where = f"{threads} thread{'s' * (threads != 1)}"
        parts.append(f"PyTorch {torch.__version__} ({where})")
    if hasattr(os, "getloadavg"):
        parts.append(f"load average {os.getloadavg()[0]:.1f} at the start")
    return "; ".join(parts)


# -- Markdown ------------------------------------------------------------------------------------

def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells for {len(headers)} headers")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "**met**" if met else "**not met**"


@dataclasses.dataclass(frozen=True)
class Section:
    """One generated part of BENCHMARKS.md: ``body`` goes between its markers."""

    name: str  # marker key: <!-- bench:NAME --> ... <!-- /bench:NAME -->
    title: str  # heading used when the section is added the first time
    body: str  # Markdown

    def markdown(self) -> str:
        return f"## {self.title}\n\n{self.body}\n"


def section(name: str, title: str, body: str) -> Section:
    """The ``Section`` of a table measured where JAX runs: ``name`` on the CPU; on an
    accelerator ``{name}_{backend}`` titled with the device's name (``projector_gpu``,
    "... on NVIDIA H100 80GB HBM3"), so BENCHMARKS.md keeps the CPU's figures beside it."""
    backend = accelerator()
    if backend is None:
        return Section(name, title, body)
    return Section(f"{name}_{backend}", f"{title} on {jax.devices()[0].device_kind}", body)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def update_section(path: str, section: Section) -> None:
    """Replaces the text between the section's markers in ``path`` (the prose around them is
    kept), or appends the section with its heading and markers if the file has none."""
    start, end = _markers(section.name)
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    block = f"{start}\n{section.body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + f"\n\n## {section.title}\n\n{block}\n"
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
