"""CLIP / SigLIP vision towers: HF config <-> VisionConfig, and the weight name table."""

from __future__ import annotations

from collections.abc import Mapping

from tokenpacker_jax.convert.mapping import (
    CONV,
    FLAT,
    IDENTITY,
    LINEAR,
    LINEAR_IN2,
    RenamedKeys,
    Rule,
)
from tokenpacker_jax.models.vision import VisionConfig
from tokenpacker_jax.user_error import CheckpointError

# model_type of a vision-only config / of the full (image + text) model -> our family.
_VISION_ONLY_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
_FULL_MODEL_TYPES = {"clip": "clip", "siglip": "siglip"}

# Defaults of transformers' CLIPVisionConfig / SiglipVisionConfig, for config.json files that
# list only non-default values (older releases, e.g. openai/clip-vit-large-patch14-336).
_HF_DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                   hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}

# Key prefix of the tower inside full checkpoints (and vision-only ones saved by
# transformers 4.x); transformers 5.x saves vision-only models without it.
VISION_PREFIX = "vision_model."
# Keys of the released towers that our module does not have: SigLIP's attention-pooling
# head (only its pooled output uses it).
IGNORED_VISION_KEYS = ("head.",)


def vision_config_from_hf(hf_config: Mapping, **overrides) -> VisionConfig:
    """Our VisionConfig from a CLIP / SigLIP ``config.json`` (full or vision-only)."""
    model_type = hf_config.get("model_type")
    if model_type in _FULL_MODEL_TYPES:
        family = _FULL_MODEL_TYPES[model_type]
        values = dict(hf_config.get("vision_config") or {})
    elif model_type in _VISION_ONLY_TYPES:
        family = _VISION_ONLY_TYPES[model_type]
        values = dict(hf_config)
    else:
        raise CheckpointError(f"config.json: model_type {model_type!r} is not a CLIP or SigLIP "
                              f"model (expected one of {sorted(_FULL_MODEL_TYPES)} or "
                              f"{sorted(_VISION_ONLY_TYPES)})")
    merged = {**_HF_DEFAULTS[family], **values}
    return VisionConfig(
        family=family,
        image_size=int(merged["image_size"]),
        patch_size=int(merged["patch_size"]),
        num_channels=int(merged["num_channels"]),
        width=int(merged["hidden_size"]),
        mlp_dim=int(merged["intermediate_size"]),
        num_layers=int(merged["num_hidden_layers"]),
        num_heads=int(merged["num_attention_heads"]),
        layer_norm_eps=float(merged["layer_norm_eps"]),
        hidden_act=str(merged["hidden_act"]),
        **overrides,
    )


def vision_config_to_hf(config: VisionConfig) -> dict:
    """A vision-only HF ``config.json`` (CLIPVisionModel / SiglipVisionModel) for ``config``."""
    model_type = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}[config.family]
    architecture = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}[config.family]
    out = dict(
        architectures=[architecture],
        model_type=model_type,
        hidden_size=config.width,
        intermediate_size=config.mlp_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_channels=config.num_channels,
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        attention_dropout=0.0,
    )
    if config.family == "siglip":
        out["vision_use_head"] = False
    return out


def vision_table(config: VisionConfig) -> list[Rule]:
    """Our parameter path <-> HF key (without the ``vision_model.`` prefix)."""
    layer = "encoder.layers.{i}."
    ours_layer = ("encoder", "layers")
    table = [
        Rule(("patch_embedding", "kernel"), "embeddings.patch_embedding.weight", CONV),
        Rule(("position_embedding",), "embeddings.position_embedding.weight", IDENTITY),
        Rule(("post_layernorm", "scale"), "post_layernorm.weight"),
        Rule(("post_layernorm", "bias"), "post_layernorm.bias"),
    ]
    if config.family == "clip":
        table += [
            Rule(("class_embedding",), "embeddings.class_embedding"),
            Rule(("pre_layrnorm", "scale"), "pre_layrnorm.weight"),
            Rule(("pre_layrnorm", "bias"), "pre_layrnorm.bias"),
        ]
    else:
        table.append(Rule(("patch_embedding", "bias"), "embeddings.patch_embedding.bias"))
    for proj in ("q_proj", "k_proj", "v_proj"):
        table += [
            Rule((*ours_layer, "self_attn", proj, "kernel"), f"{layer}self_attn.{proj}.weight",
                 LINEAR),
            Rule((*ours_layer, "self_attn", proj, "bias"), f"{layer}self_attn.{proj}.bias", FLAT),
        ]
    table += [
        Rule((*ours_layer, "self_attn", "out_proj", "kernel"), f"{layer}self_attn.out_proj.weight",
             LINEAR_IN2),
        Rule((*ours_layer, "self_attn", "out_proj", "bias"), f"{layer}self_attn.out_proj.bias"),
        Rule((*ours_layer, "fc1", "kernel"), f"{layer}mlp.fc1.weight", LINEAR),
        Rule((*ours_layer, "fc1", "bias"), f"{layer}mlp.fc1.bias"),
        Rule((*ours_layer, "fc2", "kernel"), f"{layer}mlp.fc2.weight", LINEAR),
        Rule((*ours_layer, "fc2", "bias"), f"{layer}mlp.fc2.bias"),
    ]
    for norm in ("layer_norm1", "layer_norm2"):
        table += [
            Rule((*ours_layer, norm, "scale"), f"{layer}{norm}.weight"),
            Rule((*ours_layer, norm, "bias"), f"{layer}{norm}.bias"),
        ]
    return table


class VisionKeys(RenamedKeys):
    """View of a checkpoint's tower keys without the ``vision_model.`` prefix.

    Full CLIP / SigLIP checkpoints carry text-model keys; those (everything outside the
    prefix) and SigLIP's pooling head are left out here, so that what remains must match
    the tower exactly.
    """

    def __init__(self, state: Mapping):
        has_prefix = any(key.startswith(VISION_PREFIX) for key in state)
        prefix = VISION_PREFIX if has_prefix else ""
        names = {}
        for key in state:
            if not key.startswith(prefix):
                continue
            short = key[len(prefix):]
            if short.startswith(IGNORED_VISION_KEYS) or short.endswith("position_ids"):
                continue
            names[short] = key
        super().__init__(state, names)
