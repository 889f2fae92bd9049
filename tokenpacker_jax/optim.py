"""Optimizer of a training stage (docs/reference.md §7): which parameter groups train, and how.

Stages are masks, not code paths: ``config.train.trainable`` names the parameter groups that
train (``projector``; ``projector`` + ``decoder``; ``vision_tower`` only if asked). The
optimizer sees only those groups, so frozen groups carry no optimizer state and get no
weight gradients computed at all. A group with LoRA adapters (``models/lora.py``) trains
its adapters only: its base weights are frozen like a frozen group's. Inside,
``optax.multi_transform`` labels every leaf with its group, so each group may have its own
learning rate (``optim.group_lr``); ``optim.mu_dtype`` stores Adam's first moment in
another dtype (bfloat16 halves it).

Recipe: global-norm clipping, then AdamW with linear warmup and cosine decay to zero (the
HF Trainer's ``cosine`` schedule, which LLaVA / TokenPacker train with).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax
from flax import traverse_util

from tokenpacker_jax.models import lora
from tokenpacker_jax.models.mllm import PARAM_GROUPS


def check_trainable(trainable: Sequence[str]) -> tuple[str, ...]:
    groups = tuple(trainable)
    unknown = sorted(set(groups) - set(PARAM_GROUPS))
    if unknown or not groups:
        raise ValueError(f"train.trainable must name some of {PARAM_GROUPS}, got {groups}")
    return groups


def split_trainable(params: Mapping[str, Any],
                    trainable: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trained leaves, frozen leaves) of a params dict keyed by PARAM_GROUPS, as two nested
    dicts: a group named in ``trainable`` trains whole, or only its adapters if it has any
    (``join_params`` puts the two back together)."""
    trained, frozen = {}, {}
    for group, tree in params.items():
        if group not in trainable:
            frozen[group] = tree
        elif not lora.has_adapters(tree):
            trained[group] = tree
        else:
            flat = traverse_util.flatten_dict(tree)
            trained[group] = traverse_util.unflatten_dict(
                {path: leaf for path, leaf in flat.items() if lora.is_adapter(path)})
            frozen[group] = traverse_util.unflatten_dict(
                {path: leaf for path, leaf in flat.items() if not lora.is_adapter(path)})
    return trained, frozen


def join_params(trained: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of ``split_trainable``."""
    joined = dict(frozen)
    for group, tree in trained.items():
        if group in joined:
            joined[group] = traverse_util.unflatten_dict(
                {**traverse_util.flatten_dict(joined[group]),
                 **traverse_util.flatten_dict(tree)})
        else:
            joined[group] = tree
    return joined


def learning_rate_schedule(peak: float, total_steps: int, warmup_ratio: float,
                           schedule: str = "cosine") -> optax.Schedule:
    """Linear warmup over ceil(warmup_ratio * total) steps, then cosine (or constant)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=0.0)
    if schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
    raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {schedule!r}")


def make_optimizer(optim_config, trainable_params: Mapping[str, Any],
                   total_steps: int) -> tuple[optax.GradientTransformation, dict]:
    """The optimizer over the trainable groups, and {group: lr schedule} for logging.

    Args:
      optim_config: ``config.optim`` (lr, group_lr, warmup_ratio, schedule, weight_decay,
        b1, b2, eps, grad_clip, mu_dtype: "" keeps the parameters' dtype).
      trainable_params: {group: params} of the trained groups (arrays or ShapeDtypeStructs):
        the labels and weight-decay masks are trees of the same structure (not functions,
        so ``optax.tree_map_params`` can map the state to shardings).
      total_steps: optimizer steps of the run (for the schedule).
    """
    groups = check_trainable(tuple(trainable_params))
    group_lr = dict(optim_config.group_lr or {})
    unknown = sorted(set(group_lr) - set(groups))
    if unknown:
        raise ValueError(f"optim.group_lr names groups that do not train: {unknown}")
    schedules = {
        group: learning_rate_schedule(group_lr.get(group, optim_config.lr), total_steps,
                                      optim_config.warmup_ratio, optim_config.schedule)
        for group in groups}
    labels = {group: jax.tree.map(lambda _, g=group: g, subtree)
              for group, subtree in trainable_params.items()}
    per_group = {}
    for group in groups:
        # Decay matrices only, not norms, biases or other 1-D parameters.
        decay_mask = {g: jax.tree.map(lambda p: len(p.shape) >= 2, subtree)
                      for g, subtree in trainable_params.items()}
        per_group[group] = optax.adamw(schedules[group], b1=optim_config.b1,
                                       b2=optim_config.b2, eps=optim_config.eps,
                                       mu_dtype=optim_config.get("mu_dtype") or None,
                                       weight_decay=optim_config.weight_decay, mask=decay_mask)
    chain = []
    if optim_config.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(optim_config.grad_clip))
    chain.append(optax.multi_transform(per_group, labels))
    return optax.chain(*chain), schedules
