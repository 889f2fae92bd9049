"""How a table measures: time (the timing rule), the memory XLA plans for a program, and
parameters drawn on the host.

Timing rule: a figure is the median of at least ``runs`` (5) calls after
``warmup`` calls; compilation is done beforehand (``compile_jit``: ``lower().compile()``) and
reported apart; every call ends in ``wait`` (JAX's ``block_until_ready``, and PyTorch's CUDA
queue drained), so asynchronous dispatch does not hide work. The sides of a comparison are
timed in turns (``time_interleaved``), so a machine whose speed drifts slows both alike.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Mapping
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
