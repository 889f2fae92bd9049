"""A tiny model for the CPU: the whole pipeline at toy scale in minutes.

``--config=configs/tiny.py:stage=1,data=DIR`` where DIR was written by
``python -m tokenpacker_jax.data.synthetic --out DIR --num N --seed S --jitter 0
--tokenizer-vocab 512`` (images, LLaVA JSON per split, and a sentencepiece tokenizer in
DIR/tokenizer; ``--jitter 0`` centres the items in their cells, as the main job does).

48 px images in 8 px patches: a 6 x 6 grid, packed 4x into 3 x 3 = 9 visual tokens, one per
cell of the synthetic scenes. Stage 1 trains the projector on captions (``plain``); stage 2
the projector and the LLM on questions and answers (``qa`` and ``lookup``) mixed with the
captions (as LLaVA's stage-2 mix holds descriptions beside questions), in ``vicuna_v1``
without its system prompt, starting from ``train.init_from``. With no pretrained CLIP or LLM
to be had offline, the tiny tower is random, so stage 2 trains it too
(``model.train_vision``; the paper's configs keep it frozen), unless
``vision_checkpoint=PATH`` names a pretrained tower (the main job's stage 0,
``tokenpacker_jax.tower_pretraining``): both stages then load it and keep it frozen, as the
paper's do. The dense kernels of the decoder and projector start from 1/sqrt(width)-sized
weights rather than the big models' 0.02 (``model.init_kernel_scale``): at widths of 64-128
the 0.02 init leaves the visual tokens ~10x smaller than the text embeddings, and runs
learned the answers' priors but not the images.

``lora=true`` (stage 2): the LoRA recipe at toy scale: rank-8 adapters (alpha 16, dropout
0.05) on every linear layer of the LLM, whose base stays frozen, the projector trained in
full at its own learning rate, the tower frozen; ``quantize=int8|nf4`` stores the frozen
base of the adapted layers quantised (QLoRA).
"""

import os

from tokenpacker_jax.configs import common

VARIANTS = dict(stage=1, data="", lora=False, quantize="none", vision_checkpoint="")


def get_config(arg: str | None = None):
    variant = common.parse_variant(arg, VARIANTS)
    config = common.base_config()
    config.model.vision.update(dict(
        image_size=48, patch_size=8, width=64, mlp_dim=128, num_layers=4, num_heads=4))
    config.model.features.select_layer = -2
    config.model.features.multi_layers = (1, 2, 3, 4)
    config.model.projector.update(dict(scale_factor=2, embed_dim=64, num_heads=4))
    # 8 heads of 16 rather than 4 of 32. An answer takes two hops (in the trained model the
    # first layer copies the question's attribute word to the answer's position, the second
    # attends to the object it names); with more heads two seeds ended closer together and
    # higher (BENCHMARKS.md, "The main job").
    config.model.decoder.update(dict(
        vocab_size=512, width=128, mlp_dim=256, num_layers=2, num_heads=8, num_kv_heads=8,
        head_dim=16, max_position_embeddings=512))
    config.data.image.image_size = 48
    # The longest synthetic conversation is 84 tokens with its 9 visual tokens: 88 pads less.
    # Not packed: one sample fills 71% of a row, and packed rows' extra tile slots cost the
    # trained tower more than they save (BENCHMARKS.md "Packing": 0.89x tokens per second).
    config.data.update(dict(max_length=88, batch_size=16, read_threads=2, prefetch_buffer=32,
                            system_prompt=""))
    config.data.hd.update(dict(comma_id=-1, newline_id=-1))
    config.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    config.train.update(dict(log_every=50, eval_every=0))
    config.checkpoint.update(dict(every_steps=500, keep=2))
    # Decoder kernels of std 1/sqrt(width) (0.02 x 4.4); the projector's 5x the reference's.
    config.model.init_kernel_scale = {"decoder": 128**-0.5 / 0.02, "projector": 5.0}

    stage = variant["stage"]
    if stage not in (1, 2):
        raise ValueError(f"configs/tiny.py: stage must be 1 or 2, got {stage}")
    config.train.stage = stage
    if stage == 1:
        config.train.trainable = ("projector",)
        config.optim.update(dict(lr=1e-3, warmup_ratio=0.03))
        config.data.template = "plain"
        config.data.image.aspect_mode = "square"
        kind = "caption"
    else:
        config.model.train_vision = True
        config.train.trainable = ("vision_tower", "projector", "decoder")
        config.optim.update(dict(lr=1e-3, warmup_ratio=0.03))
        config.data.template = "vicuna_v1"
        config.data.image.aspect_mode = "pad"
        kind = "qa"
    if variant["lora"]:
        if stage != 2:
            raise ValueError("configs/tiny.py: lora=true is a stage-2 recipe (stage=2)")
        config.model.train_vision = False
        config.train.trainable = ("projector", "decoder")
        config.model.lora.update(dict(rank=8, alpha=16.0, dropout=0.05,
                                      quantize=variant["quantize"]))
        config.optim.update(dict(lr=2e-3, group_lr={"projector": 1e-3}))
    elif variant["quantize"] != "none":
        raise ValueError("configs/tiny.py: quantize= stores the base of LoRA layers; add "
                         "lora=true")
    if variant["vision_checkpoint"]:
        config.model.vision_checkpoint = variant["vision_checkpoint"]
        config.model.train_vision = False
        config.train.trainable = tuple(g for g in config.train.trainable
                                       if g != "vision_tower")
    if variant["data"]:
        root = variant["data"]
        config.data.image_folder = root
        config.data.files.update({split: os.path.join(root, f"{split}_{kind}.json")
                                  for split in ("train", "val", "test")})
        if stage == 2:
            config.data.files.train = ",".join(os.path.join(root, f"train_{k}.json")
                                               for k in ("qa", "lookup", "caption"))
        config.model.tokenizer = os.path.join(root, "tokenizer")
    return config
