"""Trains a TokenPacker MLLM on a sharded mesh.

    python -m tokenpacker_jax.train --config=configs/tiny.py:stage=1 --workdir=/tmp/run

Rerunning the same command resumes from the newest checkpoint in ``workdir`` whose files
verify (a damaged one is moved aside; ``--config.checkpoint.restore_step=N`` picks a step).
SIGTERM (preemption) saves and exits; a non-finite loss stops the run and keeps the last good
checkpoint (right after a resume, it names the checkpoint resumed from as suspect). The loop
reads top to bottom: config -> the run (``assembly.assemble``: mesh, model, state shapes and
shardings, jitted steps) -> data -> state (restored, or built from shapes with pretrained
weights loaded into their shards) -> loop with metrics, evaluation and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from tqdm.auto import tqdm

from tokenpacker_jax import assembly, checkpoint, configuration, flops, metrics, user_error
from tokenpacker_jax.data import bad_records, pipeline
from tokenpacker_jax.data import example as example_lib
from tokenpacker_jax.tokenizer import load_tokenizer


class TrainingDiverged(user_error.UserError, RuntimeError):
    """The loss became NaN or Inf; the message says which step and what was kept."""


# A loss that turns non-finite this many steps or fewer after a resume, with no checkpoint
# saved since, points at the checkpoint it resumed from.
SUSPECT_AFTER_RESUME = 10


def divergence_message(step: int, resumed: int | None, last_saved: int | None,
                       kept: list[int], directory: str) -> str:
    """What TrainingDiverged says: the step, and which checkpoint to go on from."""
    what = f"non-finite loss or gradient at step {step}"
    if resumed is not None and last_saved == resumed and step - resumed <= SUSPECT_AFTER_RESUME:
        earlier = sorted(s for s in kept if s < resumed)
        how = (f"resume from an earlier one with --config.checkpoint.restore_step=N (N one of "
               f"{earlier})" if earlier else "no earlier checkpoint is kept: start again in a "
               "new workdir")
        return (f"{what}, {step - resumed} step(s) after resuming from step {resumed}: the "
                f"checkpoint of step {resumed} in {directory} is suspect (damaged, or saved "
                f"when the run was already diverging); {how}")
    if last_saved is None:
        return f"{what}; no checkpoint was saved in {directory}"
    return f"{what}; the last good checkpoint (step {last_saved}) is kept in {directory}"


@dataclasses.dataclass
class Preemption:
    """Set by SIGTERM; the loop saves and exits at the next step boundary."""

    requested: bool = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))


def evaluate_loss(assembled: assembly.Run, params, batches: Iterator[dict],
                  num_batches: int) -> dict[str, float]:
    total = correct = count = 0.0
    for _, local in zip(range(num_batches), batches, strict=False):
        t, c, n = assembled.eval_step(params, assembled.global_batch(local))
        total, correct, count = total + float(t), correct + float(c), count + float(n)
    denominator = max(count, 1.0)
    return {"loss": total / denominator, "accuracy": correct / denominator,
            "supervised_tokens": count}


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
    configuration.validate(config)
    train_cfg = config.train
    os.makedirs(workdir, exist_ok=True)
    tokenizer = load_tokenizer(configuration.tokenizer_source(config))
    model_config = assembly.build_model(config).config
    if tokenizer.vocab_size > model_config.decoder.vocab_size:
        raise configuration.ConfigError(
            f"model.decoder.vocab_size: {model_config.decoder.vocab_size} is smaller than the "
            f"tokenizer's {tokenizer.vocab_size} tokens")
    tokens_per_tile = example_lib.tokens_per_tile(model_config)
    total_steps = train_cfg.num_steps
    if total_steps <= 0:
        # Packed rows hold several samples each: an epoch takes fewer of them.
        samples_per_row = pipeline.samples_per_row(config.data, tokenizer, tokens_per_tile,
                                                   seed=config.seed)
        total_steps = config.data.num_epochs * pipeline.steps_per_epoch(
            config.data, "train", samples_per_row=samples_per_row)
        logging.info("%.2f samples per row: %d steps", samples_per_row, total_steps)
    assembled = assembly.assemble(config, total_steps=total_steps)
    train_data = pipeline.make_dataset(config.data, tokenizer, tokens_per_tile, "train",
                                       seed=config.seed)
    train_iter = iter(train_data)

    manager = checkpoint.make_manager(checkpoint.run_directory(workdir),
                                      keep=config.checkpoint.keep,
                                      asynchronous=config.checkpoint.asynchronous)
    latest = checkpoint.choose_step(manager, config.checkpoint.restore_step)
    if latest is not None:
        assembly.check_resumable(config, assembly.saved_config(workdir, latest), workdir)
        state = checkpoint.restore(manager, latest, assembled.state_targets(), train_iter)
        logging.info("resumed from step %d", latest)
    else:
        # Checkpoints to start from have the plain layout (no adapters, float kernels).
        plain = assembled.plain_layout()
        if train_cfg.init_from:
            source = assembly.saved_config(train_cfg.init_from)
            if (source.model.get("lora") or {}).get("rank"):
                raise configuration.ConfigError(
                    f"train.init_from: {train_cfg.init_from} has LoRA adapters; fold them into "
                    "a run without (python -m tokenpacker_jax.convert merge-lora) and start "
                    "from that")
            loaded = checkpoint.restore_params(train_cfg.init_from, plain.abstract_params,
                                               plain.param_shardings)
        else:
            loaded = assembly.load_pretrained(config, plain.param_shardings)
        state = assembled.init_state(loaded, jax.random.key(config.seed))
    start_step = int(state.step)

    with assembled.use_mesh():
        writer = metrics.MetricWriter(workdir)
        peak = flops.peak_flops_per_device(jax.devices()[0].device_kind)
        throughput = metrics.Throughput(
            flops_per_step=assembled.step_flops(),
            peak_flops=peak * jax.device_count() if peak else None)
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
                    raise TrainingDiverged(divergence_message(
                        step_done, latest, last_good_step, manager.all_steps(),
                        checkpoint.run_directory(workdir)))
            pending_finite.clear()

        def save(step: int, force: bool = False):
            nonlocal last_good_step
            check_finite()
            if checkpoint.save(manager, step, state, train_iter, config_json, force=force):
                last_good_step = step

        progress = _progress_bar(start_step, total_steps)
        for step in range(start_step, total_steps):
            local = next(train_iter)
            state, step_metrics = assembled.train_step(state, assembled.global_batch(local))
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
                host["lr"] = float(assembled.schedules[assembled.trainable[-1]](step))
                host.update({f"data_{key}": value
                             for key, value in bad_records.record_counts(train_iter).items()})
                writer.write(done, host)
                progress.set_postfix(loss=f"{host['loss']:.4f}", acc=f"{host['accuracy']:.3f}")
                summary = {f"train/{k}": v for k, v in host.items()}
            if train_cfg.eval_every and (done % train_cfg.eval_every == 0
                                         or done == total_steps):
                result = evaluate_loss(
                    assembled, state.params,
                    iter(pipeline.make_dataset(config.data, tokenizer, tokens_per_tile, "val",
                                               seed=config.seed, shuffle=False)),
                    train_cfg.eval_batches)
                writer.write(done, result, prefix="eval")
                summary.update({f"eval/{k}": v for k, v in result.items()})
            if done % config.checkpoint.every_steps == 0 or done == total_steps:
                save(done, force=done == total_steps)
            if preemption.requested or manager.reached_preemption(done):
                logging.warning("preemption at step %d: saving and exiting", done)
                if last_good_step != done:  # (a step saved already cannot be saved again)
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
    return tqdm(total=total, initial=start, desc="train", unit="step",
                disable=jax.process_index() != 0, dynamic_ncols=True)


def main(argv):
    del argv
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
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (with :variant).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
    flags.mark_flags_as_required(["config", "workdir"])
    user_error.run_absl(main, "tokenpacker_jax.train")
