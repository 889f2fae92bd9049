"""The assembled multimodal model against a sequence assembled by hand from its parts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenpacker_jax import configuration
from tokenpacker_jax.configs import tiny
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.data import example as example_lib
from tokenpacker_jax.models import mllm
from tokenpacker_jax.models.decoder import Decoder
from tokenpacker_jax.models.projectors import build_projector
from tokenpacker_jax.models.vision import VisionTransformer, select_features

LENGTH = 96


@pytest.fixture(scope="module")
def model_and_params():
    config = configuration.mllm_config(tiny.get_config())
    # configs/tiny.py with fewer layers, to keep compiles short.
    config = dataclasses.replace(
        config, multi_layers=(1, 2, 1, 2),
        vision=dataclasses.replace(config.vision, num_layers=2),
        decoder=dataclasses.replace(config.decoder, vocab_size=64, num_layers=1))
    model = mllm.MultimodalLM(config)
    params = jax.jit(model.init)(jax.random.key(0), **batch_lib.example_inputs(
        batch_lib.Dims.of_model(config, LENGTH, tiles=3), 2))
    return model, params["params"]


def _by_hand(config, params, input_ids, pixel_values, image_spans, attention_mask):
    """Tower -> features -> projector per tile, then embeddings overwritten span by span."""
    tower = VisionTransformer(config.vision)
    projector = build_projector(config.projector)
    decoder = Decoder(config.decoder)
    embeds = np.array(decoder.apply({"params": params["decoder"]}, jnp.asarray(input_ids),
                                    method=Decoder.embed))
    for sample, spans in enumerate(image_spans):
        for tile, start in spans:
            hidden = tower.apply({"params": params["vision_tower"]},
                                 pixel_values[sample, tile][None])
            x, x_multi = select_features(hidden, has_class_token=True,
                                         select_layer=config.select_layer,
                                         multi_layers=config.multi_layers)
            tokens = projector.apply({"params": params["projector"]}, x, x_multi)[0]
            embeds[sample, start:start + tokens.shape[0]] = np.asarray(tokens)
    return decoder.apply({"params": params["decoder"]}, attention_mask=attention_mask,
                         inputs_embeds=jnp.asarray(embeds))


def test_logits_equal_hand_assembled_sequence(model_and_params):
    """Sample 0: an HD-like layout (tile 0, a ',' token, tile 1, a '\\n' token) with a padding
    tile; sample 1: text only, right-padded."""
    model, params = model_and_params
    config = model.config
    m = example_lib.tokens_per_tile(config)  # 9 for the tiny config
    rng = np.random.default_rng(0)
    input_ids = rng.integers(3, 64, size=(2, LENGTH)).astype(np.int32)
    pixel_values = rng.normal(size=(2, 3, 48, 48, 3)).astype(np.float32)
    image_mask = np.zeros((2, LENGTH), bool)
    first, second = 2, 2 + m + 1
    image_mask[0, first:first + m] = True
    image_mask[0, second:second + m] = True
    attention_mask = np.ones((2, LENGTH), np.int32)
    attention_mask[1, 70:] = 0

    ours = jax.jit(model.apply)({"params": params}, input_ids, image_mask, pixel_values,
                                attention_mask)
    expected = _by_hand(config, params, input_ids, pixel_values,
                        [[(0, first), (1, second)], []], attention_mask)
    assert ours.shape == (2, LENGTH, 64)
    np.testing.assert_allclose(np.asarray(ours[0]), np.asarray(expected[0]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours[1, :70]), np.asarray(expected[1, :70]),
                               atol=1e-4)


def test_splice_places_kth_token_at_kth_marked_position():
    text = jnp.zeros((1, 6, 2))
    visual = jnp.arange(1, 7, dtype=jnp.float32).reshape(1, 3, 2)
    mask = jnp.array([[False, True, False, True, True, False]])
    out = np.asarray(mllm.splice_visual_tokens(text, visual, mask))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 0, 3, 5, 0])


def test_frozen_tower_gets_no_gradient(model_and_params):
    model, params = model_and_params
    inputs = jax.tree.map(jnp.asarray, batch_lib.example_inputs(
        batch_lib.Dims.of_model(model.config, LENGTH)))
    inputs["image_mask"] = inputs["image_mask"].at[0, 1:37].set(True)
    inputs["pixel_values"] = jax.random.normal(jax.random.key(1),
                                               inputs["pixel_values"].shape)
    targets = jnp.ones((1, LENGTH), jnp.int32)

    def loss(p):
        logits = model.apply({"params": p}, **inputs)
        return mllm.loss_and_metrics(logits, targets, jnp.ones((1, LENGTH)))[0]

    grads = jax.jit(jax.grad(loss))(params)
    tower_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["vision_tower"]))
    projector_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["projector"]))
    assert tower_norm == 0.0 and projector_norm > 0.0


def test_loss_counts_only_supervised_tokens():
    logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    targets = jnp.array([[0, 0, 0]])
    loss, metrics = mllm.loss_and_metrics(logits, targets, jnp.array([[0.0, 1.0, 1.0]]))
    np.testing.assert_allclose(loss, -(np.log(0.9) + np.log(0.2)) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], 0.5)
    assert float(metrics["supervised_tokens"]) == 2.0
