"""The projector in the reference PyTorch layout: a PyTorch TokenPacker written from
docs/reference.md §3 (``bench/torch_tokenpacker.py``: torch's own nn.MultiheadAttention and
F.interpolate) loaded with our exported weights, export -> import round trips, the key/shape
table of docs/reference.md §3.3, and the file formats."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from tokenpacker_jax.bench.torch_tokenpacker import TorchTokenPacker
from tokenpacker_jax.convert import reference
from tokenpacker_jax.models.baselines import MLP2xGelu
from tokenpacker_jax.models.tokenpacker import TokenPacker

WIDTH, LEVELS, DIM, HEADS, OUT, GRID, SCALE = 16, 4, 32, 4, 40, 8, 2


def random_params(module, *inputs, seed=0):
    """Module params with every leaf random (LayerNorm scales and biases included), kernels
    scaled by 1/sqrt(fan_in) so activations stay O(1)."""
    abstract = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract)["params"])
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in flat.items():
        value = rng.normal(size=leaf.shape)
        if path[-1] == "kernel":
            fan_in = math.prod(leaf.shape[:2]) if path[-2] == "out_proj" else leaf.shape[0]
            value /= math.sqrt(fan_in)
        elif path[-1] == "scale":
            value = 1 + 0.2 * value
        else:
            value *= 0.1
        out[path] = value.astype(np.float32)
    return traverse_util.unflatten_dict(out)


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, GRID * GRID, WIDTH)).astype(np.float32)
    x_multi = rng.normal(size=(2, GRID * GRID, WIDTH * LEVELS)).astype(np.float32)
    module = TokenPacker(scale_factor=SCALE, out_dim=OUT, embed_dim=DIM, num_heads=HEADS)
    params = random_params(module, x, x_multi)
    return module, params, x, x_multi


def test_pytorch_projector_with_exported_weights_matches(tiny):
    module, params, x, x_multi = tiny
    tokens, weights = jax.jit(lambda p, a, b: module.apply(
        {"params": p}, a, b, return_attention=True))(params, x, x_multi)

    exported = reference.projector_params_to_reference(params)
    state = {k.removeprefix(reference.PREFIX): torch.tensor(v) for k, v in exported.items()}
    torch_module = TorchTokenPacker(WIDTH, LEVELS, DIM, HEADS, OUT, SCALE).double().eval()
    torch_module.load_state_dict({k: v.double() for k, v in state.items()}, strict=True)
    with torch.no_grad():
        expected, expected_weights = torch_module(torch.from_numpy(x).double(),
                                                  torch.from_numpy(x_multi).double())
    assert np.abs(expected.numpy()).max() > 0.5
    np.testing.assert_allclose(np.asarray(tokens), expected.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(weights), expected_weights.numpy(), atol=1e-5, rtol=0)


def test_export_import_is_bit_exact(tiny):
    _, params, _, _ = tiny
    exported = reference.projector_params_to_reference(params)
    assert all(k.startswith("model.mm_projector.") for k in exported)
    back = reference.projector_params_from_reference(exported, num_heads=HEADS)
    flat, flat_back = traverse_util.flatten_dict(params), traverse_util.flatten_dict(back)
    assert set(flat) == set(flat_back)
    for path in flat:
        assert flat_back[path].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(flat_back[path]), flat[path], err_msg=str(path))
    # Without the prefix, as torch tensors, beside an LLM key: the same parameters.
    unprefixed = {k.removeprefix(reference.PREFIX): torch.from_numpy(v)
                  for k, v in exported.items()}
    again = reference.projector_params_from_reference(unprefixed, num_heads=HEADS)
    full = {**exported, "model.layers.0.mlp.up_proj.weight": np.zeros((2, 2))}
    once_more = reference.projector_params_from_reference(full, num_heads=HEADS)
    for tree in (again, once_more):
        for path, value in traverse_util.flatten_dict(tree).items():
            np.testing.assert_array_equal(np.asarray(value), flat[path])


def test_in_proj_packs_q_k_v_in_that_order(tiny):
    _, params, _, _ = tiny
    exported = reference.projector_params_to_reference(params)
    packed = exported["model.mm_projector.clip_attn.in_proj_weight"]
    for index, part in enumerate(("q_proj", "k_proj", "v_proj")):
        kernel = params["clip_attn"][part]["kernel"]  # [D, heads, head_dim]
        np.testing.assert_array_equal(packed[index * DIM:(index + 1) * DIM],
                                      kernel.reshape(DIM, DIM).T)
        np.testing.assert_array_equal(
            exported["model.mm_projector.clip_attn.in_proj_bias"][index * DIM:(index + 1) * DIM],
            params["clip_attn"][part]["bias"].reshape(-1))


def spec_table(hidden):
    """The state dict of docs/reference.md §3.3: key -> shape, for LLM width ``hidden``."""
    table = {"q_proj_1.weight": (1024, 1024)}
    for part in ("k", "v"):
        table.update({f"{part}_proj_1.0.weight": (1024, 4096), f"{part}_proj_1.0.bias": (1024,),
                      f"{part}_proj_1.2.weight": (1024, 1024), f"{part}_proj_1.2.bias": (1024,)})
    for part in ("q", "k", "v"):
        table.update({f"ln_{part}_1.weight": (1024,), f"ln_{part}_1.bias": (1024,)})
    table.update({"clip_attn.in_proj_weight": (3072, 1024), "clip_attn.in_proj_bias": (3072,),
                  "clip_attn.out_proj.weight": (1024, 1024), "clip_attn.out_proj.bias": (1024,),
                  "mlp.0.weight": (hidden, 1024), "mlp.0.bias": (hidden,),
                  "mlp.2.weight": (hidden, hidden), "mlp.2.bias": (hidden,)})
    return {reference.PREFIX + k: v for k, v in table.items()}


def test_export_at_paper_size_has_exactly_the_spec_keys_and_shapes():
    struct = jax.ShapeDtypeStruct
    abstract = jax.eval_shape(TokenPacker(scale_factor=2, out_dim=4096).init,
                              jax.random.key(0), struct((1, 576, 1024), jnp.float32),
                              struct((1, 576, 4096), jnp.float32))
    # Zero-stride stand-ins: the real shapes without allocating the parameters.
    params = jax.tree.map(lambda a: np.broadcast_to(np.zeros((), np.float32), a.shape),
                          nn.meta.unbox(abstract)["params"])
    exported = reference.projector_params_to_reference(params)
    assert {k: v.shape for k, v in exported.items()} == spec_table(4096)
    assert sum(v.size for v in exported.values()) == 36_722_688


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_files_round_trip(tiny, tmp_path, suffix):
    _, params, _, _ = tiny
    path = tmp_path / f"mm_projector{suffix}"
    reference.save_reference_projector(params, path)
    if suffix == ".bin":
        state = torch.load(path, weights_only=True)
        assert set(state) == set(reference.projector_params_to_reference(params))
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    back = reference.load_reference_projector(path, num_heads=HEADS)
    for path_, value in traverse_util.flatten_dict(back).items():
        np.testing.assert_array_equal(np.asarray(value), traverse_util.flatten_dict(params)[path_])


def test_bfloat16_export_to_bin(tiny, tmp_path):
    _, params, _, _ = tiny
    path = tmp_path / "mm_projector.bin"
    reference.save_reference_projector(params, path, dtype=jnp.bfloat16)
    state = torch.load(path, weights_only=True)
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    back = reference.load_reference_projector(path, num_heads=HEADS)
    kernel = back["mlp_0"]["kernel"]
    expected = np.asarray(jnp.asarray(params["mlp_0"]["kernel"], jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(np.asarray(kernel), expected)


def test_llava_mlp2x_gelu_layout_round_trips():
    module = MLP2xGelu(out_dim=24)
    x = np.random.default_rng(0).normal(size=(1, 16, 8)).astype(np.float32)
    params = random_params(module, x, x)
    exported = reference.projector_params_to_reference(params, name="mlp2x_gelu")
    assert {k: v.shape for k, v in exported.items()} == {
        "model.mm_projector.0.weight": (24, 8), "model.mm_projector.0.bias": (24,),
        "model.mm_projector.2.weight": (24, 24), "model.mm_projector.2.bias": (24,)}
    back = reference.projector_params_from_reference(exported)
    linear = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.GELU(), torch.nn.Linear(24, 24))
    linear.load_state_dict({k.removeprefix(reference.PREFIX): torch.from_numpy(v)
                            for k, v in exported.items()})
    with torch.no_grad():
        expected = linear(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(jax.jit(module.apply)({"params": back}, x, x)), expected,
                               atol=1e-5)


def test_mismatched_checkpoints_are_clear_errors(tiny):
    _, params, _, _ = tiny
    exported = reference.projector_params_to_reference(params)
    broken = dict(exported)
    del broken["model.mm_projector.mlp.2.bias"]
    with pytest.raises(ValueError, match=r"missing \['mlp.2.bias'\]"):
        reference.projector_params_from_reference(broken, num_heads=HEADS)
    with pytest.raises(ValueError, match="not divisible by num_heads 5"):
        reference.projector_params_from_reference(exported, num_heads=5)
    with pytest.raises(ValueError, match="no reference layout"):
        reference.projector_params_to_reference(params, name="resampler")
