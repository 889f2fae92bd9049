"""What each packed token looked at: TokenPacker's region attention on the patch grid.

Token (i, j) of the G x G output grid attends over the s x s patches (s*i + ki, s*j + kj) of
the G0 x G0 patch grid, key slot ki * s + kj (docs/algorithm.md §4; G0 = G * s). The regions tile
the patch grid, so one G0 x G0 map per head holds every token's weights, and each s x s
block of it sums to 1.

    packed_attention(model, params, pixels [N, S, S, 3])
        -> tokens [N, M, H], weights [N, M, heads, s*s]      (M = G*G)
    attention_grid(weights [N, M, heads, s*s], scale) -> [N, heads, G0, G0]

Used by ``notebooks/region_maps.ipynb``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from tokenpacker_jax.models import mllm
from tokenpacker_jax.models.vision import select_features


def packed_attention(model: mllm.MultimodalLM, params: Any, pixel_values: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """The visual tokens of ``pixel_values`` [N, S, S, 3] (N images or tiles) and the
    TokenPacker attention that made them.

    Returns:
      tokens [N, M, H] (what ``MultimodalLM.encode_images`` gives the LLM) and weights
      [N, M, heads, s*s] (float32; softmax over the s*s patches of each token's region).
    """
    if model.config.projector.name != "tokenpacker":
        raise ValueError(f"model.projector.name is {model.config.projector.name!r}: only "
                         f"the TokenPacker projector has region attention")
    config = model.config

    def run(module: mllm.MultimodalLM, pixels: jax.Array):
        hidden = module.vision_tower(pixels)
        x_last, x_multi = select_features(
            hidden, has_class_token=config.vision.has_class_token,
            select_layer=config.select_layer, multi_layers=config.multi_layers)
        return module.projector(x_last, x_multi, return_attention=True)

    return model.apply({"params": params}, pixel_values, method=run)


def attention_grid(weights: jax.Array | np.ndarray, scale: int) -> np.ndarray:
    """Region weights [N, M, heads, s*s] -> patch-grid maps [N, heads, G0, G0] (NumPy):
    entry (h, s*i + ki, s*j + kj) is head h's weight of token i*G + j on that patch."""
    weights = np.asarray(weights)
    batch, tokens, heads, slots = weights.shape
    grid = math.isqrt(tokens)
    if grid * grid != tokens or slots != scale * scale:
        raise ValueError(f"attention weights {weights.shape} are not [N, G*G, heads, s*s] "
                         f"for scale {scale}")
    maps = weights.reshape(batch, grid, grid, heads, scale, scale)  # [N, i, j, h, ki, kj]
    maps = maps.transpose(0, 3, 1, 4, 2, 5)  # [N, h, i, ki, j, kj]
    return maps.reshape(batch, heads, grid * scale, grid * scale)
