"""Image loading and preprocessing for the vision tower (docs/reference.md §2), host-side
with PIL/NumPy.

Modes (``image_aspect_ratio`` in the reference):

- ``square``: resize the shortest side to ``image_size`` (bicubic), centre-crop a square
  (what transformers' ``CLIPImageProcessor`` does; stage 1 of the reference).
- ``pad``: first pad the image to a square canvas of the mean colour, image centred
  (the reference's ``expand2square``), then as ``square`` (stage 2).
- ``slice``: TokenPacker-HD tiling, see ``tokenpacker_jax.data.hd`` (``select_hd_grid`` is
  re-exported here).

Output pixels are float32 [H, W, 3] (NHWC once batched), normalised with the CLIP mean/std.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from tokenpacker_jax.data.hd import select_hd_grid
from tokenpacker_jax.user_error import UserError

__all__ = ["ASPECT_MODES", "CLIP_MEAN", "CLIP_STD", "ImageError", "expand_to_square",
           "load_image", "mean_colour", "normalize", "preprocess",
           "resize_shortest_and_centre_crop", "select_hd_grid", "to_rgb"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
ASPECT_MODES = ("square", "pad", "slice")

# Beyond this ratio of resized area to output area, only the part of the image that survives
# the centre crop is resampled (same sampling positions and filter support, so the same
# pixels), instead of materialising a huge intermediate for extreme aspect ratios.
_CROP_BEFORE_RESIZE_RATIO = 64


class ImageError(UserError, ValueError):
    """An image that cannot be read or used; the message names the file."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens and fully decodes an image file, raising ImageError naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError as err:
        raise ImageError(f"{path}: image file not found") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: cannot decode image ({err})") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB.

    Transparent pixels are composited on white, as transformers' ``convert_to_rgb`` does.
    16- and 32-bit grey images (``I;16``, ``I``, ``F``) are rescaled from their value range
    to 0..255 (PIL's own conversion would clip them to 255, turning most of them white).
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        grey = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def mean_colour(mean: Sequence[float]) -> tuple[int, ...]:
    """The reference's padding colour: int(255 * mean) per channel ((122, 116, 104) for CLIP)."""
    return tuple(int(255 * m) for m in mean)


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Pads to a square canvas of ``fill``, image centred (offset rounded down)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_shortest_and_centre_crop(image: Image.Image, size: int) -> np.ndarray:
    """Bicubic resize of the shortest side to ``size``, then centre crop: uint8 [size, size, 3].

    Output sizes and crop offsets follow transformers: the long side becomes
    int(size * long / short); the crop starts at (new - size) // 2.
    """
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if height <= width:
        new_height, new_width = size, int(size * width / height)
    else:
        new_height, new_width = int(size * height / width), size
    top, left = (new_height - size) // 2, (new_width - size) // 2
    if new_height * new_width <= _CROP_BEFORE_RESIZE_RATIO * size * size:
        resized = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
        return np.asarray(resized)[top:top + size, left:left + size]
    scale_x, scale_y = width / new_width, height / new_height
    box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box))


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [..., 3] -> float32 (x / 255 - mean) / std."""
    values = pixels.astype(np.float64) / 255.0
    return ((values - np.asarray(mean)) / np.asarray(std)).astype(np.float32)


def preprocess(image: Image.Image, *, mode: str = "square", image_size: int = 336,
               mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """One image -> normalised float32 pixels [image_size, image_size, 3] (``square``/``pad``)."""
    if mode not in ("square", "pad"):
        raise ValueError(f"preprocess: mode must be 'square' or 'pad' (HD 'slice' tiling is "
                         f"tokenpacker_jax.data.hd), got {mode!r}")
    rgb = to_rgb(image)
    if mode == "pad":
        rgb = expand_to_square(rgb, mean_colour(mean))
    return normalize(resize_shortest_and_centre_crop(rgb, image_size), mean, std)
