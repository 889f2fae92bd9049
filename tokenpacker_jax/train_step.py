"""The training step and the evaluation step, as pure functions of (state or params, batch).

    train_step(state, batch) -> (state, metrics)      loss, accuracy, supervised_tokens,
                                                      grad_norm, finite (scalars)
    eval_step(params, batch) -> (loss sum, correct, supervised tokens)

``batch`` holds the global arrays of ``data.batch.STEP_KEYS`` ([B, T] and [B, N, S, S, C]).
``assembly.assemble`` jits them with the run's shardings (the state donated).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tokenpacker_jax import train_state as state_lib
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.data import pipeline
from tokenpacker_jax.models import mllm
from tokenpacker_jax.optim import split_trainable


def make_train_step(model: mllm.MultimodalLM, tx: optax.GradientTransformation,
                    trainable: tuple[str, ...], microbatches: int):
    """(state, batch) -> (state, metrics). Gradients only for the trainable groups; the
    global batch is split into ``microbatches`` whose gradients are summed (accumulation),
    and the loss is the mean over all supervised tokens of the global batch."""

    def microbatch_sums(trainable_params, frozen_params, batch):
        def loss_sum(tp):
            logits = model.apply({"params": {**frozen_params, **tp}},
                                 **batch_lib.select(batch, batch_lib.MODEL_INPUTS))
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
        logits = model.apply({"params": params},
                             **batch_lib.select(batch, batch_lib.MODEL_INPUTS))
        return mllm.token_loss_sums(logits, batch["target_ids"], batch["loss_mask"])

    return eval_step


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh,
                 shardings: Mapping[str, NamedSharding] | None = None
                 ) -> dict[str, jax.Array]:
    """What the step reads of a per-host batch, as global arrays (batch axis sharded)."""
    return pipeline.global_batch(batch_lib.select(local, batch_lib.STEP_KEYS), mesh,
                                 shardings)
