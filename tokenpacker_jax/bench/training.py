"""Table 4: training throughput of ``configs/tiny.py`` (stage 2) for each projector.

The step is ``train.py``'s own (``assembly.assemble``: jitted with the state and batch
shardings and the donated state, as ``train.run`` runs it; the mesh of the config over all
devices): the tower, projector and LLM all train, AdamW. Batches are generated arrays of the
data pipeline's shapes (``data.batch_size`` x ``data.max_length``, one image each, no
padding), so the figure is the step's alone, not the input pipeline's (BENCHMARKS.md "Data
pipeline" has that). Projectors keep their tiny-config budget: the 6 x 6 patch grid packed
to 9 tokens (scale 2), or all 36 for ``mlp2x_gelu``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from tokenpacker_jax import assembly, sharding
from tokenpacker_jax.bench import hardware, measurement, report
from tokenpacker_jax.configs import tiny
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.data import example as example_lib
from tokenpacker_jax.models.projectors import PROJECTORS

PREFERRED_ORDER = ("tokenpacker", "mlp2x_gelu", "avgpool", "pixel_shuffle", "resampler",
                   "c_abstractor", "ldpv2")
# Every registered projector, new ones last.
PROJECTOR_ORDER = tuple([p for p in PREFERRED_ORDER if p in PROJECTORS]
                        + sorted(set(PROJECTORS) - set(PREFERRED_ORDER)))


def shrink(config: ml_collections.ConfigDict) -> None:
    """``--sizes=tiny``: smaller than the tiny config (2 tower layers, 1 LLM layer, batch 8
    of 160 tokens), for the test suite; also table 6's."""
    config.model.vision.num_layers = 2
    config.model.features.multi_layers = (1, 2, 1, 2)
    config.model.decoder.num_layers = 1
    config.data.update(dict(batch_size=8, max_length=160))
    config.checkpoint.asynchronous = False


SIZES: dict[str, Callable[[ml_collections.ConfigDict], None] | None] = {
    "full": None, "tiny": shrink}


def train_config(projector: str,
                 adjust: Callable[[ml_collections.ConfigDict], None] | None = None
                 ) -> ml_collections.ConfigDict:
    """``configs/tiny.py:stage=2`` with ``projector`` (scale 1 for ``mlp2x_gelu``)."""
    config = tiny.get_config("stage=2")
    config.model.projector.name = projector
    if projector == "mlp2x_gelu":
        config.model.projector.scale_factor = 1
    if adjust is not None:
        adjust(config)
    return config


@dataclasses.dataclass(frozen=True)
class Row:
    projector: str
    visual_tokens: int
    batch: int
    length: int
    step_ms: float
    compile_s: float
    projector_params: int

    @property
    def images_per_s(self) -> float:
        return self.batch / (self.step_ms / 1e3)

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.length / (self.step_ms / 1e3)


def measure(config: ml_collections.ConfigDict, runs: int,
            devices: Sequence[jax.Device] | None = None) -> Row:
    """Compiles the config's training step and times ``runs`` steps after a warm-up, on the
    config's mesh over ``devices`` (default: all, as ``train.run``)."""
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
    assembled = assembly.assemble(config, mesh, total_steps=1000)
    params = jax.device_put(measurement.random_params(assembled.model, **batch_lib.example_inputs(
        batch_lib.Dims.of_model(assembled.model.config, 8))), assembled.param_shardings)
    state = assembled.init_state(params, jax.random.key(0))  # every group given
    batch = assembled.global_batch(batch_lib.synthetic_batch(
        batch_lib.Dims.of_config(config), config.data.batch_size,
        visual_tokens=example_lib.tokens_per_tile(assembled.model.config),
        vocab_size=assembled.model.config.decoder.vocab_size))

    with assembled.use_mesh():
        start = time.perf_counter()
        step = assembled.train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        holder = [state]

        def one_step():
            holder[0], metrics = step(holder[0], batch)
            return holder[0], metrics

        timing = measurement.time_calls(one_step, runs=runs)
    visual = example_lib.tokens_per_tile(assembled.model.config)
    projector_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params["projector"]))
    return Row(projector=config.model.projector.name, visual_tokens=visual,
               batch=config.data.batch_size, length=config.data.max_length,
               step_ms=timing.ms, compile_s=compile_s, projector_params=projector_params)


def run(size: str = "full", runs: int = measurement.MIN_RUNS, log=print, *,
        projectors: Sequence[str] = PROJECTOR_ORDER,
        devices: Sequence[jax.Device] | None = None) -> report.Section:
    """One row per projector; returns the BENCHMARKS.md section."""
    header = hardware.machine()
    if devices is not None:
        header += f"; the step on {len(devices)} of the devices"
    rows = []
    for name in projectors:
        row = measure(train_config(name, SIZES[size]), runs, devices)
        log(f"{name}: {row.step_ms:.1f} ms per step, compile {row.compile_s:.1f} s")
        rows.append(row)
    first = rows[0]
    table = report.markdown_table(
        ["projector", "visual tokens", "projector params", "step ms", "images/s",
         "tokens/s", "compile s"],
        [[r.projector, r.visual_tokens, f"{r.projector_params / 1e3:.0f}K",
          f"{r.step_ms:.1f}", f"{r.images_per_s:.1f}", f"{r.tokens_per_s:.0f}",
          f"{r.compile_s:.1f}"] for r in rows])
    body = "\n".join([
        f"`python -m tokenpacker_jax.bench training` (`--sizes={size}`). Machine: {header}.",
        "",
        f"`configs/tiny.py:stage=2` (tower, projector and LLM trained, AdamW), batch "
        f"{first.batch} x {first.length} tokens, one image each, the step of `train.run` "
        f"(`assembly.assemble`); generated batches (the input pipeline is not timed). "
        f"Median of {runs} steps after a warm-up step; compile time apart. tokens/s counts "
        "every position of the batch.",
        "",
        table,
    ])
    return report.section("training", "Training throughput of the tiny config", body)
