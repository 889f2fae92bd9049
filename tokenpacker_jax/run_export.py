"""A trained run out of our format: to PyTorch layouts (``python -m tokenpacker_jax.convert
export``), or to a run without LoRA adapters (``merge-lora``).

``export_checkpoint`` writes one of ``FORMATS``:

- ``reference``: the reference layout (config.json with the same fields, LLM + projector
  keys in safetensors, tokenizer files), so the reference PyTorch code loads it; the tower
  goes to ``DIR/vision_tower`` and ``mm_vision_tower`` names that directory (absolute), or,
  with ``--mm_vision_tower=NAME``, that name and no tower;
- ``hf``: a transformers ``*ForCausalLM`` directory (LLaMA or Gemma layout) with the tokenizer,
  plus the projector in the reference layout (``--projector_file``, default
  ``mm_projector.bin``; a ``.safetensors`` name writes safetensors);
- ``vision``: the tower as a vision-only HF CLIP / SigLIP directory with a
  ``preprocessor_config.json`` describing our preprocessing.

A run with LoRA adapters (``model.lora``) exports its LLM in the ``hf`` format as the
frozen base (dequantised if it was stored quantised) plus ``DIR/adapter`` (``ADAPTER_DIR``)
in PEFT's format (``peft.PeftModel.from_pretrained(model, DIR/adapter)``); every other part,
and every part in the other formats, with its adapters folded in. ``merge_lora`` folds all
adapters into their bases and writes a run workdir (step 0, no optimizer state, the
tokenizer in ``WORKDIR2/tokenizer``) of the same model without adapters.

Both load the run on a mesh over all devices (parameters sharded on ``fsdp``). Tensors are
fetched from the devices and written one at a time (safetensors shards of at most
``max_shard_gb``); ``dtype`` casts them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from tokenpacker_jax import assembly, checkpoint, configuration, sharding
from tokenpacker_jax.convert import adapters, checkpoint_io, hf, llava, reference
from tokenpacker_jax.convert.hf_preprocessor import preprocessor_config
from tokenpacker_jax.convert.tokenizer_files import copy_tokenizer, write_tokenizer
from tokenpacker_jax.models import mllm
from tokenpacker_jax.models.decoder import Decoder
from tokenpacker_jax.models.vision import VisionTransformer
from tokenpacker_jax.user_error import InputError

FORMATS = ("reference", "hf", "vision")
ADAPTER_DIR = "adapter"  # where an hf export of a LoRA run puts the PEFT adapter


def _all_devices_mesh() -> jax.sharding.Mesh:
    return sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})


def merge_lora(workdir: str | os.PathLike, out: str | os.PathLike, *,
               step: int | None = None) -> str:
    """A LoRA run (its newest checkpoint, or ``step``) -> a run workdir ``out`` of the same
    model without adapters, each folded into its base (``lora.merge``); returns ``out``.

    The merged parameters take the dtypes of the model without adapters (a QLoRA base,
    dequantised, is stored in the config's ``param_dtype``)."""
    out = Path(out).absolute()
    checkpoint_io.require_empty_directory(out, "--out")
    mesh = _all_devices_mesh()
    trained = assembly.load_trained(str(workdir), mesh=mesh, step=step)
    if not any(mllm.lora_configs(trained.model.config).values()):
        raise InputError(f"{workdir}: the run has no LoRA adapters (model.lora.rank is 0), "
                         "nothing to merge")
    config = ml_collections.ConfigDict(trained.config.to_dict())
    config.model.lora.rank = 0
    plain = assembly.place_model(config, mesh)
    abstract, shardings = plain.abstract_params, plain.param_shardings
    merged = mllm.merge_adapters(trained.model.config, trained.params)
    for group, tree in merged.items():
        checkpoint_io.check_fits(abstract[group], tree, group)
    params = jax.tree.map(lambda value, like, where: jax.device_put(
        value.astype(like.dtype), where), merged, abstract, shardings)
    tokenizer_dir = out / "tokenizer"
    write_tokenizer(configuration.tokenizer_source(trained.config), tokenizer_dir,
                    plain.model.config.decoder)
    config.model.tokenizer = str(tokenizer_dir)
    config.convert = ml_collections.ConfigDict(dict(
        merged_from=str(Path(workdir).absolute()), merged_step=int(trained.step)))
    return checkpoint.save_params(out, params, config.to_json())


def export_checkpoint(workdir: str | os.PathLike, out: str | os.PathLike, fmt: str, *,
                      dtype: str | None = None, step: int | None = None,
                      mm_vision_tower: str | None = None,
                      projector_file: str = "mm_projector.bin",
                      max_shard_gb: float = 5.0) -> str:
    """A run workdir (its newest checkpoint, or ``step``) -> ``out`` in ``fmt`` (one of
    FORMATS, see the module docstring); returns ``out``."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out).absolute()
    checkpoint_io.require_empty_directory(out, "--out")
    trained = assembly.load_trained(str(workdir), mesh=_all_devices_mesh(), step=step)
    adapted_config = trained.model.config
    # Every part with its adapters folded in; the hf LLM keeps its adapters apart.
    model_config = mllm.without_adapters(adapted_config)
    params = mllm.merge_adapters(adapted_config, trained.params)
    cast = jnp.dtype(dtype) if dtype else None
    max_bytes = int(max_shard_gb * 2**30)

    if fmt == "vision":
        _export_vision(trained.config, model_config.vision, params, out, cast)
    elif fmt == "hf":
        decoder_params = params["decoder"]
        if adapted_config.decoder.lora is not None:
            decoder_params = adapters.base_params(trained.params["decoder"],
                                                  adapted_config.decoder)
        hf.save_decoder(Decoder(model_config.decoder), decoder_params, out, dtype=cast,
                        max_shard_bytes=max_bytes)
        if adapted_config.decoder.lora is not None:
            adapters.save_peft_adapter(adapted_config.decoder, trained.params["decoder"],
                                       out / ADAPTER_DIR, base_model=str(out), dtype=cast)
        copy_tokenizer(configuration.tokenizer_source(trained.config), out)
        reference.save_reference_projector(params["projector"], out / projector_file,
                                           name=trained.config.model.projector.name,
                                           dtype=cast)
    else:
        if mm_vision_tower is None:
            tower_dir = out / "vision_tower"
            _export_vision(trained.config, model_config.vision, params, tower_dir, cast)
            mm_vision_tower = str(tower_dir)
        settings = llava.settings_from_config(trained.config, mm_vision_tower)
        ref_config = llava.reference_config(
            settings, model_config.vision, model_config.decoder,
            dtype=str(cast or jnp.dtype(model_config.decoder.param_dtype)))
        out.mkdir(parents=True, exist_ok=True)
        copy_tokenizer(configuration.tokenizer_source(trained.config), out)
        (out / "config.json").write_text(json.dumps(ref_config, indent=2))
        checkpoint_io.write_safetensors(
            llava.reference_tensors(model_config.decoder, params, settings.projector, cast),
            out, max_shard_bytes=max_bytes)
    return str(out)


def _export_vision(config: ml_collections.ConfigDict, vision_config, params: dict,
                   out: Path, dtype: Any) -> None:
    hf.save_vision_tower(VisionTransformer(vision_config), params["vision_tower"], out,
                         dtype=dtype)
    (out / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(config), indent=2))
