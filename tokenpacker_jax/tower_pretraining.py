"""Stage 0 of the main job: pretraining the tiny vision tower on what the synthetic cells hold.

Real runs start from a pretrained CLIP tower; the tiny one starts random, and without this
stage the held-out lookups (an object by its colour or shape, the digit) depended on the
seed. Four linear heads read each of the 9 cells of a scene from the tower's features:

    pixels  uint8 [B, S, S, 3] -> normalised float32 -> tower -> hidden states [B, 1 + G*G, W]
    features = hidden state ``layer`` (the one the projector reads), patch tokens [B, G*G, W]
    cells    = mean over each cell's (G/3 x G/3) patches            [B, 9, W]
    heads    shape-or-empty (5), colour-or-empty (6), digit-or-empty (11), cell index (9)
    loss     the sum of the four mean cross-entropies

Labels come from ``data.synthetic.labelled_scenes`` (the training split's images drawn
again from their streams). AdamW with linear warmup (5% of the steps) and cosine decay, the
gradient clipped to global norm 1. The trained tower is written with
``convert.hf.save_vision_tower``; stages 1 and 2 read it through ``model.vision_checkpoint``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tokenpacker_jax.convert import hf
from tokenpacker_jax.data import synthetic
from tokenpacker_jax.data.image import CLIP_MEAN, CLIP_STD, normalize
from tokenpacker_jax.models.vision import VisionConfig, VisionTransformer

CELLS = len(synthetic.POSITIONS)  # 3 x 3
HEAD_CLASSES = (len(synthetic.SHAPES) + 1, len(synthetic.COLOURS) + 1,
                len(synthetic.DIGITS) + 1, CELLS)  # shape, colour, digit (+ empty); cell


class CellHeads(nn.Module):
    """Patch features [B, G*G, W] -> per head, logits [B, 9, classes] (``HEAD_CLASSES``)."""

    grid: int  # G, patches per side; a multiple of 3

    @nn.compact
    def __call__(self, features: jax.Array) -> list[jax.Array]:
        batch, _, width = features.shape
        per_cell = self.grid // 3
        cells = features.reshape(batch, 3, per_cell, 3, per_cell, width).mean((2, 4))
        cells = cells.reshape(batch, CELLS, width)
        return [nn.Dense(classes, name=f"head{i}")(cells)
                for i, classes in enumerate(HEAD_CLASSES)]


def pretrain(config: VisionConfig, pixels: np.ndarray, labels: np.ndarray, *, steps: int,
             batch_size: int = 64, lr: float = 1e-3, layer: int = -2, seed: int = 0,
             mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
             log: Callable[[str], None] = print, log_every: int = 100
             ) -> tuple[VisionTransformer, dict, list[float]]:
    """Trains a fresh tower on ``pixels`` uint8 [N, S, S, 3] and their ``cell_labels``
    int32 [N, 3, 9]; returns the tower, its parameters and the loss of every step."""
    if config.grid_size % 3:
        raise ValueError(f"tower pretraining: the {config.grid_size} x {config.grid_size} "
                         f"patch grid does not split into the scenes' 3 x 3 cells")
    tower, heads = VisionTransformer(config), CellHeads(config.grid_size)
    tower_key, heads_key = jax.random.split(jax.random.key(seed))
    image = jnp.zeros((1, *pixels.shape[1:]), jnp.float32)
    params = {
        "tower": nn.meta.unbox(tower.init(tower_key, image)["params"]),
        "heads": heads.init(heads_key, jnp.zeros((1, config.grid_size**2, config.width))
                            )["params"]}
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    # Every cell's own index as the fourth head's label.
    cell_index = np.broadcast_to(np.arange(CELLS, dtype=np.int32), (len(labels), 1, CELLS))
    targets = np.concatenate([labels, cell_index], axis=1)  # [N, 4, 9]
    inputs = normalize(pixels, mean, std)

    def loss_fn(params, x, y):
        states = tower.apply({"params": params["tower"]}, x)
        patches = states[layer][:, 1:] if config.has_class_token else states[layer]
        logits = heads.apply({"params": params["heads"]}, patches)
        return sum(optax.softmax_cross_entropy_with_integer_labels(z, y[:, i]).mean()
                   for i, z in enumerate(logits))

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    order = np.random.default_rng(seed)
    losses = []
    for number in range(1, steps + 1):
        batch = order.integers(0, len(inputs), batch_size)
        params, opt_state, loss = step(params, opt_state, inputs[batch], targets[batch])
        losses.append(float(loss))
        if number % log_every == 0 or number == steps:
            log(f"stage 0: step {number}, loss {losses[-1]:.3f}")
    return tower, params["tower"], losses


def is_done(out: str) -> bool:
    """Whether ``out`` holds a saved tower (``run`` writes it last, in one rename)."""
    return os.path.exists(os.path.join(out, "config.json"))


def run(out: str, config: VisionConfig, *, steps: int, num_images: int, seed: int,
        data_seed: int, jitter: int | None, layer: int, mean: Sequence[float], std: Sequence[float],
        batch_size: int = 64, lr: float = 1e-3, log: Callable[[str], None] = print
        ) -> list[float]:
    """Pretrains a tower on the first ``num_images`` training images of the synthetic data
    drawn with ``data_seed`` and saves it to ``out`` (a HF vision directory); returns the
    losses, or [] when ``out`` already holds a tower (nothing is trained)."""
    if is_done(out):
        return []
    pixels, labels = synthetic.labelled_scenes("train", num_images, data_seed,
                                               config.image_size, jitter)
    tower, params, losses = pretrain(config, pixels, labels, steps=steps,
                                     batch_size=batch_size, lr=lr, layer=layer, seed=seed,
                                     mean=mean, std=std, log=log)
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    hf.save_vision_tower(tower, params, partial)
    os.replace(partial, out)
    return losses
