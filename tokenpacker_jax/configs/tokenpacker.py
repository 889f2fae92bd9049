"""The paper's TokenPacker models (LLaVA-1.5 setting, docs/reference.md §7), and a Gemma-2-2B
variant.

``--config=configs/tokenpacker.py:llm=vicuna7b,scale=2,stage=2[,hd=true,patch_num=9]``

| key          | values                         | default  |
|--------------|--------------------------------|----------|
| llm          | vicuna7b, vicuna13b, gemma2_2b | vicuna7b |
| scale        | 2, 3, 4 (144, 64, 36 tokens)   | 2        |
| stage        | 1 (projector), 2 (+ LLM)       | 2        |
| hd           | TokenPacker-HD (slice tiling)  | false    |
| patch_num    | 9, 16 (HD tile budget)         | 9        |
| global_view  | HD global view: reference_canvas (the reference's), fit_image | reference_canvas |
| microbatches | gradient accumulation; 0: 16 rows each | 0 |
| packing      | first_fit, best_fit, none (the reference: one sample per row) | first_fit |
| data         | LLaVA-1.5 data root (blip_laion_cc_sbu_558k, mix665k) | "" |
| lora         | stage 2 with LoRA adapters on the LLM (frozen base) | false |
| qlora        | lora with the adapted layers' base stored as NF4 | false |
| lean         | full stage 2 in less memory: bf16 Adam first moments, chunked loss | false |

Recipe (docs/reference.md §7): stage 1 trains the projector, lr 1e-3, global batch 256, ``plain``
captions; stage 2 the projector and the LLM, lr 2e-5, batch 128, the LLM's chat template.
Both: AdamW, cosine with 3% warmup, weight decay 0, one epoch, max length 2048, bfloat16
compute on float32 master weights, every decoder layer rematerialised. The vision tower
stays frozen. Mesh: FSDP over all chips (13B: FSDP x 2-way tensor parallelism), so that 7B
stage 2 fits v5e-16 and 13B stage 2 fits v5e-32 (16 GiB chips) with one sequence per
data-parallel shard per microbatch; ``python -m tokenpacker_jax.aot`` checks a slice before
you pay for it (BENCHMARKS.md "TPU fit").

Packing (``tokenpacker_jax/data/packing.py``): the reference pads every sample to 2,048
positions, of which LLaVA-shaped data fills a fifth in stage 2 and a twelfth in stage 1;
packed rows hold whole samples until full (96-98%). The rows' tile slots and a step's rows
come from ``python -m tokenpacker_jax.data.stats`` on LLaVA-shaped data (``synthetic
--llava-mix`` for stage 2, captions for stage 1; BENCHMARKS.md "Packing"): tile slots the
most a row took, rounded up to a multiple of 4, and rows per step in multiples of 16 (one
per chip of v5e-16) nearest to the recipe's samples per step. HD rows keep the recipe's
count with as many tile slots as their positions hold (T / 144).

LoRA (``lora=true``, the reference's ``finetune_lora.sh``): rank 128, alpha 256, dropout
0.05 on every linear layer of the LLM (q, k, v, o, gate, up, down), the LLM's base frozen
in bfloat16, the projector trained in full at 2e-5 and the adapters at 2e-4.
``qlora=true`` stores the adapted layers' frozen base as NF4 (``finetune_qlora.sh``'s 4 bits).
``lean=true`` keeps the full stage 2 in less memory: Adam's moments in the host's memory
(the first in bfloat16) but for the update, the matmul weights' gradients in bfloat16, the
loss and the attention 512 positions at a time (never the whole [tokens, 32000] logits, nor
[heads, 2048, 2048]), token lookups in the FSDP-split embedding table, and a step's 32
packed rows in one microbatch (4 rows per chip of v5e-8; padded, 4 microbatches of 32).
Accumulating over microbatches of one row per chip would hold a float32 sum of the gradients
beside each microbatch's bfloat16 ones (4.7 GiB per chip for 7B on 8 chips), more than the
other rows' activations take under full remat: 7B stage 2 on v5e-8 is 14.03 GiB per chip in
one microbatch against 17.78 in four (BENCHMARKS.md "TPU fit of the recipes").
"""

import ml_collections

from tokenpacker_jax.configs import common
from tokenpacker_jax.data import hd as hd_lib

VARIANTS = dict(llm="vicuna7b", scale=2, stage=2, hd=False, patch_num=9,
                global_view=hd_lib.REFERENCE_CANVAS, microbatches=0, packing="first_fit",
                data="", lora=False, qlora=False, lean=False)
LLMS = ("vicuna7b", "vicuna13b", "gemma2_2b")
# Sequences per microbatch by default: one per data-parallel shard on v5e-16 (7B: 16-way
# FSDP) and v5e-32 (13B: 16-way FSDP x 2-way tensor).
SEQUENCES_PER_MICROBATCH = 16
# data.stats on LLaVA-shaped data at 2,048 positions, per (stage, scale): samples per packed
# row, the most tiles a row took.
PACKED_ROWS = {(1, 2): (11.24, 12), (1, 3): (21.51, 23), (1, 4): (30.77, 33),
               (2, 2): (4.28, 7), (2, 3): (5.28, 11), (2, 4): (5.70, 11)}
# lean=true: positions per piece of the chunked loss and attention (a sequence's logits
# [512, 32000] float32 = 62.5 MiB, against 250 MiB for all 2048 positions).
LOSS_CHUNK = 512
# lean=true: rows per microbatch, a packed step's 32 at once (4 per chip of v5e-8): no float32
# gradient accumulator (see the docstring).
LEAN_ROWS_PER_MICROBATCH = 32


def vicuna_13b() -> ml_collections.ConfigDict:
    """LLaMA-2 13B / Vicuna-13B v1.5."""
    config = common.vicuna_7b()
    config.update(dict(width=5120, mlp_dim=13824, num_layers=40, num_heads=40,
                       num_kv_heads=40))
    return config


def gemma2_2b() -> ml_collections.ConfigDict:
    """google/gemma-2-2b (its config.json): sliding-window layers first, then global."""
    layers = 26
    return ml_collections.ConfigDict(dict(
        family="gemma2", vocab_size=256000, width=2304, mlp_dim=9216, num_layers=layers,
        num_heads=8, num_kv_heads=4, head_dim=256, hidden_act="gelu_pytorch_tanh",
        norm_eps=1e-6, norm_plus_one=True, post_norms=True, scale_embeddings=True,
        tie_embeddings=True, rope_theta=10000.0, max_position_embeddings=8192,
        query_pre_attn_scalar=256.0, attn_logit_softcap=50.0, final_logit_softcap=30.0,
        sliding_window=4096,
        layer_types=tuple("full_attention" if i % 2 else "sliding_attention"
                          for i in range(layers)),
        bos_token_id=2, eos_token_id=(1,), pad_token_id=0, dtype="float32",
        param_dtype="float32", remat_policy="none",
        attention_impl=ml_collections.config_dict.placeholder(str)))


def get_config(arg: str | None = None):
    variant = common.parse_variant(arg, VARIANTS)
    llm, stage = variant["llm"], variant["stage"]
    if llm not in LLMS:
        raise ValueError(f"configs/tokenpacker.py: llm must be one of {LLMS}, got {llm!r}")
    if stage not in (1, 2):
        raise ValueError(f"configs/tokenpacker.py: stage must be 1 or 2, got {stage}")
    if variant["scale"] not in (2, 3, 4):
        raise ValueError(f"configs/tokenpacker.py: scale must be 2, 3 or 4, got "
                         f"{variant['scale']}")

    config = common.base_config()
    config.model.vision_checkpoint = ""  # set to a local openai/clip-vit-large-patch14-336
    config.model.projector.scale_factor = variant["scale"]
    config.model.decoder = {"vicuna7b": common.vicuna_7b, "vicuna13b": vicuna_13b,
                            "gemma2_2b": gemma2_2b}[llm]()
    for part in (config.model.vision, config.model.projector, config.model.decoder):
        part.update(dict(dtype="bfloat16", param_dtype="float32"))
    config.model.decoder.remat_policy = "full"

    config.train.stage = stage
    config.train.trainable = ("projector",) if stage == 1 else ("projector", "decoder")
    config.optim.update(dict(lr=1e-3 if stage == 1 else 2e-5, schedule="cosine",
                             warmup_ratio=0.03, weight_decay=0.0))
    config.data.batch_size = 256 if stage == 1 else 128
    config.data.max_length = 2048
    chat = "gemma" if llm.startswith("gemma") else "vicuna_v1"
    config.data.template = "plain" if stage == 1 else chat
    # LLaVA-1.5's scripts: square images in pretraining, padded to square in finetuning.
    config.data.image.aspect_mode = "square" if stage == 1 else "pad"
    config.data.packing = variant["packing"]
    if variant["packing"] != "none" and not variant["hd"]:
        samples_per_row, most_tiles = PACKED_ROWS[stage, variant["scale"]]
        config.data.max_images_per_row = -(-most_tiles // 4) * 4
        rows = round(config.data.batch_size / samples_per_row / SEQUENCES_PER_MICROBATCH)
        config.data.batch_size = max(1, rows) * SEQUENCES_PER_MICROBATCH
    if llm == "vicuna13b":
        # Halves the all-gathered layer weights and activations per chip: 13.5 instead of
        # 15.6 GiB of 16 on v5e-32 (BENCHMARKS.md "TPU fit").
        config.mesh.update(dict(fsdp=-1, tensor=2))
    # Rows per microbatch on the slice each recipe is for: one per data-parallel shard
    # (lean: four per chip).
    per_microbatch = SEQUENCES_PER_MICROBATCH
    if variant["lean"]:
        per_microbatch = LEAN_ROWS_PER_MICROBATCH
    if variant["lora"] or variant["qlora"]:
        # v5e-4's 4 chips, as shards (13B: two rows per pair of chips take 16.20 GiB a chip,
        # one 14.99).
        per_microbatch = 4 // config.mesh.tensor
    config.train.microbatches = variant["microbatches"] or max(
        1, config.data.batch_size // per_microbatch)

    if llm.startswith("gemma"):
        config.data.hd.update(dict(comma_id=-1, newline_id=-1))  # looked up in its tokenizer
    config.data.hd.global_view = variant["global_view"]  # validate() checks the name
    if variant["hd"]:
        config.data.image.aspect_mode = "slice"
        config.data.hd.patch_num = variant["patch_num"]
        # The largest tiling's positions (16 tiles at 144 tokens: 2,465) need room for text.
        vision = config.model.vision
        tokens = (vision.image_size // vision.patch_size // variant["scale"]) ** 2
        if variant["patch_num"] in hd_lib.HD_CANDIDATES:  # others: validate() says so
            longest = hd_lib.max_hd_num_tokens(variant["patch_num"], tokens)
            if longest + 512 > config.data.max_length:
                config.data.max_length = 4096
        if variant["packing"] != "none":
            config.data.max_images_per_row = config.data.max_length // tokens
    if variant["lora"] or variant["qlora"]:
        if stage != 2:
            raise ValueError("configs/tokenpacker.py: lora / qlora are stage-2 recipes")
        config.model.lora.update(dict(rank=128, alpha=256.0, dropout=0.05,
                                      quantize="nf4" if variant["qlora"] else "none"))
        config.model.decoder.param_dtype = "bfloat16"
        config.optim.update(dict(lr=2e-4, group_lr={"projector": 2e-5}))
        config.train.loss_chunk = LOSS_CHUNK
    if variant["lean"]:
        config.optim.update(dict(mu_dtype="bfloat16", offload=True))
        config.train.update(dict(loss_chunk=LOSS_CHUNK, grad_dtype="bfloat16"))
        config.model.decoder.update(dict(attention_chunk=LOSS_CHUNK,
                                         gather_embedding_table=False))
    if variant["data"]:
        root = variant["data"].rstrip("/")
        if stage == 1:
            config.data.files.train = f"{root}/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
            config.data.image_folder = f"{root}/LLaVA-Pretrain/images"
        else:
            config.data.files.train = f"{root}/llava_v1_5_mix665k.json"
            config.data.image_folder = root
    return config
