"""Checks a config before anything compiles, and turns its sections into module configs.

Errors name the field (``model.projector.scale_factor``) and say what would be valid.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from tokenpacker_jax import sharding
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.data import conversation, hd, packing
from tokenpacker_jax.data.image import ASPECT_MODES
from tokenpacker_jax.models.decoder_config import DecoderConfig
from tokenpacker_jax.models.lora import LoraConfig
from tokenpacker_jax.models.mllm import PARAM_GROUPS, MLLMConfig
from tokenpacker_jax.models.projectors import ProjectorConfig, num_output_tokens
from tokenpacker_jax.models.vision import VisionConfig
from tokenpacker_jax.user_error import UserError


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the field."""


def vision_config(config: ml_collections.ConfigDict) -> VisionConfig:
    """The tower's VisionConfig from ``config.model.vision``."""
    try:
        return VisionConfig.from_dict(config.model.vision.to_dict())
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.vision: {err}") from err


def decoder_config(config: ml_collections.ConfigDict) -> DecoderConfig:
    """The LLM's DecoderConfig from ``config.model.decoder``."""
    try:
        return DecoderConfig.from_dict(config.model.decoder.to_dict())
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.decoder: {err}") from err


def projector_config(config: ml_collections.ConfigDict, out_dim: int) -> ProjectorConfig:
    """The ProjectorConfig from ``config.model.projector``; ``out_dim`` is the LLM width."""
    try:
        return ProjectorConfig.from_dict({**config.model.projector.to_dict(),
                                          "out_dim": out_dim})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.projector: {err}") from err


def lora_config(config: ml_collections.ConfigDict, group: str) -> LoraConfig | None:
    """The LoRA adapters of parameter group ``group`` from ``config.model.lora`` (None: the
    group has none: rank 0, or no targets for it)."""
    section = config.model.get("lora")
    if section is None or not section.rank:
        return None
    targets = dict(section.targets or {}).get(group)
    if not targets:
        return None
    try:
        return LoraConfig(rank=section.rank, alpha=section.alpha, dropout=section.dropout,
                          targets=(targets,) if isinstance(targets, str) else tuple(targets),
                          quantize=section.quantize, block_size=section.block_size)
    except ValueError as err:
        raise ConfigError(f"model.lora: {err}") from err


def tokenizer_source(config: ml_collections.ConfigDict) -> str:
    """Where the run's tokenizer is read from: ``model.tokenizer``, or, when that is empty,
    the decoder's checkpoint directory (``model.decoder_checkpoint``)."""
    return config.model.tokenizer or config.model.decoder_checkpoint


def mllm_config(config: ml_collections.ConfigDict, *, vision: VisionConfig | None = None,
                decoder: DecoderConfig | None = None) -> MLLMConfig:
    """The MLLMConfig; ``vision`` / ``decoder`` (e.g. read from checkpoints) replace the
    config's sections. The parts take their LoRA adapters from ``config.model.lora``."""
    vision = dataclasses.replace(vision or vision_config(config),
                                 lora=lora_config(config, "vision_tower"))
    decoder = dataclasses.replace(decoder or decoder_config(config),
                                  lora=lora_config(config, "decoder"))
    projector = projector_config(config, decoder.width)
    try:
        projector = dataclasses.replace(projector, lora=lora_config(config, "projector"))
    except ValueError as err:
        raise ConfigError(f"model.lora.targets: {err}") from err
    features = config.model.features
    return MLLMConfig(vision=vision, projector=projector,
                      decoder=decoder, select_layer=features.select_layer,
                      multi_layers=tuple(features.multi_layers),
                      train_vision=config.model.train_vision)


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ConfigError for the first field that cannot work.

    Args:
      config: a config from ``configs/*.py`` with overrides applied.
      num_devices: devices the mesh must cover (default: all of this process's devices).
    """
    if num_devices is None:
        num_devices = jax.device_count()
    try:
        mesh = sharding.mesh_shape(config.mesh.to_dict(), num_devices)
    except ValueError as err:
        raise ConfigError(f"mesh: {err}") from err
    try:
        sharding.rules_from_config(config.sharding.rules)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sharding.rules: {err}") from err

    vision = vision_config(config)
    # With a checkpoint the architecture comes from its config.json, checked when loaded.
    if not config.model.vision_checkpoint:
        num_states = vision.num_layers + 1
        features = config.model.features
        for field, index in [("model.features.select_layer", features.select_layer),
                             *[("model.features.multi_layers", i) for i in
                               features.multi_layers]]:
            _check(-num_states <= index < num_states, field,
                   f"layer {index} does not exist in a tower with {vision.num_layers} layers "
                   f"(valid: {-num_states}..{num_states - 1})")
        _check(config.data.image.image_size == vision.image_size, "data.image.image_size",
               f"{config.data.image.image_size} differs from the tower's image_size "
               f"{vision.image_size}")
        grid = vision.grid_size
        scale = config.model.projector.scale_factor
        _check(scale >= 1 and grid % scale == 0, "model.projector.scale_factor",
               f"{scale} does not divide the {grid}x{grid} patch grid "
               f"(valid: {[s for s in range(1, grid + 1) if grid % s == 0]})")
        _check(vision.num_heads % mesh["tensor"] == 0, "mesh.tensor",
               f"{mesh['tensor']} does not divide the tower's {vision.num_heads} heads")

    for target, factor in dict(config.model.get("init_kernel_scale") or {}).items():
        group = target.partition("/")[0]
        _check(group in PARAM_GROUPS, "model.init_kernel_scale",
               f"{target!r}: {group!r} is not a parameter group (valid: {PARAM_GROUPS})")
        _check(factor > 0, "model.init_kernel_scale", f"{target}: factor {factor} must be > 0")

    validate_lora(config)
    image = config.data.image
    _check(image.aspect_mode in ASPECT_MODES, "data.image.aspect_mode",
           f"{image.aspect_mode!r} is not one of {ASPECT_MODES}")
    _check(len(image.mean) == 3 and len(image.std) == 3 and min(image.std) > 0,
           "data.image", "mean and std need 3 channels and std > 0")
    validate_data(config, mesh)


def validate_lora(config: ml_collections.ConfigDict) -> None:
    """``config.model.lora``: adapters only on groups that exist and train."""
    section = config.model.get("lora")
    if section is None or not section.rank:
        return
    _check(section.rank > 0, "model.lora.rank", f"{section.rank} must be >= 0")
    targets = dict(section.targets or {})
    unknown = sorted(set(targets) - set(PARAM_GROUPS))
    _check(not unknown, "model.lora.targets",
           f"{unknown} are not parameter groups (valid: {PARAM_GROUPS})")
    trainable = tuple(config.train.trainable)
    for group, names in targets.items():
        if names:
            _check(group in trainable, "model.lora.targets",
                   f"{group!r} has adapters but does not train (train.trainable: "
                   f"{trainable}); its adapters would stay zero")
            lora_config(config, group)


def validate_data(config: ml_collections.ConfigDict,
                  mesh: dict[str, int] | None = None) -> None:
    """The ``config.data`` checks (see tokenpacker_jax/data/pipeline.py for the fields).

    ``mesh``: resolved mesh axis sizes; the global batch must divide over data x fsdp.
    """
    data = config.data
    _check(data.source in ("llava", "tfds"), "data.source",
           f"{data.source!r} is not 'llava' or 'tfds'")
    if data.source == "tfds":
        _check(bool(data.tfds.name), "data.tfds.name", "no TFDS dataset named")
    _check(data.template in conversation.TEMPLATES, "data.template",
           f"{data.template!r} is not one of {sorted(conversation.TEMPLATES)}")
    _check(data.on_error in ("skip", "raise"), "data.on_error",
           f"{data.on_error!r} is not 'skip' or 'raise'")
    _check(data.batch_size > 0, "data.batch_size", f"{data.batch_size} must be positive")
    if mesh is not None:
        replicas = mesh["data"] * mesh["fsdp"]
        _check(data.batch_size % replicas == 0, "data.batch_size",
               f"{data.batch_size} does not divide over the data x fsdp = {replicas} "
               f"devices")
    _check(data.num_epochs > 0, "data.num_epochs", f"{data.num_epochs} must be positive")
    for field in ("read_threads", "prefetch_buffer", "worker_count", "worker_buffer_size"):
        _check(data[field] >= 0, f"data.{field}", f"{data[field]} must be >= 0")
    _check(data.hd.get("global_view") in hd.GLOBAL_VIEWS, "data.hd.global_view",
           f"{data.hd.get('global_view')!r} is not one of {hd.GLOBAL_VIEWS}")
    if data.image.aspect_mode == "slice":
        _check(data.hd.patch_num in hd.HD_CANDIDATES, "data.hd.patch_num",
               f"{data.hd.patch_num} is not one of {sorted(hd.HD_CANDIDATES)}")
    _check(data.get("packing", batch_lib.NO_PACKING) in packing.PACKING, "data.packing",
           f"{data.get('packing')!r} is not one of {packing.PACKING}")
    for field in ("max_images_per_row", "max_samples_per_row"):
        _check(data.get(field, 0) >= 0, f"data.{field}", f"{data.get(field)} must be >= 0")
    if batch_lib.is_packed(data) and (data.image.aspect_mode != "slice"
                                      or data.hd.patch_num in hd.HD_CANDIDATES):
        try:
            batch_lib.Dims.of_data(data)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    if not config.model.vision_checkpoint:
        # Tokens of the smallest image: one tile (the HD 1x1 grid adds its newline).
        try:
            tokens = num_output_tokens(
                projector_config(config, config.model.decoder.width),
                vision_config(config).grid_size)
        except (ConfigError, ValueError):
            tokens = None  # reported by the projector checks
        if tokens is not None:
            tokens += 1 if data.image.aspect_mode == "slice" else 0
            _check(data.max_length > tokens, "data.max_length",
                   f"{data.max_length} leaves no room for text beside an image's {tokens} "
                   f"positions")
    if not config.model.decoder_checkpoint and "decoder" in config.model:
        limit = config.model.decoder.max_position_embeddings
        _check(data.max_length <= limit, "data.max_length",
               f"{data.max_length} exceeds the decoder's max_position_embeddings {limit}")
