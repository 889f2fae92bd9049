"""Packed rows through the multimodal model: each sample of a row (its own segment, its own
positions, its own image tiles in the row's tile slots) gets the logits and loss it gets
alone in the unpacked model, for a LLaMA-3-style GQA decoder and Gemma 2 with a window
shorter than the row, TokenPacker with HD tiles; on one device and on 8 (data=2, fsdp=2,
tensor=2)."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tokenpacker_jax import configuration, sharding
from tokenpacker_jax import train_state as state_lib
from tokenpacker_jax.configs import tiny
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.models import mllm
from tokenpacker_jax.models.decoder_config import DecoderConfig

VOCAB, ROW, TILES_PER_ROW, TILES_ALONE, ALONE = 64, 96, 4, 3, 48
M = 9  # visual tokens per tile of the tiny TokenPacker (6x6 patches, scale 2)
COMMA, NEWLINE = 5, 6

DECODERS = {
    "llama3_gqa": dict(family="llama", num_heads=8, num_kv_heads=2, head_dim=16,
                       rope_type="llama3", rope_theta=500000.0, rope_factor=8.0,
                       rope_original_max_position=16),
    "gemma2_window": dict(family="gemma2", num_heads=8, num_kv_heads=4, head_dim=16,
                          hidden_act="gelu_pytorch_tanh", norm_plus_one=True, post_norms=True,
                          scale_embeddings=True, tie_embeddings=True, query_pre_attn_scalar=16.0,
                          attn_logit_softcap=5.0, final_logit_softcap=8.0, sliding_window=8,
                          layer_types=("sliding_attention", "full_attention")),
}


def samples(seed=0):
    """Three samples: A an HD image of 2 tiles + global view after 3 text tokens; B one
    tile after 12; C text only. Each: ids, image mask, its tiles, loss mask, targets."""
    rng = np.random.default_rng(seed)

    def sample(before, layout, after, tiles):
        ids = np.concatenate([rng.integers(7, VOCAB, before), layout,
                              rng.integers(7, VOCAB, after)]).astype(np.int32)
        visual = np.concatenate([np.zeros(before, bool), layout == -1,
                                 np.zeros(after, bool)])
        ids[visual] = 0
        loss = np.zeros(len(ids), np.float32)
        loss[before + len(layout):-1] = 1.0
        return dict(ids=ids, visual=visual, loss=loss, pixels=rng.normal(
            size=(tiles, 48, 48, 3)).astype(np.float32),
            targets=rng.integers(0, VOCAB, len(ids)).astype(np.int32))

    tile = np.full(M, -1)
    hd = np.concatenate([tile, [COMMA], tile, [NEWLINE], tile, [NEWLINE]])
    return [sample(3, hd, 10, 3), sample(12, tile, 6, 1), sample(15, np.zeros(0, int), 0, 0)]


def pack(row_samples):
    """One packed row of ROW slots and TILES_PER_ROW tile slots, as model inputs."""
    row = dict(input_ids=np.zeros(ROW, np.int32), image_mask=np.zeros(ROW, bool),
               pixel_values=np.zeros((TILES_PER_ROW, 48, 48, 3), np.float32),
               attention_mask=np.zeros(ROW, np.int32), segment_ids=np.zeros(ROW, np.int32),
               positions=np.zeros(ROW, np.int32), target_ids=np.zeros(ROW, np.int32),
               loss_mask=np.zeros(ROW, np.float32))
    slot = tile = 0
    for segment, s in enumerate(row_samples, 1):
        end = slot + len(s["ids"])
        row["input_ids"][slot:end], row["image_mask"][slot:end] = s["ids"], s["visual"]
        row["target_ids"][slot:end], row["loss_mask"][slot:end] = s["targets"], s["loss"]
        row["attention_mask"][slot:end], row["segment_ids"][slot:end] = 1, segment
        row["positions"][slot:end] = np.arange(len(s["ids"]))
        row["pixel_values"][tile:tile + len(s["pixels"])] = s["pixels"]
        slot, tile = end, tile + len(s["pixels"])
    return row


def alone(s):
    """The sample as an unpacked batch of one, right-padded to ALONE positions."""
    pad = ALONE - len(s["ids"])
    pixels = np.zeros((1, TILES_ALONE, 48, 48, 3), np.float32)
    pixels[0, :len(s["pixels"])] = s["pixels"]
    return dict(input_ids=np.pad(s["ids"], (0, pad))[None],
                image_mask=np.pad(s["visual"], (0, pad))[None], pixel_values=pixels,
                attention_mask=np.pad(np.ones(len(s["ids"]), np.int32), (0, pad))[None])


@pytest.fixture(scope="module", params=sorted(DECODERS))
def model_and_params(request):
    config = configuration.mllm_config(tiny.get_config())
    decoder = DecoderConfig(**{**dataclasses.asdict(config.decoder), "vocab_size": VOCAB,
                               "num_layers": 2, **DECODERS[request.param]})
    config = dataclasses.replace(config, multi_layers=(1, 2, 1, 2), decoder=decoder,
                                 vision=dataclasses.replace(config.vision, num_layers=2))
    model = mllm.MultimodalLM(config)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), **batch_lib.example_inputs(
        batch_lib.Dims.of_model(config, ROW, TILES_PER_ROW)))["params"])
    # Kernels of ~1/sqrt(width), as configs/tiny.py starts them: logits then spread (std
    # 0.24 to 0.6), so a 1e-5 tolerance means something.
    params = {**params, "decoder": state_lib.scale_leaves(params["decoder"], 4.4),
              "projector": state_lib.scale_leaves(params["projector"], 5.0)}
    apply = jax.jit(model.apply)
    expected = []
    for s in samples():
        logits = apply({"params": params}, **alone(s))[0, :len(s["ids"])]
        total, _, count = mllm.token_loss_sums(logits, s["targets"], s["loss"])
        expected.append((np.asarray(logits), float(total), float(count)))
    assert np.std(expected[0][0]) > 0.2, "logits too flat for a meaningful comparison"
    return model, params, expected


def check_row(logits, row, order, expected):
    """The row's segments against the samples (``order``: sample index per segment)."""
    for segment, index in enumerate(order, 1):
        where = row["segment_ids"] == segment
        want_logits, want_total, want_count = expected[index]
        np.testing.assert_allclose(logits[where], want_logits, atol=1e-5, rtol=0)
        total, _, count = mllm.token_loss_sums(logits, row["target_ids"],
                                               row["loss_mask"] * where)
        assert float(count) == want_count
        np.testing.assert_allclose(float(total), want_total, atol=1e-5, rtol=1e-6)


def test_packed_row_equals_each_sample_alone(model_and_params):
    model, params, expected = model_and_params
    row = pack(samples())
    logits = jax.jit(model.apply)({"params": params},
                                  **{key: row[key][None] for key in batch_lib.MODEL_INPUTS})
    check_row(np.asarray(logits[0]), row, (0, 1, 2), expected)


@pytest.mark.parametrize("model_and_params", ["gemma2_window"], indirect=True)
def test_packed_rows_on_8_devices(model_and_params, mesh8):
    """Four rows (other orders and mixes) over data x fsdp, parameters split by the rules
    over fsdp and tensor (Gemma 2: 4 key/value heads, split too)."""
    model, params, expected = model_and_params
    every = samples()
    orders = [(0, 1, 2), (2, 0), (1,), (1, 2, 0)]
    rows = [pack([every[i] for i in order]) for order in orders]
    batch = {key: np.stack([row[key] for row in rows]) for key in batch_lib.MODEL_INPUTS}
    _, shardings = state_lib.param_shardings(model, mesh8, None, TILES_PER_ROW)
    placed = jax.device_put(params, shardings)
    with sharding.use_mesh(mesh8):
        inputs = {key: jax.device_put(value, sharding.batch_sharding(mesh8, value.ndim))
                  for key, value in batch.items()}
        logits = jax.jit(model.apply, out_shardings=NamedSharding(
            mesh8, PartitionSpec(("data", "fsdp"))))({"params": placed}, **inputs)
    assert logits.sharding.shard_shape(logits.shape)[0] == 1
    for row, order, row_logits in zip(rows, orders, np.asarray(logits), strict=True):
        check_row(row_logits, row, order, expected)
