"""Hugging Face checkpoint directories <-> our modules and parameter trees.

Public API (kept stable):

- ``load_vision_tower(path) -> (module, params)``: a CLIP / SigLIP directory, vision-only
  (``CLIPVisionModel``, ``SiglipVisionModel``) or full (``CLIPModel``, ``SiglipModel``).
  ``module.apply({"params": params}, pixels_nhwc)`` returns the hidden states.
- ``save_vision_tower(module, params, path)``: the inverse, a vision-only HF directory.
- ``load_decoder(path) -> (module, params)``: a LLaMA-2 / Vicuna, LLaMA-3.x, Gemma or
  Gemma 2 directory (``*ForCausalLM``; the LLM part of reference LLaVA / TokenPacker
  checkpoints as well). ``module.apply({"params": params}, input_ids)`` returns logits.
- ``save_decoder(module, params, path)``: the inverse, a directory that transformers'
  ``AutoModelForCausalLM.from_pretrained`` loads.

No torch is needed for safetensors checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from tokenpacker_jax import sharding
from tokenpacker_jax.convert import checkpoint_io, hf_decoder, hf_vision, mapping
from tokenpacker_jax.models.decoder import Decoder, DecoderConfig
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


def abstract_decoder_params(config: DecoderConfig) -> Any:
    """Boxed ShapeDtypeStructs of a decoder's parameters; allocates nothing."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(Decoder(config).init, jax.random.key(0), ids)["params"]


def load_decoder(path: str | os.PathLike, *, dtype: str = "float32",
                 param_dtype: str = "float32", remat_policy: str = "none",
                 attention_impl: str | None = None, shardings: Any = None,
                 mesh: jax.sharding.Mesh | None = None,
                 rules: Any = None) -> tuple[Decoder, dict]:
    """Reads a HF LLaMA / Gemma / Gemma 2 checkpoint directory.

    Args:
      path: directory with config.json (transformers 4.x or 5.x layout) and safetensors
        (single or sharded) or .bin weights.
      dtype: compute dtype of the module; param_dtype: dtype of the returned parameters.
      remat_policy: rematerialisation of the layers (see ``layers.REMAT_POLICIES``).
      attention_impl: None / "xla" / "cudnn" (``jax.nn.dot_product_attention``).
      shardings: optional tree of shardings (as the params) to load straight into; or
      mesh (+ rules): derive them from the logical axis names.
    Returns:
      (Decoder module, params dict); parameters are read and placed one at a time.
    Raises:
      ValueError naming the missing / unexpected keys when the weights do not fit.
    """
    path = Path(path)
    config = hf_decoder.decoder_config_from_hf(
        checkpoint_io.read_config(path), dtype=dtype, param_dtype=param_dtype,
        remat_policy=remat_policy, attention_impl=attention_impl)
    abstract = abstract_decoder_params(config)
    if shardings is None and mesh is not None:
        shardings = sharding.logical_shardings(abstract, mesh, rules)
    state = hf_decoder.DecoderKeys(checkpoint_io.TensorReader(path), config)
    params = mapping.import_params(
        hf_decoder.decoder_table(config), state, abstract, num_layers=config.num_layers,
        where=str(path), shardings=shardings)
    return Decoder(config), params


def save_decoder(module: Decoder, params: Any, path: str | os.PathLike, *,
                 dtype: Any = None, layout: str = "5",
                 max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json + safetensors (sharded with an index above ``max_shard_bytes``)
    that ``transformers`` loads as ``*ForCausalLM``. Tensors are fetched and written one at a
    time; ``dtype`` casts them (e.g. "bfloat16"); ``layout`` "5" or "4" for config.json."""
    config = module.config
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = hf_decoder.decoder_config_to_hf(config, layout)
    torch_dtype = str(jnp.dtype(dtype or config.param_dtype))
    hf_config["torch_dtype" if layout == "4" else "dtype"] = torch_dtype
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    tensors = mapping.export_params(hf_decoder.decoder_table(config), params,
                                    num_layers=config.num_layers, dtype=dtype)
    checkpoint_io.write_safetensors(tensors, out, max_shard_bytes=max_shard_bytes)
