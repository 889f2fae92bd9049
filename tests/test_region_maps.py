"""Region maps: the packed tokens and attention of a whole MLLM, laid out on the patch grid
as docs/algorithm.md §4 says."""

import dataclasses

import jax
import numpy as np
import pytest

from tokenpacker_jax import configuration
from tokenpacker_jax.configs import tiny
from tokenpacker_jax.models import mllm
from tokenpacker_jax.region_maps import attention_grid, packed_attention


def test_attention_grid_puts_each_slot_on_its_patch():
    rng = np.random.default_rng(0)
    batch, grid, scale, heads = 2, 3, 2, 4
    weights = rng.random((batch, grid * grid, heads, scale * scale))
    maps = attention_grid(weights, scale)
    assert maps.shape == (batch, heads, grid * scale, grid * scale)
    for n in range(batch):
        for i in range(grid):
            for j in range(grid):
                for ki in range(scale):
                    for kj in range(scale):
                        np.testing.assert_array_equal(
                            maps[n, :, scale * i + ki, scale * j + kj],
                            weights[n, i * grid + j, :, ki * scale + kj])
    with pytest.raises(ValueError, match="not \\[N, G\\*G, heads, s\\*s\\] for scale 3"):
        attention_grid(weights, 3)


@pytest.fixture(scope="module")
def tiny_model():
    config = configuration.mllm_config(tiny.get_config("stage=2"))
    config = dataclasses.replace(
        config, vision=dataclasses.replace(config.vision, num_layers=2),
        multi_layers=(1, 2, 1, 2),
        decoder=dataclasses.replace(config.decoder, num_layers=1))
    model = mllm.MultimodalLM(config)
    # Only the tower and the projector take part: the decoder needs no parameters here.
    size = config.vision.image_size
    params = model.init(jax.random.key(0), np.zeros((1, 1, size, size, 3), np.float32),
                        method=mllm.MultimodalLM.encode_images)["params"]
    return model, params


def test_packed_attention_is_what_the_llm_gets(tiny_model):
    model, params = tiny_model
    config = model.config
    pixels = np.random.default_rng(1).normal(
        size=(2, config.vision.image_size, config.vision.image_size, 3)).astype(np.float32)
    tokens, weights = jax.jit(lambda p, x: packed_attention(model, p, x))(params, pixels)
    expected = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                method=mllm.MultimodalLM.encode_images)
                       )(params, pixels[:, None])
    np.testing.assert_allclose(np.asarray(tokens), np.asarray(expected), atol=1e-6, rtol=0)
    grid = config.vision.image_size // config.vision.patch_size  # 12
    scale = config.projector.scale_factor
    assert weights.shape == (2, (grid // scale) ** 2, config.projector.num_heads, scale ** 2)
    maps = attention_grid(weights, scale)
    # Every s x s block (one token's region) sums to 1 for every head.
    blocks = maps.reshape(2, -1, grid // scale, scale, grid // scale, scale).sum(axis=(3, 5))
    np.testing.assert_allclose(blocks, 1.0, atol=1e-5)
    assert np.ptp(maps) > 0.05  # not uniform


def test_packed_attention_needs_tokenpacker(tiny_model):
    model, params = tiny_model
    other = mllm.MultimodalLM(dataclasses.replace(
        model.config, projector=dataclasses.replace(model.config.projector,
                                                    name="mlp2x_gelu", scale_factor=1)))
    with pytest.raises(ValueError, match="model.projector.name is 'mlp2x_gelu'"):
        packed_attention(other, params, np.zeros((1, 48, 48, 3), np.float32))
