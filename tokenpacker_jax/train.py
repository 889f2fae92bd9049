"""Trains a TokenPacker MLLM on a sharded mesh.

    python -m tokenpacker_jax.train --config=configs/tiny.py:stage=1 --workdir=/tmp/run

Rerunning the same command resumes from the newest checkpoint in ``workdir``. SIGTERM
(preemption) saves and exits; a non-finite loss stops the run and keeps the last good
checkpoint. The loop reads top to bottom: config -> mesh -> model -> data -> state (restored,
or built from shapes with pretrained weights loaded into their shards) -> jitted step ->
loop with metrics, evaluation and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from tokenpacker_jax import assembly, checkpoint, configuration, flops, metrics, sharding
from tokenpacker_jax import train_state as state_lib
from tokenpacker_jax.data import pipeline
from tokenpacker_jax.models import mllm
from tokenpacker_jax.optim import make_optimizer, split_trainable

BATCH_KEYS = ("input_ids", "target_ids", "loss_mask", "attention_mask", "image_mask",
              "pixel_values", "tile_mask")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message says which step and what was kept."""


@dataclasses.dataclass
class Preemption:
    """Set by SIGTERM; the loop saves and exits at the next step boundary."""

    requested: bool = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))


# -- the step ---------------------------------------------------------------------------------

def make_train_step(model: mllm.MultimodalLM, tx: optax.GradientTransformation,
                    trainable: tuple[str, ...], microbatches: int):
    """(state, batch) -> (state, metrics). Gradients only for the trainable groups; the
    global batch is split into ``microbatches`` whose gradients are summed (accumulation),
    and the loss is the mean over all supervised tokens of the global batch."""

    def microbatch_sums(trainable_params, frozen_params, batch):
        def loss_sum(tp):
            logits = model.apply({"params": {**frozen_params, **tp}}, batch["input_ids"],
                                 batch["image_mask"], batch["pixel_values"],
                                 batch["attention_mask"])
            total, correct, count = mllm.token_loss_sums(logits, batch["target_ids"],
                                                         batch["loss_mask"])
            return total, (correct, count)

        (total, (correct, count)), grads = jax.value_and_grad(loss_sum, has_aux=True)(
            trainable_params)
        return grads, total, correct, count

    def split_microbatches(batch):
        # Microbatch i takes rows i, i + k, i + 2k, ...: every device keeps its rows, so each
        # microbatch stays spread over all data-parallel devices.
        def split(x):
            x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:])
            x = jnp.swapaxes(x, 0, 1)
            spec = PartitionSpec(None, ("data", "fsdp"), *[None] * (x.ndim - 2))
            return jax.lax.with_sharding_constraint(x, spec)

        return jax.tree.map(split, batch)

    def train_step(state: state_lib.TrainState, batch: dict):
        trainable_params, frozen_params = split_trainable(state.params, trainable)
        if microbatches == 1:
            grads, total, correct, count = microbatch_sums(trainable_params, frozen_params,
                                                           batch)
        else:
            def body(carry, micro):
                sums = microbatch_sums(trainable_params, frozen_params, micro)
                return jax.tree.map(jnp.add, carry, sums), None

            zeros = (jax.tree.map(jnp.zeros_like, trainable_params), jnp.zeros(()),
                     jnp.zeros(()), jnp.zeros(()))
            (grads, total, correct, count), _ = jax.lax.scan(
                body, zeros, split_microbatches(batch))
        denominator = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        updates, opt_state = tx.update(grads, state.opt_state, trainable_params)
        new_trainable = optax.apply_updates(trainable_params, updates)
        loss = total / denominator
        step_metrics = {"loss": loss, "accuracy": correct / denominator,
                        "supervised_tokens": count, "grad_norm": optax.global_norm(grads),
                        "finite": jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))}
        new_state = state.replace(step=state.step + 1,
                                  params={**frozen_params, **new_trainable},
                                  opt_state=opt_state)
        return new_state, step_metrics

    return train_step


def make_eval_step(model: mllm.MultimodalLM):
    def eval_step(params, batch):
        logits = model.apply({"params": params}, batch["input_ids"], batch["image_mask"],
                             batch["pixel_values"], batch["attention_mask"])
        return mllm.token_loss_sums(logits, batch["target_ids"], batch["loss_mask"])

    return eval_step


# -- pieces of the run --------------------------------------------------------------------------

def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """The model's inputs of a per-host batch as global arrays (batch axis sharded)."""
    return pipeline.global_batch({key: local[key] for key in BATCH_KEYS}, mesh)


def evaluate_loss(eval_step, params, batches: Iterator[dict], mesh,
                  num_batches: int) -> dict[str, float]:
    total = correct = count = 0.0
    for _, local in zip(range(num_batches), batches):
        t, c, n = eval_step(params, global_batch(local, mesh))
        total, correct, count = total + float(t), correct + float(c), count + float(n)
    denominator = max(count, 1.0)
    return {"loss": total / denominator, "accuracy": correct / denominator,
            "supervised_tokens": count}


# -- the run ---------------------------------------------------------------------------------

StepHook = Callable[[int, dict[str, np.ndarray]], None]


def run(config: ml_collections.ConfigDict, workdir: str,
        on_step: StepHook | None = None) -> dict[str, float]:
    """Trains per ``config`` in ``workdir`` (resuming if it has checkpoints).

    Args:
      on_step: called after each step with (steps done, this host's batch), e.g. to watch
        the data order from a notebook or a test.
    Returns:
      The last logged training metrics and the final evaluation, if any.
    """
    from tokenpacker_jax.tokenizer import load_tokenizer  # noqa: PLC0415

    configuration.validate(config)
    train_cfg = config.train
    trainable = tuple(train_cfg.trainable)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    rules = config.sharding.rules

    model = assembly.build_model(config)
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.decoder_checkpoint)
    if tokenizer.vocab_size > model.config.decoder.vocab_size:
        raise configuration.ConfigError(
            f"model.decoder.vocab_size: {model.config.decoder.vocab_size} is smaller than the "
            f"tokenizer's {tokenizer.vocab_size} tokens")
    tokens_per_tile = pipeline.tokens_per_tile(model.config)
    train_data = pipeline.make_dataset(config.data, tokenizer, tokens_per_tile, "train",
                                       seed=config.seed)
    train_iter = iter(train_data)
    steps_per_epoch = pipeline.steps_per_epoch(config.data, "train")
    total_steps = train_cfg.num_steps if train_cfg.num_steps > 0 else (
        steps_per_epoch * config.data.num_epochs)

    tiles = pipeline.max_tiles(config.data)
    abstract_params, param_shardings = state_lib.param_shardings(model, mesh, rules, tiles)
    tx, schedules = make_optimizer(
        config.optim, split_trainable(abstract_params, trainable)[0], total_steps)
    abstract_state = state_lib.TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
        opt_state=jax.eval_shape(tx.init, split_trainable(abstract_params, trainable)[0]))
    shardings = state_lib.state_shardings(abstract_state, param_shardings, tx, trainable, mesh)

    manager = checkpoint.make_manager(checkpoint.run_directory(workdir),
                                      keep=config.checkpoint.keep,
                                      asynchronous=config.checkpoint.asynchronous)
    latest = manager.latest_step()
    if latest is not None:
        assembly.check_resumable(config, assembly.saved_config(workdir, latest), workdir)
        state = checkpoint.restore(manager, latest,
                                   checkpoint.abstract_like(abstract_state, shardings),
                                   train_iter)
        logging.info("resumed from step %d", latest)
    else:
        if train_cfg.init_from:
            loaded = checkpoint.restore_params(train_cfg.init_from, abstract_params,
                                               param_shardings)
        else:
            loaded = assembly.load_pretrained(config, param_shardings)
        params = state_lib.init_params(model, mesh, rules, jax.random.key(config.seed),
                                       loaded, param_shardings, tiles,
                                       kernel_scale=config.model.get("init_kernel_scale"))
        state = state_lib.create_state(params, tx, trainable, param_shardings, mesh)
    start_step = int(state.step)

    with sharding.use_mesh(mesh, rules):
        batch_shardings = {key: NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
                           for key in BATCH_KEYS}
        replicated = NamedSharding(mesh, PartitionSpec())
        train_step = jax.jit(
            make_train_step(model, tx, trainable, train_cfg.microbatches),
            in_shardings=(shardings, batch_shardings), out_shardings=(shardings, replicated),
            donate_argnums=0)
        eval_step = jax.jit(make_eval_step(model),
                            in_shardings=(shardings.params, batch_shardings),
                            out_shardings=replicated)

        writer = metrics.MetricWriter(workdir)
        step_flops = flops.train_step_flops(
            model.config, batch=config.data.batch_size, length=config.data.max_length,
            tiles=tiles, trainable=trainable).total
        peak = flops.peak_flops_per_device(jax.devices()[0].device_kind)
        throughput = metrics.Throughput(
            flops_per_step=step_flops, peak_flops=peak * jax.device_count() if peak else None)
        preemption = Preemption()
        preemption.install()
        config_json = config.to_json()
        pending_finite: list[tuple[int, jax.Array]] = []
        last_good_step = latest
        summary: dict[str, float] = {}

        def check_finite():
            nonlocal last_good_step
            for step_done, finite in pending_finite:
                if not bool(finite):
                    writer.close()
                    raise TrainingDiverged(
                        f"non-finite loss or gradient at step {step_done}; the last good "
                        f"checkpoint (step {last_good_step}) is kept in "
                        f"{checkpoint.run_directory(workdir)}")
            pending_finite.clear()

        def save(step: int, force: bool = False):
            nonlocal last_good_step
            check_finite()
            if checkpoint.save(manager, step, state, train_iter, config_json, force=force):
                last_good_step = step

        progress = _progress_bar(start_step, total_steps)
        for step in range(start_step, total_steps):
            local = next(train_iter)
            state, step_metrics = train_step(state, global_batch(local, mesh))
            pending_finite.append((step + 1, step_metrics["finite"]))
            throughput.count(int(local["attention_mask"].sum()) * jax.process_count(),
                             int(local["tile_mask"].sum()) * jax.process_count())
            done = step + 1
            progress.update(1)
            if on_step is not None:
                on_step(done, local)
            if done % train_cfg.log_every == 0 or done == total_steps:
                check_finite()
                host = {k: float(v) for k, v in step_metrics.items() if k != "finite"}
                host.update(throughput.measure())
                host["lr"] = float(schedules[trainable[-1]](step))
                writer.write(done, host)
                progress.set_postfix(loss=f"{host['loss']:.4f}", acc=f"{host['accuracy']:.3f}")
                summary = {f"train/{k}": v for k, v in host.items()}
            if train_cfg.eval_every and (done % train_cfg.eval_every == 0
                                         or done == total_steps):
                result = evaluate_loss(
                    eval_step, state.params,
                    iter(pipeline.make_dataset(config.data, tokenizer, tokens_per_tile, "val",
                                               seed=config.seed, shuffle=False)),
                    mesh, train_cfg.eval_batches)
                writer.write(done, result, prefix="eval")
                summary.update({f"eval/{k}": v for k, v in result.items()})
            if done % config.checkpoint.every_steps == 0 or done == total_steps:
                save(done, force=done == total_steps)
            if preemption.requested or manager.reached_preemption(done):
                logging.warning("preemption at step %d: saving and exiting", done)
                save(done, force=True)
                break
        progress.close()
        manager.wait_until_finished()
        writer.close()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump({"step": int(state.step), **summary}, f, indent=2)
    return summary


def _progress_bar(start: int, total: int):
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=start, desc="train", unit="step",
                disable=jax.process_index() != 0, dynamic_ncols=True)


def main(argv):
    del argv
    from absl import flags  # noqa: PLC0415

    config = flags.FLAGS.config
    if not flags.FLAGS["verbosity"].present:
        # Orbax and grain log every save and read at INFO; the progress bar says enough.
        logging.set_verbosity(logging.WARNING)
    if config.distributed.initialize:
        jax.distributed.initialize(
            initialization_timeout=config.distributed.timeout_s)
    summary = run(config, flags.FLAGS.workdir)
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (with :variant).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
