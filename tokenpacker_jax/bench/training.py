"""Table 4: training throughput of ``configs/tiny.py`` (stage 2) for each projector.

The step is ``train.py``'s own (``train.make_train_step``, jitted with the state and batch
shardings and the donated state as ``train.run`` does; the mesh of the config over all
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
from jax.sharding import NamedSharding, PartitionSpec

from tokenpacker_jax import assembly, sharding, train
from tokenpacker_jax import train_state as state_lib
from tokenpacker_jax.bench import common
from tokenpacker_jax.configs import tiny
from tokenpacker_jax.models import mllm
from tokenpacker_jax.models.projectors import PROJECTORS, num_output_tokens
from tokenpacker_jax.optim import make_optimizer, split_trainable

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


def synthetic_batch(config: ml_collections.ConfigDict, model_config: mllm.MLLMConfig,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """One global batch of the pipeline's keys, shapes and dtypes (``data/example.py``):
    [BOS, M visual positions, random text]; the text after the image is supervised."""
    rng = np.random.default_rng(seed)
    batch, length = config.data.batch_size, config.data.max_length
    visual = num_output_tokens(model_config.projector, model_config.vision.grid_size)
    if visual + 2 > length:
        raise ValueError(f"data.max_length {length} cannot hold {visual} visual tokens")
    vocab = model_config.decoder.vocab_size
    ids = rng.integers(3, vocab, (batch, length)).astype(np.int32)
    ids[:, 0] = 1
    image_mask = np.zeros((batch, length), bool)
    image_mask[:, 1:1 + visual] = True
    loss_mask = np.zeros((batch, length), np.float32)
    loss_mask[:, 1 + visual:-1] = 1.0
    size = model_config.vision.image_size
    return dict(
        input_ids=ids, target_ids=np.roll(ids, -1, axis=1), loss_mask=loss_mask,
        attention_mask=np.ones((batch, length), np.int32), image_mask=image_mask,
        pixel_values=rng.standard_normal((batch, 1, size, size, 3), np.float32),
        tile_mask=np.ones((batch, 1), bool))


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
    rules = config.sharding.rules
    trainable = tuple(config.train.trainable)
    model = assembly.build_model(config)
    _, param_shardings = state_lib.param_shardings(model, mesh, rules)
    params = jax.device_put(
        common.random_params(model, **mllm.init_inputs(model.config, 1, 8)), param_shardings)
    tx, _ = make_optimizer(config.optim, split_trainable(params, trainable)[0],
                           total_steps=1000)
    state = state_lib.create_state(params, tx, trainable, param_shardings, mesh)
    shardings = state_lib.state_shardings(state, param_shardings, tx, trainable, mesh)
    batch = train.global_batch(synthetic_batch(config, model.config), mesh)

    with sharding.use_mesh(mesh, rules):
        batch_shardings = {key: NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
                           for key in batch}
        start = time.perf_counter()
        step = jax.jit(
            train.make_train_step(model, tx, trainable, config.train.microbatches),
            in_shardings=(shardings, batch_shardings),
            out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
            donate_argnums=0).lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        holder = [state]

        def one_step():
            holder[0], metrics = step(holder[0], batch)
            return holder[0], metrics

        timing = common.time_calls(one_step, runs=runs)
    visual = num_output_tokens(model.config.projector, model.config.vision.grid_size)
    projector_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params["projector"]))
    return Row(projector=config.model.projector.name, visual_tokens=visual,
               batch=config.data.batch_size, length=config.data.max_length,
               step_ms=timing.ms, compile_s=compile_s, projector_params=projector_params)


def run(size: str = "full", runs: int = common.MIN_RUNS, log=print, *,
        projectors: Sequence[str] = PROJECTOR_ORDER,
        devices: Sequence[jax.Device] | None = None) -> common.Section:
    """One row per projector; returns the BENCHMARKS.md section."""
    header = common.machine()
    if devices is not None:
        header += f"; the step on {len(devices)} of the devices"
    rows = []
    for name in projectors:
        row = measure(train_config(name, SIZES[size]), runs, devices)
        log(f"{name}: {row.step_ms:.1f} ms per step, compile {row.compile_s:.1f} s")
        rows.append(row)
    first = rows[0]
    table = common.markdown_table(
        ["projector", "visual tokens", "projector params", "step ms", "images/s",
         "tokens/s", "compile s"],
        [[r.projector, r.visual_tokens, f"{r.projector_params / 1e3:.0f}K",
          f"{r.step_ms:.1f}", f"{r.images_per_s:.1f}", f"{r.tokens_per_s:.0f}",
          f"{r.compile_s:.1f}"] for r in rows])
    body = "\n".join([
        f"`python -m tokenpacker_jax.bench training` (`--sizes={size}`). Machine: {header}.",
        "",
        f"`configs/tiny.py:stage=2` (tower, projector and LLM trained, AdamW), batch "
        f"{first.batch} x {first.length} tokens, one image each, `train.make_train_step` "
        f"jitted as `train.run` does; generated batches (the input pipeline is not timed). "
        f"Median of {runs} steps after a warm-up step; compile time apart. tokens/s counts "
        "every position of the batch.",
        "",
        table,
    ])
    return common.section("training", "Training throughput of the tiny config", body)
