"""configs/tokenpacker.py: the paper's variants (LLM, scale, stage, HD) and Gemma-2-2B, with
The hyperparameters of docs/reference.md §7, validated for the slices they are meant for."""

import pytest
from paper_facts import TOKENS_PER_SCALE

from tokenpacker_jax import configuration
from tokenpacker_jax.configs import tokenpacker
from tokenpacker_jax.convert import hf_decoder
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.data import example as example_lib

# The published config.json files (their architecture keys).
VICUNA_13B_V15 = dict(
    model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
    num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, hidden_act="silu",
    max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
GEMMA_2_2B = dict(
    model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
    num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
    query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0, attention_bias=False, bos_token_id=2, eos_token_id=1,
    pad_token_id=0)


def _decoder_from_hf(values, config):
    d = config.model.decoder
    return hf_decoder.decoder_config_from_hf(values, dtype=d.dtype, param_dtype=d.param_dtype,
                                             remat_policy=d.remat_policy)


@pytest.mark.parametrize("llm,devices", [("vicuna7b", 16), ("vicuna13b", 32),
                                         ("gemma2_2b", 8)])
@pytest.mark.parametrize("stage", [1, 2])
def test_stages_follow_the_paper_recipe(llm, devices, stage):
    config = tokenpacker.get_config(f"llm={llm},stage={stage}")
    configuration.validate(config, num_devices=devices)
    assert config.train.stage == stage
    # Packed rows: about the recipe's 256 / 128 samples a step (11.2 / 4.3 samples a row).
    if stage == 1:
        assert tuple(config.train.trainable) == ("projector",)
        assert (config.optim.lr, config.data.batch_size) == (1e-3, 16)
        assert config.data.template == "plain" and config.data.image.aspect_mode == "square"
    else:
        assert tuple(config.train.trainable) == ("projector", "decoder")
        assert (config.optim.lr, config.data.batch_size) == (2e-5, 32)
        assert config.data.template == ("gemma" if llm == "gemma2_2b" else "vicuna_v1")
        assert config.data.image.aspect_mode == "pad"
    assert not config.model.train_vision
    assert (config.optim.schedule, config.optim.warmup_ratio, config.optim.weight_decay) == (
        "cosine", 0.03, 0.0)
    assert config.data.max_length == 2048 and config.data.num_epochs == 1
    assert config.data.packing == "first_fit"
    assert config.data.max_images_per_row == (12 if stage == 1 else 8)
    padded = tokenpacker.get_config(f"llm={llm},stage={stage},packing=none")
    assert padded.data.batch_size == (256 if stage == 1 else 128)
    for part in ("vision", "projector", "decoder"):
        assert config.model[part].dtype == "bfloat16"
        assert config.model[part].param_dtype == "float32"
    assert config.model.decoder.remat_policy == "full"
    # 16 rows per microbatch: one per data-parallel shard on the slices of the table.
    assert config.train.microbatches == config.data.batch_size // 16
    assert config.mesh.fsdp == -1
    assert config.mesh.tensor == (2 if llm == "vicuna13b" else 1)


@pytest.mark.parametrize("scale,tokens", TOKENS_PER_SCALE.items())
def test_scales(scale, tokens):
    config = tokenpacker.get_config(f"llm=vicuna13b,scale={scale}")
    configuration.validate(config, num_devices=32)
    assert example_lib.tokens_per_tile(configuration.mllm_config(config)) == tokens


def test_decoders_match_the_published_configs():
    config = tokenpacker.get_config("llm=vicuna13b")
    assert configuration.decoder_config(config) == _decoder_from_hf(VICUNA_13B_V15, config)
    config = tokenpacker.get_config("llm=gemma2_2b")
    gemma = configuration.decoder_config(config)
    assert gemma == _decoder_from_hf(GEMMA_2_2B, config)
    assert gemma.layer_types[:2] == ("sliding_attention", "full_attention")
    assert gemma.sliding_layers.count(True) == 13
    # Its tokenizer has other ids for ',' and '\n': looked up (-1), not Vicuna's.
    assert (config.data.hd.comma_id, config.data.hd.newline_id) == (-1, -1)


@pytest.mark.parametrize("patch_num,scale,tiles,max_length", [
    (9, 2, 10, 2048), (16, 2, 17, 4096), (16, 4, 17, 2048)])
def test_hd_variants(patch_num, scale, tiles, max_length):
    config = tokenpacker.get_config(f"hd=true,patch_num={patch_num},scale={scale}")
    configuration.validate(config, num_devices=16)
    assert config.data.image.aspect_mode == "slice"
    assert config.data.hd.patch_num == patch_num
    # The reference's global view, which its released HD checkpoints were trained on.
    assert config.data.hd.global_view == "reference_canvas"
    assert example_lib.image_settings(config.data).global_view == "reference_canvas"
    assert batch_lib.max_tiles(config.data) == tiles
    # The largest tiling (docs/algorithm.md §6's count) leaves room for text.
    assert config.data.max_length == max_length
    assert config.data.max_length <= config.model.decoder.max_position_embeddings
    # Packed: as many tile slots as the positions hold, the recipe's rows.
    tokens = TOKENS_PER_SCALE[scale]
    assert config.data.max_images_per_row == max_length // tokens >= tiles
    assert config.data.batch_size == 128


def test_hd_global_view_variant():
    config = tokenpacker.get_config("hd=true,global_view=fit_image")
    assert config.data.hd.global_view == "fit_image"
    configuration.validate(config, num_devices=16)
    with pytest.raises(configuration.ConfigError, match="data.hd.global_view"):
        configuration.validate(tokenpacker.get_config("hd=true,global_view=fit"),
                               num_devices=16)


def test_stage_2_recipes_rows_per_microbatch():
    # lean: a packed step's 32 rows in one microbatch (4 per chip of v5e-8), so that no
    # float32 gradient accumulator sits beside each microbatch's gradients; padded: 4 of 32.
    lean = tokenpacker.get_config("llm=vicuna7b,stage=2,lean=true")
    assert (lean.data.batch_size, lean.train.microbatches) == (32, 1)
    assert lean.optim.offload and lean.train.grad_dtype == "bfloat16"
    padded = tokenpacker.get_config("llm=vicuna7b,stage=2,lean=true,packing=none")
    assert (padded.data.batch_size, padded.train.microbatches) == (128, 4)
    # LoRA: one row per data-parallel shard of v5e-4 (7B: 4 chips; 13B: 2 pairs of chips).
    lora = tokenpacker.get_config("llm=vicuna7b,stage=2,lora=true")
    assert (lora.data.batch_size, lora.train.microbatches) == (32, 8)
    lora = tokenpacker.get_config("llm=vicuna13b,stage=2,qlora=true")
    assert (lora.data.batch_size, lora.train.microbatches) == (32, 16)


def test_microbatches_and_data_root():
    config = tokenpacker.get_config("stage=1,microbatches=4,data=/data/llava/")
    assert config.train.microbatches == 4
    assert config.data.files.train == "/data/llava/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
    assert config.data.image_folder == "/data/llava/LLaVA-Pretrain/images"
    config = tokenpacker.get_config("stage=2,data=/data/llava")
    assert config.data.files.train == "/data/llava/llava_v1_5_mix665k.json"
    assert config.data.image_folder == "/data/llava"


@pytest.mark.parametrize("variant,message", [
    ("llm=llama70b", "llm must be one of"), ("stage=3", "stage must be 1 or 2"),
    ("scale=5", "scale must be 2, 3 or 4"), ("hd=maybe", "hd must be true/false"),
    ("patch=9", "unknown key 'patch'")])
def test_bad_variants(variant, message):
    with pytest.raises(ValueError, match=message):
        tokenpacker.get_config(variant)


def test_validation_of_variants_names_the_field():
    config = tokenpacker.get_config("hd=true,patch_num=12")
    with pytest.raises(configuration.ConfigError, match="data.hd.patch_num: 12"):
        configuration.validate(config, num_devices=16)
    # 13B's 2-way tensor axis does not divide an odd slice.
    with pytest.raises(configuration.ConfigError, match="mesh:"):
        configuration.validate(tokenpacker.get_config("llm=vicuna13b"), num_devices=9)
    # Stage 1's 256 sequences do not split over 24 data-parallel chips.
    with pytest.raises(configuration.ConfigError, match="data.batch_size: 256"):
        configuration.validate(tokenpacker.get_config("stage=1,packing=none"), num_devices=24)
    # Packed rows need their tile slots.
    config = tokenpacker.get_config("stage=2")
    config.data.max_images_per_row = 0
    with pytest.raises(configuration.ConfigError, match="data.max_images_per_row: 0"):
        configuration.validate(config, num_devices=16)
