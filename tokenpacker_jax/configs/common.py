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
from tokenpacker_jax.models.lora import DECODER_TARGETS


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
    """CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336), docs/reference.md §1."""
    return ml_collections.ConfigDict(dict(
        family="clip", image_size=336, patch_size=14, num_channels=3, width=1024,
        mlp_dim=4096, num_layers=24, num_heads=16, layer_norm_eps=1e-5,
        hidden_act="quick_gelu", dtype="float32", param_dtype="float32",
        remat_policy="none"))


def vicuna_7b() -> ml_collections.ConfigDict:
    """LLaMA-2 7B / Vicuna-7B v1.5 (docs/reference.md §7)."""
    return ml_collections.ConfigDict(dict(
        family="llama", vocab_size=32000, width=4096, mlp_dim=11008, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=128, hidden_act="silu", norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=1,
        eos_token_id=(2,), pad_token_id=0, dtype="float32", param_dtype="float32",
        remat_policy="none",
        # xla | cudnn | splash; None: by platform (tokenpacker_jax/models/attention.py).
        attention_impl=ml_collections.config_dict.placeholder(str)))


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

    # tokenpacker | mlp2x_gelu | avgpool | pixel_shuffle | ldpv2 | c_abstractor | resampler
    # (tokenpacker_jax/models/projectors.py); its output width is the decoder's.
    config.model.projector = ml_collections.ConfigDict(dict(
        name="tokenpacker",
        scale_factor=2,  # (grid / scale_factor)^2 tokens per image (24 -> 144); 1 for mlp2x_gelu
        num_queries=0,  # resampler only: its token count (0: as scale_factor gives)
        embed_dim=1024,
        num_heads=8,
        depth=3,  # c_abstractor: ResNet blocks before and after pooling
        dtype="float32",
        param_dtype="float32",
    ))

    # The LLM (DecoderConfig fields; defaults: Vicuna-7B v1.5 = LLaMA-2 7B).
    config.model.decoder = vicuna_7b()
    # A HF LLM directory to load the decoder from (its config.json then defines it).
    config.model.decoder_checkpoint = ""
    # Tokenizer directory (tokenizer.json or a sentencepiece model); default: the decoder's.
    config.model.tokenizer = ""
    config.model.train_vision = False
    # {group: factor}: multiplies the dense kernels of freshly initialised groups (narrow toy
    # models, whose fixed-std inits are far below 1/sqrt(fan_in)); a "group/name" key scales
    # the group's leaves called name instead (e.g. "vision_tower/position_embedding");
    # {} keeps every init.
    config.model.init_kernel_scale = {}
    # LoRA (tokenpacker_jax/models/lora.py): rank 0 = none. targets: {group: dense layer
    # names (fnmatch patterns)}; a group with adapters trains them only, its base frozen.
    # quantize: the adapted layers' frozen base as "none", "int8" or "nf4" (QLoRA), one scale
    # per block_size entries of the last input axis.
    config.model.lora = ml_collections.ConfigDict(dict(
        rank=0, alpha=16.0, dropout=0.0, targets={"decoder": DECODER_TARGETS},
        quantize="none", block_size=64))

    config.data = ml_collections.ConfigDict()
    config.data.image = ml_collections.ConfigDict(dict(
        aspect_mode="square",  # square | pad | slice
        image_size=336,
        mean=CLIP_MEAN,
        std=CLIP_STD,
    ))
    # Records (tokenpacker_jax/data/sources.py): "llava" = LLaVA JSON/JSONL files per
    # split, image paths relative to image_folder; "tfds" = an image-caption TFDS dataset.
    config.data.source = "llava"
    config.data.files = ml_collections.ConfigDict(dict(train="", val="", test=""))
    config.data.image_folder = ""
    config.data.tfds = ml_collections.ConfigDict(dict(
        name="",  # e.g. "my_captions" or "my_captions/config:1.0.0"
        data_dir="",  # where it was prepared ("" = TFDS's default)
        splits=dict(train="train", val="validation", test="test"),
        image_key="image", caption_key="caption",
        id_key="",  # a text feature naming the record in messages ("" = the index)
        prompt="Describe the image briefly.",  # the question a caption answers
    ))
    config.data.template = "vicuna_v1"  # plain (stage 1) | vicuna_v1 | llama3 | gemma
    # None: the template's own system prompt; "" for none.
    config.data.system_prompt = ml_collections.config_dict.placeholder(str)
    config.data.max_length = 2048  # T, positions per row (a longer sample is cut)
    # Several whole samples per row (tokenpacker_jax/data/packing.py): none | first_fit |
    # best_fit; packed, a row's tile slots (HD: every tile; at least one sample's) and its
    # samples (0: T / 16).
    config.data.packing = "none"
    config.data.max_images_per_row = 0
    config.data.max_samples_per_row = 0
    config.data.batch_size = 128  # global; each host takes batch_size / process_count
    config.data.num_epochs = 1  # the trainer's step count; the train stream never ends
    config.data.shuffle = True  # train split (seeded with config.seed, reshuffled per epoch)
    config.data.on_error = "skip"  # skip (count by reason, log, go on) | raise
    config.data.read_threads = 8  # grain threads decoding records in each process
    config.data.prefetch_buffer = 64  # examples buffered per process
    config.data.worker_count = 0  # grain worker processes (0: threads only)
    config.data.worker_buffer_size = 2
    # TokenPacker-HD (aspect_mode = slice, docs/reference.md §4); -1 ids: looked up in the
    # tokenizer.
    config.data.hd = ml_collections.ConfigDict(dict(
        patch_num=9,  # candidate grids 9 | 16 | 25
        comma_id=29892,  # ',' of the Vicuna tokenizer
        newline_id=0,  # what the reference's '\n' lookup yields (unk)
        # The global view (the extra tile of a multi-tile image), tokenpacker_jax/data/hd.py:
        # "reference_canvas": the whole padded grid canvas, margin included, shrunk to the
        # image's size within one tile (what the reference and its released checkpoints
        # use); "fit_image": the image itself shrunk into one tile (an option for new
        # training, not the reference's).
        global_view="reference_canvas",
    ))

    # Which groups train (docs/reference.md §7: stage 1 the projector, stage 2 projector + LLM).
    config.train = ml_collections.ConfigDict(dict(
        stage=2,
        trainable=("projector", "decoder"),
        num_steps=-1,  # -1: data.num_epochs over the training split
        microbatches=1,  # gradient accumulation: the global batch in this many pieces
        # > 0: the loss over this many positions at a time (never all the logits at once)
        loss_chunk=0,
        # "bfloat16": each microbatch's gradients of the matmul weights in bfloat16 (half the
        # memory), summed in float32; "": in the parameters' dtype
        grad_dtype="",
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
        mu_dtype="",  # Adam's first moment: "" = the parameters' dtype, or e.g. "bfloat16"
        # True: the optimizer state lives in the host's memory and visits the accelerator
        # for the update only (TPU / GPU; frees its memory while the microbatches run)
        offload=False,
    ))
    # restore_step: the step a rerun resumes from (its later steps are moved aside; restarted
    # with the same command once it has saved again, the run goes on from its newest step);
    # -1: the newest step whose files verify.
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3,
                                                       asynchronous=True, restore_step=-1))
    # Multi-host (TPU pods, SLURM): jax.distributed.initialize before anything else.
    config.distributed = ml_collections.ConfigDict(dict(initialize=False, timeout_s=300))

    # Mesh axis sizes; -1 = all remaining devices.
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    # Logical axis name -> mesh axes (see tokenpacker_jax/sharding.py).
    config.sharding = ml_collections.ConfigDict(dict(rules=sharding.DEFAULT_RULES))
    return config
