"""Building models from configs and loading their weights: pretrained parts for training,
a trained run for inference. (Model code itself does no I/O; this module does it.)

A run's saved config is read back through ``saved_config``, which brings configs saved by
earlier versions up to the current fields with the meaning they had when the run was
trained (``upgrade_saved_config``).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import jax
import ml_collections

from tokenpacker_jax import checkpoint, configuration, sharding
from tokenpacker_jax import train_state as state_lib
from tokenpacker_jax.data import hd
from tokenpacker_jax.models import mllm


def build_model(config: ml_collections.ConfigDict) -> mllm.MultimodalLM:
    """The MLLM; with checkpoints configured, the tower / LLM architecture comes from them."""
    from tokenpacker_jax.convert import checkpoint_io, hf_decoder, hf_vision  # noqa: PLC0415

    vision = decoder = None
    numerics = config.model.vision
    if config.model.vision_checkpoint:
        vision = hf_vision.vision_config_from_hf(
            checkpoint_io.read_config(config.model.vision_checkpoint), dtype=numerics.dtype,
            param_dtype=numerics.param_dtype, remat_policy=numerics.remat_policy)
    if config.model.decoder_checkpoint:
        d = config.model.decoder
        decoder = hf_decoder.decoder_config_from_hf(
            checkpoint_io.read_config(config.model.decoder_checkpoint), dtype=d.dtype,
            param_dtype=d.param_dtype, remat_policy=d.remat_policy,
            attention_impl=d.get("attention_impl"))
    return mllm.MultimodalLM(configuration.mllm_config(config, vision=vision,
                                                       decoder=decoder))


def load_pretrained(config, shardings) -> dict[str, Any]:
    """Parameter groups read from checkpoints, each straight into its shards."""
    from tokenpacker_jax.convert import hf  # noqa: PLC0415

    loaded = {}
    if config.model.vision_checkpoint:
        _, loaded["vision_tower"] = hf.load_vision_tower(
            config.model.vision_checkpoint, param_dtype=config.model.vision.param_dtype,
            shardings=shardings["vision_tower"])
    if config.model.decoder_checkpoint:
        _, loaded["decoder"] = hf.load_decoder(
            config.model.decoder_checkpoint, param_dtype=config.model.decoder.param_dtype,
            shardings=shardings["decoder"])
    return loaded


def upgrade_saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run config (JSON dict) with the fields of today's ``configs/common.py``,
    meaning what the run was trained with (a copy; ``saved`` is not changed).

    ``data.hd.global_view`` (the HD global view, ``tokenpacker_jax.data.hd``): configs saved
    before it existed hold the boolean ``data.hd.reference_global_view`` instead, False by
    default, and with False the tiling built the ``fit_image`` view. So: True ->
    ``reference_canvas``; False or absent -> ``fit_image``, except for a workdir written by
    ``convert import`` (``convert.imported_from`` set), whose weights are a reference
    checkpoint trained on ``reference_canvas`` (the import then left the boolean False).
    """
    saved = copy.deepcopy(saved)
    hd_config = saved.get("data", {}).get("hd")
    if hd_config is not None and "global_view" not in hd_config:
        reference_view = hd_config.pop("reference_global_view", False)
        imported = bool(saved.get("convert", {}).get("imported_from"))
        hd_config["global_view"] = (hd.REFERENCE_CANVAS if reference_view or imported
                                    else hd.FIT_IMAGE)
    return saved


def saved_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config saved with a run's checkpoint (newest by default), upgraded
    (``upgrade_saved_config``)."""
    saved = checkpoint.restore_config(checkpoint.run_directory(workdir), step)
    return ml_collections.ConfigDict(upgrade_saved_config(saved))


def check_resumable(config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict,
                    workdir: str) -> None:
    """Raises ConfigError if ``config`` would continue the HD run whose saved config is
    ``saved`` with the other global view (its checkpoints learnt from one view only)."""
    if config.data.image.aspect_mode != "slice" or saved.data.image.aspect_mode != "slice":
        return
    trained, given = saved.data.hd.global_view, config.data.hd.global_view
    if trained != given:
        raise configuration.ConfigError(
            f"data.hd.global_view: {workdir} was trained with {trained!r}, the config says "
            f"{given!r}; resume with --config.data.hd.global_view={trained}")


@dataclasses.dataclass
class TrainedModel:
    """What inference needs from a training run."""

    config: ml_collections.ConfigDict
    model: mllm.MultimodalLM
    params: dict
    tokenizer: Any
    tokens_per_tile: int


def load_trained(workdir: str, *, mesh: jax.sharding.Mesh | None = None,
                 step: int | None = None) -> TrainedModel:
    """A run's config, model, parameters (newest checkpoint by default) and tokenizer.

    The parameters are restored onto ``mesh`` (default: a one-device mesh), whatever mesh
    the run trained on.
    """
    from tokenpacker_jax.data import pipeline  # noqa: PLC0415
    from tokenpacker_jax.tokenizer import load_tokenizer  # noqa: PLC0415

    config = saved_config(workdir, step)
    model = build_model(config)
    mesh = mesh or sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                      devices=jax.devices()[:1])
    abstract, shardings = state_lib.param_shardings(
        model, mesh, config.sharding.rules, pipeline.max_tiles(config.data))
    params = checkpoint.restore_params(workdir, abstract, shardings, step)
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.decoder_checkpoint)
    return TrainedModel(config, model, params, tokenizer, pipeline.tokens_per_tile(model.config))
