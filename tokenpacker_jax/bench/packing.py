"""Table 7: packed rows against padded ones (BENCHMARKS.md "Packing").

    python -m tokenpacker_jax.bench packing [--write]

Writes the main job's data (``synthetic --num 2000 --jitter 0 --tokenizer-vocab 512``) and,
in a second directory, LLaVA-shaped conversations (``--llava-mix``, with a tokenizer that
holds their words), then:

(a) ``data.stats`` (``data_stats.report``) on the main job's stage-2 data with
    ``configs/tiny.py:stage=2`` (88 positions) and on the LLaVA-shaped mix with
    ``configs/tokenpacker.py:stage=2`` (2,048 positions, 144 visual tokens): positions per
    sample and the share of row positions holding a token, padded and packed;
(b) the tiny stage-2 training step (``assembly.assemble``, as ``train.run`` runs it) on the
    same data: padded rows (the config as it is), packed rows of the same 88 positions, and
    packed rows of 176 positions half as many (the same positions a step). Each variant's
    batches come from the real pipeline; the steps are timed in turns (``time_interleaved``)
    and the figure is supervised tokens (the loss's own, ``loss_mask``) per second.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from tokenpacker_jax import assembly, data_stats, sharding
from tokenpacker_jax.bench import hardware, measurement, report, training
from tokenpacker_jax.configs import tiny, tokenpacker
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.data import example as example_lib
from tokenpacker_jax.data import pipeline, synthetic
from tokenpacker_jax.tokenizer import load_tokenizer

# (name, overrides of configs/tiny.py:stage=2): the padded config and two packed ones.
VARIANTS = (
    ("padded", {}),
    ("packed", {"packing": "first_fit", "max_images_per_row": 2}),
    ("packed, rows x2", {"packing": "first_fit", "max_images_per_row": 4,
                         "max_length": 176, "batch_size": 8}),
)
SIZES = {"full": dict(images=2000, mix=2000, samples=2000, batches=8, shrink=False),
         "tiny": dict(images=48, mix=48, samples=48, batches=2, shrink=True)}


@dataclasses.dataclass(frozen=True)
class StepRow:
    name: str
    rows: int
    length: int
    samples_per_step: float
    supervised_per_step: float
    real_share: float
    step_ms: float

    @property
    def supervised_per_s(self) -> float:
        return self.supervised_per_step / (self.step_ms / 1e3)


def write_data(root: str, size: dict, log) -> tuple[str, str]:
    """The main job's data and the LLaVA-shaped mix; returns their directories."""
    main, mix = os.path.join(root, "main"), os.path.join(root, "mix")
    start = time.perf_counter()
    synthetic.generate(main, size["images"], 0, jitter=0, tokenizer_vocab=512)
    # A vocabulary that holds the mix's words: a word is about one token, as in English.
    synthetic.generate(mix, size["images"], 0, jitter=0, tokenizer_vocab=1024,
                       llava_mix=size["mix"])
    log(f"data written in {time.perf_counter() - start:.0f} s")
    return main, mix


def tiny_config(data: str, overrides: dict, shrink: bool = False
                ) -> ml_collections.ConfigDict:
    """``configs/tiny.py:stage=2`` on ``data`` with ``overrides`` of its data section
    (``shrink``: the model of ``--sizes=tiny``, ``training.shrink``)."""
    config = tiny.get_config(f"stage=2,data={data}")
    if shrink:
        training.shrink(config)
        config.data.update(max_length=88, batch_size=16)
    config.data.update(overrides)
    return config


def mix_config(mix: str) -> ml_collections.ConfigDict:
    config = tokenpacker.get_config("stage=2")
    config.model.tokenizer = os.path.join(mix, "tokenizer")
    config.data.files.train = os.path.join(mix, "train_llava_mix.json")
    config.data.image_folder = mix
    return config


def step_rows(data: str, batches: int, runs: int, log, shrink: bool = False,
              devices: Sequence[jax.Device] | None = None) -> list[StepRow]:
    """The tiny stage-2 step of each variant on its own batches of ``data``, timed in turns,
    on the config's mesh over ``devices`` (default: all, as ``train.run``)."""
    calls, rows = {}, []
    for name, overrides in VARIANTS:
        config = tiny_config(data, overrides, shrink)
        mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
        run = assembly.assemble(config, mesh, total_steps=1000)
        tokenizer = load_tokenizer(config.model.tokenizer)
        local = [batch for _, batch in zip(range(batches), iter(pipeline.make_dataset(
            config.data, tokenizer, example_lib.tokens_per_tile(run.model.config), "train",
            seed=0)), strict=False)]
        example = batch_lib.example_inputs(batch_lib.Dims.of_model(run.model.config, 8))
        params = jax.device_put(measurement.random_params(run.model, **example),
                                run.param_shardings)
        state = [run.init_state(params, jax.random.key(0))]
        placed = [run.global_batch(batch) for batch in local]
        with run.use_mesh():
            step = run.train_step.lower(state[0], placed[0]).compile()
        turn = [0]

        def call(step=step, state=state, placed=placed, turn=turn):
            state[0], metrics = step(state[0], placed[turn[0] % len(placed)])
            turn[0] += 1
            return metrics

        calls[name] = call
        rows.append(StepRow(
            name, config.data.batch_size, config.data.max_length,
            samples_per_step=float(np.mean([(b["sample_id"] >= 0).sum() for b in local])),
            supervised_per_step=float(np.mean([b["loss_mask"].sum() for b in local])),
            real_share=float(np.mean([b["attention_mask"].mean() for b in local])),
            step_ms=0.0))
        log(f"{name}: {rows[-1].rows} x {rows[-1].length}, {rows[-1].samples_per_step:.1f} "
            f"samples a step")
    timings = measurement.time_interleaved(calls, runs=runs)
    return [dataclasses.replace(row, step_ms=timings[row.name].ms) for row in rows]


def run(size: str = "full", runs: int = measurement.MIN_RUNS, log=print, *,
        devices: Sequence[jax.Device] | None = None) -> report.Section:
    sizes = SIZES[size]
    header = hardware.machine()
    if devices is not None:
        header += f"; the step on {len(devices)} of the devices"
    with tempfile.TemporaryDirectory() as root:
        main, mix = write_data(root, sizes, log)
        main_stats = data_stats.report(tiny_config(main, {}), "train", sizes["samples"])
        log(main_stats[-1])
        mix_stats = data_stats.report(mix_config(mix), "train", sizes["samples"])
        log(mix_stats[-1])
        steps = step_rows(main, sizes["batches"], runs, log, sizes["shrink"], devices)
    padded = steps[0]
    table = report.markdown_table(
        ["rows", "rows x positions", "samples a step", "real positions", "step ms",
         "supervised tokens a step", "supervised tokens/s", "vs padded"],
        [[r.name, f"{r.rows} x {r.length}", f"{r.samples_per_step:.1f}",
          f"{100 * r.real_share:.1f}%", f"{r.step_ms:.1f}", f"{r.supervised_per_step:.0f}",
          f"{r.supervised_per_s:.0f}", f"{r.supervised_per_s / padded.supervised_per_s:.2f}x"]
         for r in steps])
    body = "\n".join([
        f"`python -m tokenpacker_jax.bench packing` (`--sizes={size}`). Machine: {header}.",
        "",
        f"(a) `python -m tokenpacker_jax.data.stats`, {sizes['samples']} samples each. The "
        "main job's stage-2 data (`synthetic --num "
        f"{sizes['images']} --jitter 0`, `configs/tiny.py:stage=2`):",
        "",
        "```", *main_stats, "```",
        "",
        f"LLaVA-shaped conversations (`synthetic --llava-mix {sizes['mix']}`, "
        "`tokenpacker_jax/data/llava_mix.py`) with `configs/tokenpacker.py:stage=2` "
        "(144 visual tokens, 2,048 positions):",
        "",
        "```", *mix_stats, "```",
        "",
        "(b) The tiny stage-2 training step (tower, projector and LLM trained; "
        "`assembly.assemble`) on the main job's data, each variant's batches from the real "
        f"pipeline ({sizes['batches']} of them, in turn); the steps timed in turns, median "
        f"of {runs}. Supervised tokens are the loss's (`loss_mask`).",
        "",
        table,
    ])
    return report.section("packing", "Packing", body)
