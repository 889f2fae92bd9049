"""Every projector of the registry: output shape at its token budget, finite gradients, the
same outputs sharded over 8 simulated devices as on one, and NumPy checks of what the simple
baselines compute."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from paper_facts import TOKENS_PER_SCALE
from scipy.special import erf

from tokenpacker_jax import sharding
from tokenpacker_jax.models import projectors
from tokenpacker_jax.models.baselines import LDPv2, sincos_2d
from tokenpacker_jax.models.projectors import (
    PROJECTORS,
    ProjectorConfig,
    build_projector,
    num_output_tokens,
)

BATCH, GRID, WIDTH, LEVELS, OUT, EMBED, HEADS = 4, 6, 16, 2, 32, 32, 4


def config_for(name, **overrides):
    values = dict(name=name, scale_factor=1 if name == "mlp2x_gelu" else 2, out_dim=OUT,
                  embed_dim=EMBED, num_heads=HEADS, depth=1)
    return ProjectorConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, GRID * GRID, WIDTH)).astype(np.float32)
    x_multi = rng.normal(size=(BATCH, GRID * GRID, WIDTH * LEVELS)).astype(np.float32)
    return x, x_multi


def random_params(module, *inputs, seed=0):
    """Random parameters from the module's shapes, without compiling its init: kernels
    normal / sqrt(fan_in), LayerNorm scales near 1, everything else small."""
    abstract = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        names = [getattr(entry, "key", None) for entry in path]
        value = rng.normal(size=leaf.shape)
        if names[-1] == "kernel":
            in_axes = 1 if names[-2] in ("q_proj", "k_proj", "v_proj") else leaf.ndim - 1
            value /= math.sqrt(math.prod(leaf.shape[:in_axes]))
        elif names[-1] == "scale":
            value = 1 + 0.2 * value
        else:
            value *= 0.1
        return value.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def built(inputs):
    """name -> (config, module, params, output, (param grads, input grads)): one compile of
    the forward and backward pass per projector, shared by the tests."""
    cache = {}

    def get(name):
        if name not in cache:
            config = config_for(name)
            module = build_projector(config)
            params = random_params(module, *inputs)

            def loss(p, x, x_multi):
                out = module.apply(p, x, x_multi)
                return jnp.mean(out**2), out

            (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
                params, *inputs)
            cache[name] = (config, module, params, out, grads)
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_shape_at_budget_and_finite_gradients(built, name):
    config, _, _, out, (param_grads, input_grads) = built(name)
    assert out.shape == (BATCH, num_output_tokens(config, GRID), OUT)
    assert np.all(np.isfinite(np.asarray(out))) and np.asarray(out).std() > 0.1
    for path, grad in jax.tree_util.tree_leaves_with_path(param_grads):
        grad, where = np.asarray(grad), jax.tree_util.keystr(path)
        assert np.all(np.isfinite(grad)), path
        if name == "tokenpacker" and where == "['params']['clip_attn']['k_proj']['bias']":
            # Adds q . bias to every logit of a softmax: no effect, so no gradient (in the
            # reference too, up to rounding); the region attention does not compute it.
            assert not np.any(grad), where
            continue
        assert np.any(grad != 0), f"{name}: no gradient reaches {where}"
    assert np.all(np.isfinite(np.asarray(input_grads))) and np.any(np.asarray(input_grads))


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_sharded_matches_single_device(built, inputs, mesh8, name):
    _, module, params, expected, _ = built(name)
    with sharding.use_mesh(mesh8):
        abstract = jax.eval_shape(module.init, jax.random.key(1), *inputs)
        shardings = sharding.logical_shardings(abstract, mesh8)
        batch = sharding.batch_sharding(mesh8, 3)
        params_sharded = jax.device_put(params, shardings)
        out = jax.jit(module.apply, in_shardings=(shardings, batch, batch),
                      out_shardings=batch)(params_sharded, *jax.device_put(inputs, batch))
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
    # The parameters really are split: over fsdp and over tensor, shards smaller than arrays.
    leaves = jax.tree.leaves(params_sharded)
    used_axes = {axis for leaf in leaves for entry in leaf.sharding.spec if entry
                 for axis in ((entry,) if isinstance(entry, str) else entry)}
    assert {"fsdp", "tensor"} <= used_axes, used_axes
    biggest = max(leaves, key=lambda leaf: leaf.size)
    assert biggest.addressable_shards[0].data.size * 4 == biggest.size


def test_token_budgets():
    for scale, tokens in TOKENS_PER_SCALE.items():
        for name in ("tokenpacker", "avgpool", "pixel_shuffle", "ldpv2", "c_abstractor",
                     "resampler"):
            assert num_output_tokens(config_for(name, scale_factor=scale), 24) == tokens
    assert num_output_tokens(config_for("mlp2x_gelu"), 24) == 576
    assert num_output_tokens(config_for("resampler", num_queries=49), 24) == 49
    with pytest.raises(ValueError, match="does not divide the 24x24"):
        num_output_tokens(config_for("avgpool", scale_factor=5), 24)
    assert projectors.uses_multi_level(config_for("tokenpacker"))
    assert not projectors.uses_multi_level(config_for("ldpv2"))


def test_resampler_with_explicit_query_count(inputs):
    module = build_projector(config_for("resampler", num_queries=9, scale_factor=3))
    params = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    assert jax.eval_shape(module.apply, params, *inputs).shape == (BATCH, 9, OUT)
    assert params["params"]["query"].value.shape == (9, EMBED)


@pytest.mark.parametrize("values,message", [
    (dict(name="qformer"), "not one of"),
    (dict(name="mlp2x_gelu", scale_factor=2), "scale_factor=1"),
    (dict(name="resampler", num_queries=50), "must be a square"),
    (dict(name="avgpool", num_queries=16), "only used by the resampler"),
    (dict(name="tokenpacker", embed_dim=30, num_heads=4), "not divisible"),
    (dict(name="avgpool", scale_factor=0), ">= 1"),
])
def test_config_errors(values, message):
    with pytest.raises(ValueError, match=message):
        ProjectorConfig(**values)


def test_config_from_dict():
    config = ProjectorConfig.from_dict(dict(name="ldpv2", scale_factor=3, out_dim=64))
    module = build_projector(config)
    assert isinstance(module, LDPv2) and (module.scale_factor, module.out_dim) == (3, 64)
    with pytest.raises(ValueError, match="unknown fields"):
        ProjectorConfig.from_dict(dict(name="ldpv2", scale=3))


def np_gelu(x):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def np_mlp(p, x, prefix="mlp", act=np_gelu):
    h = act(x @ p[f"{prefix}_0"]["kernel"] + p[f"{prefix}_0"]["bias"])
    return h @ p[f"{prefix}_2"]["kernel"] + p[f"{prefix}_2"]["bias"]


def as_numpy(params):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])


def test_avgpool_pixel_shuffle_and_ldpv2_compute_what_they_say(built, inputs):
    x = inputs[0].astype(np.float64)
    s, g = 2, GRID // 2
    image = x.reshape(BATCH, GRID, GRID, WIDTH)

    _, _, params, out, _ = built("avgpool")
    pooled = np.zeros((BATCH, g, g, WIDTH))
    for i in range(g):
        for j in range(g):
            pooled[:, i, j] = image[:, s * i:s * i + s, s * j:s * j + s].mean(axis=(1, 2))
    expected = np_mlp(as_numpy(params), pooled.reshape(BATCH, g * g, WIDTH))
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)

    _, _, params, out, _ = built("pixel_shuffle")
    stacked = np.zeros((BATCH, g, g, s * s * WIDTH))
    for i in range(g):
        for j in range(g):
            parts = [image[:, s * i + ki, s * j + kj] for ki in range(s) for kj in range(s)]
            stacked[:, i, j] = np.concatenate(parts, axis=-1)
    expected = np_mlp(as_numpy(params), stacked.reshape(BATCH, g * g, -1))
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)

    _, _, params, out, _ = built("ldpv2")
    p = as_numpy(params)
    features = np_mlp(p, x).reshape(BATCH, GRID, GRID, OUT)
    pooled = features.reshape(BATCH, g, s, g, s, OUT).mean(axis=(2, 4))
    padded = np.pad(pooled, ((0, 0), (1, 1), (1, 1), (0, 0)))
    kernel = p["peg"]["kernel"]  # [3, 3, 1, C]: one 3x3 filter per channel
    conv = sum(padded[:, dy:dy + g, dx:dx + g] * kernel[dy, dx, 0]
               for dy in range(3) for dx in range(3)) + p["peg"]["bias"]
    expected = (pooled + conv).reshape(BATCH, g * g, OUT)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_sincos_positions():
    pos = sincos_2d(8, 2, 3)  # dim 8: 2 frequencies (1, 1/100) per axis and function
    assert pos.shape == (6, 8)
    row, col = 1, 2
    expected = [np.sin(col), np.sin(col / 100), np.cos(col), np.cos(col / 100),
                np.sin(row), np.sin(row / 100), np.cos(row), np.cos(row / 100)]
    np.testing.assert_allclose(pos[row * 3 + col], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(6, 2, 2)
