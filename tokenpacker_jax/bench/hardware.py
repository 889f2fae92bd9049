"""The hardware a table runs on: which device each side of a comparison uses, at which
float32 precision, and the one line that names it all in BENCHMARKS.md (``machine``).

Tables run where JAX runs; the PyTorch side of a comparison runs on the same kind of device
(``torch_device``: CUDA when JAX runs on a GPU), and on an accelerator both sides multiply
float32 at full precision (``full_float32``).
"""

from __future__ import annotations

import os
import platform
from typing import Any

import jax
import numpy as np


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else ``platform``)."""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def numpy_blas() -> str:
    """The BLAS NumPy was built with, e.g. ``scipy-openblas 0.3.31.188.0``."""
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    return f"{blas.get('name', 'unknown')} {blas.get('version', '')}".strip()


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
