"""Training metrics to TensorBoard and a JSONL file (process 0 only), and the progress bar."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import numpy as np


class MetricWriter:
    """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard event files.

    Every process may call it; only process 0 writes.
    """

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # noqa: PLC0415 (tensorboardX: seconds to import)

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, Any], prefix: str = "train") -> None:
        if not self.active:
            return
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        record = {"step": int(step), "time": time.time(),
                  **{f"{prefix}/{k}": v for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                if math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class Throughput:
    """Steps/s, tokens/s, images/s and MFU between two ``measure`` calls."""

    def __init__(self, *, flops_per_step: float, peak_flops: float | None):
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops  # all devices together; None: MFU not reported
        self._time = time.perf_counter()
        self._tokens = self._images = self._steps = 0

    def count(self, tokens: int, images: int) -> None:
        self._tokens += tokens
        self._images += images
        self._steps += 1

    def measure(self) -> dict[str, float]:
        now = time.perf_counter()
        seconds = max(now - self._time, 1e-9)
        out = {"steps_per_s": self._steps / seconds, "tokens_per_s": self._tokens / seconds,
               "images_per_s": self._images / seconds}
        if self.peak_flops:
            out["mfu"] = self._steps * self.flops_per_step / seconds / self.peak_flops
        self._time, self._tokens, self._images, self._steps = now, 0, 0, 0
        return out
