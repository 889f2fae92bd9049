"""The reference TokenPacker / LLaVA-1.5 checkpoint as a whole: its ``config.json`` <-> our
run config, and its tensors (the LLM's keys beside the projector's).

A reference checkpoint directory is what the reference's ``load_pretrained_model`` reads:

    config.json  model_type ``llava_llama``: the LLaMA fields plus the multimodal ones
                 (``mm_vision_tower``, ``mm_vision_select_layer``, ``mm_vision_select_feature``,
                 ``mm_projector_type``, ``mm_hidden_size``, ``image_aspect_ratio``,
                 ``scale_factor``, ``patch_num``, ``mm_use_im_start_end``, ...)
    weights      safetensors (single or sharded) or ``pytorch_model-*.bin`` shards + index:
                 ``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``, and
                 ``model.mm_projector.*`` (some releases also hold ``model.vision_tower.*``:
                 ignored, the tower is the one ``mm_vision_tower`` names)
    tokenizer    ``tokenizer.model`` / ``tokenizer.json``, ``tokenizer_config.json``, ...

What the reference config does not record, and what is assumed then:

- the multi-level feature layers: the reference hard-codes hidden states (12, 16, 22, 23);
- the projector's attention heads: the reference hard-codes head width 128 (8 heads for
  CLIP-L's 1024);
- which projector: TokenPacker's builder ignores ``mm_projector_type`` (its released configs
  say ``mlp2x_gelu``), so the projector's keys decide (``reference.detect_projector``);
- the HD global view: the reference has one, ``reference_canvas`` (its padded tile canvas
  shrunk into one tile, see ``tokenpacker_jax.data.hd``), which every released HD
  checkpoint was trained on, so an import uses it.

Export writes the first two and the global view as extra fields (``mm_vision_multi_layers``,
``mm_projector_num_heads``, ``mm_hd_global_view``), which the reference ignores and import
reads back (a run trained with ``fit_image`` keeps it across a round trip; the reference's
own code would still build its canvas view for it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections
import numpy as np

from tokenpacker_jax.configs import common
from tokenpacker_jax.convert import hf_decoder, mapping, reference
from tokenpacker_jax.data import hd
from tokenpacker_jax.models.decoder_config import DecoderConfig
from tokenpacker_jax.models.vision import VisionConfig
from tokenpacker_jax.user_error import CheckpointError, InputError

MODEL_TYPE = "llava_llama"
ARCHITECTURE = "LlavaLlamaForCausalLM"
REFERENCE_MULTI_LAYERS = (12, 16, 22, 23)
REFERENCE_HEAD_DIM = 128
MULTI_LAYERS_FIELD = "mm_vision_multi_layers"
NUM_HEADS_FIELD = "mm_projector_num_heads"
GLOBAL_VIEW_FIELD = "mm_hd_global_view"
# image_aspect_ratio -> our data.image.aspect_mode. The reference's evaluation treats anything
# but "pad" (and its HD "slice") as the processor's resize + centre crop, i.e. "square".
_ASPECT_MODES = {"pad": "pad", "square": "square", "slice": "slice", None: "square"}


@dataclasses.dataclass(frozen=True)
class MultimodalSettings:
    """The multimodal part of a reference config, in our terms."""

    vision_tower: str  # mm_vision_tower: a hub name or a local directory
    select_layer: int  # mm_vision_select_layer
    multi_layers: tuple[int, ...]
    projector: str  # "tokenpacker" | "mlp2x_gelu"
    scale_factor: int
    num_heads: int
    aspect_mode: str  # "square" | "pad" | "slice"
    patch_num: int
    max_length: int  # tokenizer_model_max_length (2048 when absent)
    global_view: str = hd.REFERENCE_CANVAS  # HD global view (GLOBAL_VIEW_FIELD)


def settings_from_reference(config: Mapping[str, Any], *, projector: str, embed_dim: int,
                            multi_layers: tuple[int, ...] | None = None,
                            num_heads: int | None = None,
                            patch_num: int | None = None) -> MultimodalSettings:
    """Reads the multimodal fields of a reference ``config.json``.

    Args:
      config: the parsed config.json.
      projector: which projector the checkpoint's keys hold (``detect_projector``).
      embed_dim: the projector's internal width (rows of ``q_proj_1.weight``).
      multi_layers, num_heads, patch_num: override what the config says (or, when it says
        nothing, the reference's hard-coded values).
    Raises:
      ValueError naming the field that is missing or cannot be used.
    """
    select_feature = config.get("mm_vision_select_feature", "patch")
    if select_feature != "patch":
        raise CheckpointError(f"config.json: mm_vision_select_feature {select_feature!r} is not "
                              "supported (only 'patch': the class token is dropped)")
    if "mm_vision_select_layer" not in config:
        raise CheckpointError("config.json: no mm_vision_select_layer; not a LLaVA / TokenPacker "
                              "checkpoint")
    ratio = config.get("image_aspect_ratio")
    if ratio not in _ASPECT_MODES:
        raise CheckpointError(f"config.json: image_aspect_ratio {ratio!r} is not supported "
                              f"(pad, square or slice)")
    aspect_mode = _ASPECT_MODES[ratio]
    if multi_layers is None:
        multi_layers = tuple(config.get(MULTI_LAYERS_FIELD) or REFERENCE_MULTI_LAYERS)
    if num_heads is None:
        num_heads = config.get(NUM_HEADS_FIELD)
    if num_heads is None:
        if projector == "tokenpacker" and embed_dim % REFERENCE_HEAD_DIM:
            raise InputError(f"projector width {embed_dim} is not a multiple of the "
                             f"reference's head width {REFERENCE_HEAD_DIM}; give the number "
                             "of heads (--projector_heads)")
        num_heads = max(1, embed_dim // REFERENCE_HEAD_DIM)
    if patch_num is None:
        patch_num = config.get("patch_num")
    if patch_num is None:
        if aspect_mode == "slice":
            raise CheckpointError("config.json: image_aspect_ratio is 'slice' but there is no "
                                  "patch_num; give it (--patch_num)")
        patch_num = 9
    global_view = config.get(GLOBAL_VIEW_FIELD) or hd.REFERENCE_CANVAS
    if global_view not in hd.GLOBAL_VIEWS:
        raise CheckpointError(f"config.json: {GLOBAL_VIEW_FIELD} {global_view!r} is not one of "
                              f"{hd.GLOBAL_VIEWS}")
    if projector == "tokenpacker":
        # Early TokenPacker code hard-coded 2 and wrote no field.
        scale_factor = int(config.get("scale_factor") or 2)
    else:
        scale_factor = 1
    return MultimodalSettings(
        vision_tower=str(config.get("mm_vision_tower") or ""),
        select_layer=int(config["mm_vision_select_layer"]),
        multi_layers=tuple(int(i) for i in multi_layers),
        projector=projector, scale_factor=scale_factor, num_heads=int(num_heads),
        aspect_mode=aspect_mode, patch_num=int(patch_num),
        max_length=int(config.get("tokenizer_model_max_length") or 2048),
        global_view=global_view)


def settings_from_config(config: ml_collections.ConfigDict, vision_tower: str
                         ) -> MultimodalSettings:
    """The same fields from one of our run configs (for export)."""
    projector = config.model.projector
    if projector.name not in reference.REFERENCE_TABLES:
        raise ValueError(f"the reference layout has no projector {projector.name!r} (it knows "
                         f"{sorted(reference.REFERENCE_TABLES)})")
    return MultimodalSettings(
        vision_tower=vision_tower, select_layer=int(config.model.features.select_layer),
        multi_layers=tuple(int(i) for i in config.model.features.multi_layers),
        projector=projector.name, scale_factor=int(projector.scale_factor),
        num_heads=int(projector.num_heads), aspect_mode=config.data.image.aspect_mode,
        patch_num=int(config.data.hd.patch_num), max_length=int(config.data.max_length),
        global_view=str(config.data.hd.global_view))


def run_config(settings: MultimodalSettings, vision: VisionConfig, decoder: DecoderConfig,
               *, embed_dim: int, tokenizer: str, mean, std,
               dtype: str = "float32", param_dtype: str = "float32"
               ) -> ml_collections.ConfigDict:
    """Our run config (``configs.common``'s base) for a reference checkpoint: the tower
    and the LLM given by value (no checkpoint paths), stage-2 settings (``vicuna_v1``,
    projector + LLM trainable)."""
    config = common.base_config()
    config.model.vision = ml_collections.ConfigDict(dataclasses.asdict(vision))
    config.model.decoder = ml_collections.ConfigDict(dataclasses.asdict(decoder))
    config.model.features.select_layer = settings.select_layer
    config.model.features.multi_layers = settings.multi_layers
    config.model.projector.update(dict(
        name=settings.projector, scale_factor=settings.scale_factor, embed_dim=embed_dim,
        num_heads=settings.num_heads, dtype=dtype, param_dtype=param_dtype))
    config.model.tokenizer = tokenizer
    config.data.template = "vicuna_v1"
    config.data.image.update(dict(aspect_mode=settings.aspect_mode,
                                  image_size=vision.image_size, mean=tuple(mean),
                                  std=tuple(std)))
    config.data.hd.patch_num = settings.patch_num
    config.data.hd.global_view = settings.global_view
    config.data.max_length = min(settings.max_length, decoder.max_position_embeddings)
    config.train.stage = 2
    config.train.trainable = ("projector", "decoder")
    return config


def reference_config(settings: MultimodalSettings, vision: VisionConfig,
                     decoder: DecoderConfig, *, dtype: str) -> dict[str, Any]:
    """A reference ``config.json`` (transformers 4.x layout, as the reference runs on)."""
    if decoder.family != "llama":
        raise InputError(f"the reference layout is LLaVA-LLaMA; a {decoder.family} decoder "
                         "exports with --format=hf")
    config = hf_decoder.decoder_config_to_hf(decoder, layout="4")
    config.update(
        architectures=[ARCHITECTURE], model_type=MODEL_TYPE, torch_dtype=dtype,
        mm_vision_tower=settings.vision_tower,
        mm_vision_select_layer=settings.select_layer,
        mm_vision_select_feature="patch",
        mm_projector_type=settings.projector,
        mm_hidden_size=vision.width,
        image_aspect_ratio=settings.aspect_mode,
        image_grid_pinpoints=None,
        scale_factor=settings.scale_factor,
        patch_num=settings.patch_num,
        use_mm_proj=True,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        tune_mm_mlp_adapter=False,
        freeze_mm_mlp_adapter=False,
        mm_projector_lr=None,
        tokenizer_model_max_length=settings.max_length,
        tokenizer_padding_side="right",
        **{MULTI_LAYERS_FIELD: list(settings.multi_layers),
           NUM_HEADS_FIELD: settings.num_heads, GLOBAL_VIEW_FIELD: settings.global_view},
    )
    return config


def projector_state(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The ``model.mm_projector.*`` tensors of a (lazy) checkpoint mapping, read one by one,
    without touching any other key."""
    keys = [key for key in state if key.startswith(reference.PREFIX)]
    if not keys:
        raise CheckpointError(f"checkpoint has no {reference.PREFIX}* keys (no projector)")
    return {key: np.asarray(state[key]) for key in keys}


def reference_tensors(decoder: DecoderConfig, params: Mapping[str, Any], projector: str,
                      dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) pairs of the reference state dict: the LLM's ``*ForCausalLM`` keys one at
    a time, then the projector's ``model.mm_projector.*`` keys."""
    yield from mapping.export_params(hf_decoder.decoder_table(decoder), params["decoder"],
                                     num_layers=decoder.num_layers, dtype=dtype)
    yield from reference.projector_params_to_reference(params["projector"], name=projector,
                                                       dtype=dtype).items()
