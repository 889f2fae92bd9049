"""Hugging Face checkpoint directories <-> our modules and parameter trees.

Public API (kept stable):

- ``load_vision_tower(path) -> (module, params)``: a CLIP / SigLIP directory, vision-only
  (``CLIPVisionModel``, ``SiglipVisionModel``) or full (``CLIPModel``, ``SiglipModel``).
  ``module.apply({"params": params}, pixels_nhwc)`` returns the hidden states.
- ``save_vision_tower(module, params, path)``: the inverse, a vision-only HF directory.

No torch is needed for safetensors checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from tokenpacker_jax.convert import checkpoint_io, hf_vision, mapping
from tokenpacker_jax.models.vision import VisionConfig, VisionTransformer


def abstract_vision_params(config: VisionConfig) -> Any:
    """Boxed ShapeDtypeStructs of the tower's parameters; allocates nothing."""
    module = VisionTransformer(config)
    pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size,
                                   config.num_channels), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), pixels)["params"]


def load_vision_tower(path: str | os.PathLike, *, dtype: str = "float32",
                      param_dtype: str = "float32", remat_policy: str = "none",
                      shardings: Any = None) -> tuple[VisionTransformer, dict]:
    """Reads a HF CLIP / SigLIP checkpoint directory.

    Args:
      path: directory with config.json and safetensors (single or sharded) or .bin weights.
      dtype: compute dtype of the module; param_dtype: dtype of the returned parameters.
      remat_policy: rematerialisation of the encoder layers (see ``layers.REMAT_POLICIES``).
      shardings: optional tree of shardings (as the params) to load straight into.
    Returns:
      (VisionTransformer module, params dict).
    Raises:
      ValueError naming the missing / unexpected keys when the weights do not fit.
    """
    path = Path(path)
    config = hf_vision.vision_config_from_hf(
        checkpoint_io.read_config(path), dtype=dtype, param_dtype=param_dtype,
        remat_policy=remat_policy)
    state = hf_vision.VisionKeys(checkpoint_io.TensorReader(path))
    abstract = abstract_vision_params(config)
    params = mapping.import_params(
        hf_vision.vision_table(config), state, abstract, num_layers=config.num_layers,
        where=str(path), shardings=shardings)
    return VisionTransformer(config), params


def save_vision_tower(module: VisionTransformer, params: Any, path: str | os.PathLike, *,
                      dtype: Any = None) -> None:
    """Writes a vision-only HF directory (config.json + safetensors) that transformers loads."""
    config = module.config
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = hf_vision.vision_config_to_hf(config)
    if dtype is not None:
        hf_config["torch_dtype"] = str(jnp.dtype(dtype))
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    tensors = mapping.export_params(hf_vision.vision_table(config), params,
                                    num_layers=config.num_layers, dtype=dtype)
    checkpoint_io.write_safetensors(
        ((hf_vision.VISION_PREFIX + key, value) for key, value in tensors), out)
