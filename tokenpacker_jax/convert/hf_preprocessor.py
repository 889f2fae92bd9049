"""A vision tower's ``preprocessor_config.json`` (transformers' image processor), both ways.

Read: the (mean, std) of an HF CLIP / SigLIP directory, each a tuple of C = 3 floats, or the
family's defaults when the file does not give them. Written: a ``CLIPImageProcessor`` config
that describes our ``square`` preprocessing of S x S tiles (S = ``data.image.image_size``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections

from tokenpacker_jax.data import image

_DEFAULT_NORMALISATION = {"clip": (image.CLIP_MEAN, image.CLIP_STD),
                          "siglip": (image.SIGLIP_MEAN, image.SIGLIP_STD)}


def image_normalisation(vision_dir: Path, family: str) -> tuple[tuple[float, ...], ...]:
    """(mean, std) from the tower's ``preprocessor_config.json``, else the family's."""
    file = vision_dir / "preprocessor_config.json"
    if file.is_file():
        values = json.loads(file.read_text())
        if "image_mean" in values and "image_std" in values:
            return tuple(values["image_mean"]), tuple(values["image_std"])
    return _DEFAULT_NORMALISATION[family]


def preprocessor_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A ``CLIPImageProcessor`` config for our ``square`` preprocessing (shortest side to
    the tile size, bicubic, centre crop, CLIP-style normalisation)."""
    size = int(config.data.image.image_size)
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
            "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": size, "width": size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(config.data.image.mean),
            "image_std": list(config.data.image.std), "do_convert_rgb": True}
