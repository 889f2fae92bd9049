"""TokenPacker's region maps drawn over the image the model saw, for the web page.

Each packed token attends over the s x s patches of its region (``region_maps``); on the
G0 x G0 patch grid one map per head holds every token's weights. ``RegionMapper(image)``
runs the tower and projector on the image's tiles (one compiled program) and draws, per
tile, the map averaged over heads and each head's map over the tile (PNG data URLs): the
regions' borders in white, and in each region a patch as bright as its weight over the
region's largest, so where a region is lit in one patch, its token took its content from
there. Only the TokenPacker projector has region attention.

    tiles [N, s, s, 3] -> {"grid": G0, "scale": s, "heads": h,
                           "tiles": [{"mean": PNG, "heads": [PNG] * h}] * valid tiles}
"""

from __future__ import annotations

import base64
import io
from typing import Any

import jax
import numpy as np
from PIL import Image, ImageDraw

from tokenpacker_jax import region_maps
from tokenpacker_jax.data.example import ExampleBuilder
from tokenpacker_jax.models import mllm

MEAN_SIZE, HEAD_SIZE = 288, 96  # drawn tile sides, pixels


def region_levels(weights: np.ndarray, scale: int) -> np.ndarray:
    """A patch-grid map [G0, G0] -> each patch's weight over the largest in its region (the
    s x s block of its token): 1 where the token looked most."""
    grid = weights.shape[0] // scale
    blocks = weights.reshape(grid, scale, grid, scale)
    peak = blocks.max(axis=(1, 3), keepdims=True)
    return (blocks / np.maximum(peak, 1e-12)).reshape(weights.shape)


def overlay(tile: np.ndarray, weights: np.ndarray, scale: int, size: int) -> Image.Image:
    """A tile (uint8 [S, S, 3]) lit by a patch-grid map ([G0, G0], each region's weights sum
    to 1): in each region (white borders), a patch is as bright as its weight over the
    region's largest, so each packed token's region shows where it looked."""
    grid = weights.shape[0]
    cell = max(1, size // grid)
    side = cell * grid
    picture = np.asarray(Image.fromarray(tile).resize((side, side), Image.BICUBIC),
                         np.float32) / 255.0
    level = np.kron(region_levels(weights, scale), np.ones((cell, cell), np.float32))
    lit = picture * (0.12 + 0.88 * level[..., None])
    image = Image.fromarray((np.clip(lit, 0, 1) * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for k in range(0, grid + 1, scale):
        edge = min(k * cell, side - 1)
        draw.line([(edge, 0), (edge, side)], fill=(255, 255, 255), width=1)
        draw.line([(0, edge), (side, edge)], fill=(255, 255, 255), width=1)
    return image


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class RegionMapper:
    """``unavailable``: why there are no maps (None for a TokenPacker model)."""

    def __init__(self, model: mllm.MultimodalLM, params: Any, builder: ExampleBuilder):
        self.builder = builder
        projector = model.config.projector
        self.scale = projector.scale_factor
        self.unavailable = None
        if projector.name != "tokenpacker":
            self.unavailable = (f"region maps show TokenPacker's region attention; this "
                                f"model's projector is {projector.name!r}")
        self.params = params
        self._weights = jax.jit(
            lambda p, pixels: region_maps.packed_attention(model, p, pixels)[1])
        self._compiled: dict[tuple, Any] = {}

    def compile(self) -> None:
        """Builds the program for this builder's tiles, and runs it once."""
        if self.unavailable is None:
            pixels, _ = self.builder.no_image()
            jax.block_until_ready(self._program(pixels)(self.params, pixels))

    def _program(self, pixels: np.ndarray):
        if pixels.shape not in self._compiled:
            self._compiled[pixels.shape] = self._weights.lower(self.params, pixels).compile()
        return self._compiled[pixels.shape]

    def __call__(self, image: Image.Image) -> dict[str, Any]:
        if self.unavailable is not None:
            raise ValueError(self.unavailable)
        pixels, tile_mask, _, _ = self.builder.image_tiles(image)
        weights = self._program(pixels)(self.params, pixels)
        maps = region_maps.attention_grid(weights, self.scale)  # [N, heads, G0, G0]
        settings = self.builder.image
        tiles = []
        for t in np.flatnonzero(tile_mask):
            rgb = pixels[t] * np.asarray(settings.std) + np.asarray(settings.mean)
            rgb = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
            tiles.append({
                "mean": png_data_url(overlay(rgb, maps[t].mean(axis=0), self.scale,
                                             MEAN_SIZE)),
                "heads": [png_data_url(overlay(rgb, head, self.scale, HEAD_SIZE))
                          for head in maps[t]]})
        return {"grid": int(maps.shape[-1]), "scale": self.scale,
                "heads": int(maps.shape[1]), "tiles": tiles}
