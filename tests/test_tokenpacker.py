"""TokenPacker against docs/reference.md §3: an independent float64 NumPy formulation,
PyTorch's bilinear resize, initialisation, parameter counts and input validation.

The NumPy reference reads the reference (PyTorch) state dict layout of docs/reference.md
§3.3 and loops over regions explicitly; the module gets the same weights through the converter.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util
from scipy.special import erf

from tokenpacker_jax.convert.reference import projector_params_from_reference
from tokenpacker_jax.models import layers
from tokenpacker_jax.models.tokenpacker import TokenPacker, bilinear_matrix, resize_bilinear

WIDTH, LEVELS, DIM, HEADS, OUT = 16, 3, 32, 4, 24


def random_reference_state(rng, width=WIDTH, levels=LEVELS, dim=DIM, out=OUT):
    """Random weights in the reference layout (PyTorch [out, in]), every tensor non-trivial
    (LayerNorm weights away from 1, biases away from 0) so that no term can hide."""

    def linear(name, fan_out, fan_in, bias=True, sep="."):
        state[f"{name}{sep}weight"] = rng.normal(size=(fan_out, fan_in)) / math.sqrt(fan_in)
        if bias:
            state[f"{name}{sep}bias"] = rng.normal(size=fan_out) * 0.1

    state = {}
    linear("q_proj_1", dim, width, bias=False)
    for part in "kv":
        linear(f"{part}_proj_1.0", dim, width * levels)
        linear(f"{part}_proj_1.2", dim, dim)
    for part in "qkv":
        state[f"ln_{part}_1.weight"] = 1 + rng.normal(size=dim) * 0.2
        state[f"ln_{part}_1.bias"] = rng.normal(size=dim) * 0.2
    linear("clip_attn.in_proj", 3 * dim, dim, sep="_")
    linear("clip_attn.out_proj", dim, dim)
    linear("mlp.0", out, dim)
    linear("mlp.2", out, out)
    return state


def np_gelu(x):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def np_layer_norm(x, weight, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def half_pixel_taps(index, in_size, out_size):
    """(input index, weight) pairs of output ``index`` for a bilinear, align_corners=False
    resize: sample at (index + 0.5) * in / out - 0.5, clamped at 0, edge-clamped neighbour."""
    src = max((index + 0.5) * in_size / out_size - 0.5, 0.0)
    lower = int(math.floor(src))
    upper = min(lower + 1, in_size - 1)
    frac = src - lower
    return [(lower, 1.0 - frac), (upper, frac)]


def numpy_tokenpacker(state, x, x_multi, scale, heads):
    """docs/reference.md §3 in float64 with explicit loops over regions and heads.

    Returns tokens [B, M, out] and attention weights [B, M, heads, s*s] (slot ki*s + kj).
    """
    sd = {k: np.asarray(v, np.float64) for k, v in state.items()}
    x, x_multi = np.asarray(x, np.float64), np.asarray(x_multi, np.float64)
    batch, num_tokens, width = x.shape
    grid = math.isqrt(num_tokens)
    out_grid = grid // scale

    def linear(h, name, bias=True):
        return h @ sd[f"{name}.weight"].T + (sd[f"{name}.bias"] if bias else 0.0)

    keys = np_layer_norm(linear(np_gelu(linear(x_multi, "k_proj_1.0")), "k_proj_1.2"),
                         sd["ln_k_1.weight"], sd["ln_k_1.bias"])
    values = np_layer_norm(linear(np_gelu(linear(x_multi, "v_proj_1.0")), "v_proj_1.2"),
                           sd["ln_v_1.weight"], sd["ln_v_1.bias"])
    image = x.reshape(batch, grid, grid, width)
    points = np.zeros((batch, out_grid, out_grid, width))
    for i in range(out_grid):
        for j in range(out_grid):
            for row, wy in half_pixel_taps(i, grid, out_grid):
                for col, wx in half_pixel_taps(j, grid, out_grid):
                    points[:, i, j] += wy * wx * image[:, row, col]
    query = np_layer_norm(linear(points.reshape(batch, out_grid**2, width), "q_proj_1",
                                 bias=False), sd["ln_q_1.weight"], sd["ln_q_1.bias"])

    dim = query.shape[-1]
    head_dim = dim // heads
    w_q, w_k, w_v = np.split(sd["clip_attn.in_proj_weight"], 3)
    b_q, b_k, b_v = np.split(sd["clip_attn.in_proj_bias"], 3)
    attended = np.zeros((batch, out_grid**2, dim))
    weights = np.zeros((batch, out_grid**2, heads, scale * scale))
    for b in range(batch):
        for i in range(out_grid):
            for j in range(out_grid):
                region = i * out_grid + j
                positions = [(scale * i + ki) * grid + (scale * j + kj)
                             for ki in range(scale) for kj in range(scale)]
                q = query[b, region] @ w_q.T + b_q
                k = keys[b, positions] @ w_k.T + b_k
                v = values[b, positions] @ w_v.T + b_v
                heads_out = []
                for h in range(heads):
                    cols = slice(h * head_dim, (h + 1) * head_dim)
                    logits = k[:, cols] @ q[cols] / math.sqrt(head_dim)
                    p = np.exp(logits - logits.max())
                    p /= p.sum()
                    weights[b, region, h] = p
                    heads_out.append(p @ v[:, cols])
                attended[b, region] = linear(np.concatenate(heads_out), "clip_attn.out_proj")
    tokens = linear(np_gelu(linear(attended, "mlp.0")), "mlp.2")
    return tokens, weights


@pytest.fixture(scope="module")
def run_module():
    """One jitted apply per static configuration, shared by the tests."""
    cache = {}

    def run(state, x, x_multi, scale):
        if scale not in cache:
            module = TokenPacker(scale_factor=scale, out_dim=OUT, embed_dim=DIM,
                                 num_heads=HEADS)
            cache[scale] = jax.jit(
                lambda p, a, b: module.apply({"params": p}, a, b, return_attention=True))
        params = projector_params_from_reference(state, num_heads=HEADS)
        return cache[scale](params, x, x_multi)

    return run


@pytest.mark.parametrize("grid,scale", [(12, 2), (12, 3), (12, 4), (27, 3)])
def test_matches_numpy_formulation(run_module, grid, scale):
    rng = np.random.default_rng(grid * 10 + scale)
    state = random_reference_state(rng)
    x = rng.normal(size=(2, grid * grid, WIDTH)).astype(np.float32)
    x_multi = rng.normal(size=(2, grid * grid, WIDTH * LEVELS)).astype(np.float32)
    tokens, weights = run_module(state, x, x_multi, scale)
    expected_tokens, expected_weights = numpy_tokenpacker(state, x, x_multi, scale, HEADS)
    out_grid = grid // scale
    assert tokens.shape == (2, out_grid**2, OUT)
    assert weights.shape == (2, out_grid**2, HEADS, scale * scale)
    assert np.abs(expected_tokens).max() > 0.5  # the comparison is not between near-zeros
    np.testing.assert_allclose(np.asarray(tokens), expected_tokens, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(weights), expected_weights, atol=1e-5, rtol=0)


def test_attention_slot_order_is_row_major(run_module):
    """A key made to stand out at patch (s*i + ki, s*j + kj) must win slot ki*s + kj."""
    scale, grid = 3, 6
    rng = np.random.default_rng(1)
    state = random_reference_state(rng)
    # Keys: x_multi only feeds K/V; make one patch per region huge along a fixed direction
    # so that every head attends to it almost exclusively (query and key share the sign).
    x = np.ones((1, grid * grid, WIDTH), np.float32)
    x_multi = np.zeros((1, grid * grid, WIDTH * LEVELS), np.float32)
    chosen = {}
    for i in range(2):
        for j in range(2):
            ki, kj = (i + 2 * j) % 3, (2 * i + j) % 3
            chosen[i * 2 + j] = ki * scale + kj
            x_multi[0, (scale * i + ki) * grid + scale * j + kj] = 1.0
    _, expected = numpy_tokenpacker(state, x, x_multi, scale, HEADS)
    _, weights = run_module(state, x, x_multi, scale)
    np.testing.assert_allclose(np.asarray(weights), expected, atol=1e-5)
    # The distinct patch is where the weights differ from the other (identical) slots.
    for region, slot in chosen.items():
        w = np.asarray(weights)[0, region, 0]
        others = np.delete(w, slot)
        assert np.allclose(others, others[0]) and not np.isclose(w[slot], others[0])


@pytest.mark.parametrize("in_size,out_size", [(24, 12), (24, 8), (24, 6), (27, 9), (13, 5),
                                              (10, 7), (5, 9)])
def test_interpolation_matches_torch(in_size, out_size):
    rng = np.random.default_rng(in_size * 100 + out_size)
    x = rng.normal(size=(2, in_size, in_size + 3, 5)).astype(np.float32)
    ours = resize_bilinear(jnp.asarray(x), (out_size, out_size + 1))
    expected = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).double(),
                             size=(out_size, out_size + 1), mode="bilinear",
                             align_corners=False).permute(0, 2, 3, 1).numpy()
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5, rtol=0)


def test_interpolation_special_cases_of_spec():
    x = np.random.default_rng(0).normal(size=(1, 24, 24, 3)).astype(np.float32)
    blocks = lambda s: x.reshape(1, 24 // s, s, 24 // s, s, 3)  # noqa: E731
    np.testing.assert_allclose(np.asarray(resize_bilinear(x, (12, 12))),
                               blocks(2).mean(axis=(2, 4)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(resize_bilinear(x, (8, 8))), x[:, 1::3, 1::3],
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(resize_bilinear(x, (6, 6))),
                               blocks(4)[:, :, 1:3, :, 1:3].mean(axis=(2, 4)), atol=1e-6)
    # Not jax.image.resize's default, which antialiases when shrinking.
    antialiased = jax.image.resize(x, (1, 8, 8, 3), "bilinear")
    assert np.abs(np.asarray(antialiased) - x[:, 1::3, 1::3]).max() > 0.1
    assert np.allclose(bilinear_matrix(24, 7).sum(axis=1), 1.0)


def test_bfloat16_inputs_interpolate_in_float32():
    module = TokenPacker(scale_factor=2, out_dim=8, embed_dim=8, num_heads=2,
                         dtype="bfloat16")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 16, 4)), jnp.bfloat16)
    x_multi = jnp.concatenate([x, x], axis=-1)
    params = jax.eval_shape(module.init, jax.random.key(0), x, x_multi)
    assert jax.eval_shape(module.apply, params, x, x_multi).dtype == jnp.bfloat16
    # The query path: bf16 in, float32 mean, back to bf16 -- equals the bf16-rounded mean.
    means = x.astype(jnp.float32).reshape(1, 2, 2, 2, 2, 4).mean(axis=(2, 4))
    points = resize_bilinear(x.reshape(1, 4, 4, 4), (2, 2)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(points, np.float32),
                                  np.asarray(means.astype(jnp.bfloat16), np.float32))


def abstract_params(out_dim, grid=24, width=1024, levels=4):
    module = TokenPacker(scale_factor=2, out_dim=out_dim)
    struct = jax.ShapeDtypeStruct
    return jax.eval_shape(module.init, jax.random.key(0),
                          struct((1, grid * grid, width), jnp.float32),
                          struct((1, grid * grid, width * levels), jnp.float32))["params"]


def test_parameter_counts_of_the_paper():
    assert layers.count_params(abstract_params(4096)) == 36_722_688
    assert layers.count_params(abstract_params(5120)) == 47_210_496


def test_every_parameter_has_logical_axes():
    flat = traverse_util.flatten_dict(abstract_params(4096), is_leaf=lambda k, v: isinstance(
        v, nn.LogicallyPartitioned))
    for path, boxed in flat.items():
        assert isinstance(boxed, nn.LogicallyPartitioned), path
        assert len(boxed.names) == len(boxed.value.shape), path
    names = {path: boxed.names for path, boxed in flat.items()}
    assert names[("clip_attn", "q_proj", "kernel")] == ("embed", "heads", "head_dim")
    assert names[("clip_attn", "out_proj", "kernel")] == ("heads", "head_dim", "embed")
    assert names[("mlp_0", "kernel")] == ("embed", "mlp")


def test_initialisation_follows_spec():
    module = TokenPacker(scale_factor=2, out_dim=128, embed_dim=128, num_heads=8)
    x = jnp.zeros((1, 16, 128))
    params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), x, jnp.zeros((1, 16, 256))))
    flat = traverse_util.flatten_dict(params["params"])
    for path, value in flat.items():
        value = np.asarray(value)
        if path[-1] == "bias":
            assert not value.any(), path
        elif path[0].startswith("ln_"):
            assert np.all(value == 1.0), path
        elif path[1:] in (("q_proj", "kernel"), ("k_proj", "kernel"), ("v_proj", "kernel")):
            # xavier-uniform of the packed [3D, D] in_proj_weight: bound sqrt(6 / 4D)
            bound = math.sqrt(6 / (4 * 128))
            assert np.abs(value).max() <= bound and np.abs(value).max() > 0.95 * bound, path
            assert abs(value.std() - bound / math.sqrt(3)) < 0.05 * bound, path
        else:  # every Linear, out_proj included: trunc normal std 0.02
            assert abs(value.std() - 0.02) < 0.002, path
            assert np.abs(value).max() <= 2.0, path


def test_layer_norm_eps_is_1e_6(run_module):
    """Inputs to every LayerNorm with variance ~1e-6, where eps 1e-6 and PyTorch's default
    1e-5 give clearly different outputs."""
    rng = np.random.default_rng(7)
    state = random_reference_state(rng)
    for name in ("q_proj_1.weight", "k_proj_1.2.weight", "k_proj_1.2.bias",
                 "v_proj_1.2.weight", "v_proj_1.2.bias"):
        state[name] = state[name] * 1e-3
    x = rng.normal(size=(2, 144, WIDTH)).astype(np.float32)
    x_multi = rng.normal(size=(2, 144, WIDTH * LEVELS)).astype(np.float32)
    tokens, _ = run_module(state, x, x_multi, 2)
    expected, _ = numpy_tokenpacker(state, x, x_multi, 2, HEADS)
    np.testing.assert_allclose(np.asarray(tokens), expected, atol=1e-4, rtol=1e-5)


def test_invalid_inputs_are_clear_errors():
    module = TokenPacker(scale_factor=5, out_dim=8, embed_dim=8, num_heads=2)
    x = jnp.zeros((1, 144, 4))
    with pytest.raises(ValueError, match=r"scale_factor 5 does not divide the 12x12"):
        module.init(jax.random.key(0), x, jnp.zeros((1, 144, 8)))
    with pytest.raises(ValueError, match="not a square"):
        TokenPacker(out_dim=8, embed_dim=8, num_heads=2).init(
            jax.random.key(0), jnp.zeros((1, 577, 4)), jnp.zeros((1, 577, 8)))
    with pytest.raises(ValueError, match="x_multi"):
        TokenPacker(out_dim=8, embed_dim=8, num_heads=2).init(
            jax.random.key(0), x, jnp.zeros((1, 144, 6)))
