"""Shared config pieces: the base ConfigDict every config starts from and variant parsing.

A config file exports ``get_config(arg)``; ``arg`` is the variant string after the colon in
``--config=configs/x.py:key=value,key=value``. Any field can then be overridden with
``--config.a.b=value``. ``tokenpacker_jax.configuration.validate`` checks a config before
anything compiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from tokenpacker_jax import sharding
from tokenpacker_jax.data.image import CLIP_MEAN, CLIP_STD


def parse_variant(arg: str | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``"llm=vicuna7b,scale=2"`` -> {"llm": "vicuna7b", "scale": 2} over ``defaults``.

    Values take the type of the default (int, float, bool, str); unknown keys are an error.
    """
    values = dict(defaults)
    if not arg:
        return values
    for item in arg.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"config variant {arg!r}: expected key=value, got {item!r}")
        key, raw = (part.strip() for part in item.split("=", 1))
        if key not in defaults:
            raise ValueError(f"config variant {arg!r}: unknown key {key!r}; "
                             f"known: {sorted(defaults)}")
        default = defaults[key]
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config variant: {key} must be true/false, got {raw!r}")
            values[key] = raw.lower() in ("true", "1")
        elif isinstance(default, int):
            values[key] = int(raw)
        elif isinstance(default, float):
            values[key] = float(raw)
        else:
            values[key] = raw
    return values


def clip_vit_l14_336() -> ml_collections.ConfigDict:
    """CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336), SPEC §1."""
    return ml_collections.ConfigDict(dict(
        family="clip", image_size=336, patch_size=14, num_channels=3, width=1024,
        mlp_dim=4096, num_layers=24, num_heads=16, layer_norm_eps=1e-5,
        hidden_act="quick_gelu", dtype="float32", param_dtype="float32",
        remat_policy="none"))


def vicuna_7b() -> ml_collections.ConfigDict:
    """LLaMA-2 7B / Vicuna-7B v1.5 (SPEC §5)."""
    return ml_collections.ConfigDict(dict(
        family="llama", vocab_size=32000, width=4096, mlp_dim=11008, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=128, hidden_act="silu", norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=1,
        eos_token_id=(2,), pad_token_id=0, dtype="float32", param_dtype="float32",
        remat_policy="none"))


def base_config() -> ml_collections.ConfigDict:
    """Fields every config has; paper defaults (CLIP-L/14-336, 144 tokens)."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.vision = clip_vit_l14_336()
    # A HF CLIP / SigLIP directory to load the tower from (its config.json then defines the
    # architecture); empty: random init from the fields above.
    config.model.vision_checkpoint = ""
    config.model.features = ml_collections.ConfigDict(dict(
        select_layer=-2,  # single level: hidden state index 23 of 25
        multi_layers=(12, 16, 22, 23),  # multi level, concatenated on channels
    ))

    config.model.projector = ml_collections.ConfigDict(dict(
        name="tokenpacker",
        scale_factor=2,  # grid / scale_factor squared tokens per image (24 -> 144)
        embed_dim=1024,
        num_heads=8,
    ))

    # The LLM (DecoderConfig fields; defaults: Vicuna-7B v1.5 = LLaMA-2 7B).
    config.model.decoder = vicuna_7b()
    # A HF LLM directory to load the decoder from (its config.json then defines it).
    config.model.decoder_checkpoint = ""
    # Tokenizer directory (tokenizer.json or a sentencepiece model); default: the decoder's.
    config.model.tokenizer = ""
    config.model.train_vision = False

    config.data = ml_collections.ConfigDict()
    config.data.image = ml_collections.ConfigDict(dict(
        aspect_mode="square",  # square | pad | slice
        image_size=336,
        mean=CLIP_MEAN,
        std=CLIP_STD,
    ))

    # Which groups train (SPEC §5: stage 1 the projector, stage 2 projector + LLM).
    config.train = ml_collections.ConfigDict(dict(
        stage=2,
        trainable=("projector", "decoder"),
        num_steps=-1,  # -1: data.num_epochs over the training split
        microbatches=1,  # gradient accumulation: the global batch in this many pieces
        init_from="",  # a previous run's workdir (stage 1 for stage 2): its params
        log_every=10,
        eval_every=0,  # 0: no periodic evaluation
        eval_batches=8,
    ))
    config.optim = ml_collections.ConfigDict(dict(
        lr=2e-5,
        group_lr={},  # e.g. {"projector": 1e-4}; others use lr
        schedule="cosine",  # linear warmup, then cosine to 0 (or "constant")
        warmup_ratio=0.03,
        weight_decay=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        grad_clip=1.0,
    ))
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3,
                                                       asynchronous=True))
    # Multi-host (TPU pods, SLURM): jax.distributed.initialize before anything else.
    config.distributed = ml_collections.ConfigDict(dict(initialize=False, timeout_s=300))

    # Mesh axis sizes; -1 = all remaining devices.
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    # Logical axis name -> mesh axes (see tokenpacker_jax/sharding.py).
    config.sharding = ml_collections.ConfigDict(dict(rules=sharding.DEFAULT_RULES))
    return config
