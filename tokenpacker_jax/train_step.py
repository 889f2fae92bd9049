"""The training step and the evaluation step, as pure functions of (state or params, batch).

    train_step(state, batch) -> (state, metrics)      loss, accuracy, supervised_tokens,
                                                      grad_norm, finite (scalars)
    eval_step(params, batch) -> (loss sum, correct, supervised tokens)

``batch`` holds the global arrays of ``data.batch.STEP_KEYS`` ([B, T] and [B, N, S, S, C]).
``assembly.assemble`` jits them with the run's shardings (the state donated).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tokenpacker_jax import train_state as state_lib
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.models import mllm
from tokenpacker_jax.optim import join_params, split_trainable

# Leaves the model only uses cast to its compute dtype (dense and conv kernels, embedding
# tables, LoRA adapters): their gradients may be taken in that dtype (train.grad_dtype).
MATMUL_WEIGHTS = ("kernel", "embedding", "lora_a", "lora_b")


def make_train_step(model: mllm.MultimodalLM, tx: optax.GradientTransformation,
                    trainable: tuple[str, ...], microbatches: int, *, loss_chunk: int = 0,
                    grad_dtype: str = "", offload: bool = False, seed: int = 0):
    """(state, batch) -> (state, metrics). Gradients only for the trainable leaves
    (``optim.split_trainable``); the global batch is split into ``microbatches`` whose
    gradients are summed (accumulation), and the loss is the mean over all supervised tokens
    of the global batch.

    ``loss_chunk`` > 0 computes the loss that many positions at a time
    (``mllm.chunked_token_loss_sums``). ``grad_dtype`` (e.g. "bfloat16"): each microbatch's
    gradients of the matmul weights (``MATMUL_WEIGHTS``, which the model casts to its compute
    dtype anyway) are taken in that dtype, half the memory of float32 ones, and summed in
    float32. ``offload``: the optimizer state lives in the host's memory (``optim.offload``)
    and visits the devices for the update only, after the microbatches' activations are gone.
    LoRA dropout draws from ``seed``, the step and the microbatch, so a resumed run draws
    what an uninterrupted one would.
    """
    dropout = mllm.uses_dropout(model.config)

    def differentiated(trainable_params):
        if not grad_dtype:
            return trainable_params
        return jax.tree_util.tree_map_with_path(
            lambda path, p: p.astype(grad_dtype) if path[-1].key in MATMUL_WEIGHTS else p,
            trainable_params)

    def accumulator(trainable_params):
        return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype,
                                                                          jnp.float32)),
                            trainable_params)

    def microbatch_sums(trainable_params, frozen_params, batch, key):
        rngs = {"dropout": key} if dropout else {}
        inputs = batch_lib.select(batch, batch_lib.MODEL_INPUTS)

        def loss_sum(tp):
            variables = {"params": join_params(tp, frozen_params)}
            if loss_chunk:
                hidden = model.apply(variables, **inputs, rngs=rngs,
                                     method=mllm.MultimodalLM.hidden_states)
                head = functools.partial(model.apply, variables,
                                         method=mllm.MultimodalLM.logits)
                total, correct, count = mllm.chunked_token_loss_sums(
                    head, hidden, batch["target_ids"], batch["loss_mask"], loss_chunk)
            else:
                logits = model.apply(variables, **inputs, rngs=rngs)
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

    def to_memory(opt_state, space):
        # The per-parameter leaves (train_state.optimizer_shardings); counters stay put.
        return jax.tree.map(lambda x: jax.device_put(x, space) if x.ndim else x, opt_state)

    def train_step(state: state_lib.TrainState, batch: dict):
        trainable_params, frozen_params = split_trainable(state.params, trainable)
        diff_params = differentiated(trainable_params)
        step_key = jax.random.fold_in(jax.random.key(seed), state.step)
        if microbatches == 1:
            grads, total, correct, count = microbatch_sums(diff_params, frozen_params,
                                                           batch, step_key)
        else:
            def body(carry, piece):
                index, micro = piece
                sums = microbatch_sums(diff_params, frozen_params, micro,
                                       jax.random.fold_in(step_key, index))
                return jax.tree.map(lambda a, b: a + b.astype(a.dtype), carry, sums), None

            zeros = (accumulator(trainable_params), jnp.zeros(()), jnp.zeros(()),
                     jnp.zeros(()))
            (grads, total, correct, count), _ = jax.lax.scan(
                body, zeros, (jnp.arange(microbatches), split_microbatches(batch)))
        denominator = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g.astype(jnp.float32) / denominator).astype(
            jnp.promote_types(p.dtype, jnp.float32)), grads, trainable_params)
        opt_state = state.opt_state
        if offload:
            opt_state = to_memory(opt_state, jax.memory.Space.Device)
        updates, opt_state = tx.update(grads, opt_state, trainable_params)
        if offload:
            opt_state = to_memory(opt_state, jax.memory.Space.Host)
        new_trainable = optax.apply_updates(trainable_params, updates)
        loss = total / denominator
        step_metrics = {"loss": loss, "accuracy": correct / denominator,
                        "supervised_tokens": count, "grad_norm": optax.global_norm(grads),
                        "finite": jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))}
        new_state = state.replace(step=state.step + 1,
                                  params=join_params(new_trainable, frozen_params),
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
    return batch_lib.global_batch(batch_lib.select(local, batch_lib.STEP_KEYS), mesh,
                                 shardings)
