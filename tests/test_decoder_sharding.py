"""Decoders on 8 simulated devices (data=2, fsdp=2, tensor=2): weights load straight into
their shards, and the sharded forward pass and KV-cache decoding give single-device results
(up to float32 summation order: 1e-4 on logits of a few units).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from jax.sharding import NamedSharding, PartitionSpec

from tokenpacker_jax import sharding
from tokenpacker_jax.convert import hf
from tokenpacker_jax.models.decoder import Decoder

from test_decoder import VOCAB, hf_config, randomize

BATCH = ("data", "fsdp")


def save_tiny(family, path):
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family),
                                                         attn_implementation="eager")
    randomize(model, seed=7)
    model.save_pretrained(path)
    return path


def spec(array):
    """The array's PartitionSpec with one entry per dimension."""
    entries = tuple(array.sharding.spec)
    return entries + (None,) * (array.ndim - len(entries))


def batch(rows=4, length=10):
    rng = np.random.RandomState(0)
    ids = rng.randint(4, VOCAB, size=(rows, length))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padded
    mask[3, :6] = 0
    return np.where(mask == 1, ids, 0), mask


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    return save_tiny("gemma2", tmp_path_factory.mktemp("gemma2_sharded"))


def test_parameters_load_into_their_shards(gemma2_dir, mesh8):
    module, params = hf.load_decoder(gemma2_dir, mesh=mesh8)
    layer = params["layers"]
    expected = {
        ("embedder", "embedding"): ("tensor", "fsdp"),  # [vocab, embed]
        ("layers", "attn", "q_proj", "kernel"): (None, "fsdp", "tensor", None),
        ("layers", "attn", "k_proj", "kernel"): (None, "fsdp", "tensor", None),
        ("layers", "attn", "v_proj", "kernel"): (None, "fsdp", "tensor", None),
        ("layers", "attn", "o_proj", "kernel"): (None, "tensor", None, "fsdp"),
        ("layers", "mlp", "gate_proj", "kernel"): (None, "fsdp", "tensor"),
        ("layers", "mlp", "up_proj", "kernel"): (None, "fsdp", "tensor"),
        ("layers", "mlp", "down_proj", "kernel"): (None, "tensor", "fsdp"),
        ("layers", "post_mlp_norm", "scale"): (None, None),
        ("final_norm", "scale"): (None,),
    }
    for path, want in expected.items():
        leaf = functools.reduce(lambda tree, key: tree[key], path, params)
        assert spec(leaf) == want, path
        assert leaf.sharding.mesh == mesh8
    # Each device holds 1/8 of the attention kernels (fsdp x tensor, layers whole).
    q = layer["attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.shape == (4, 16, 2, 8)


def test_sharded_forward_and_decoding_match_one_device(gemma2_dir, mesh8):
    ids, mask = batch()
    module, params = hf.load_decoder(gemma2_dir)
    variables = {"params": params}
    forward = jax.jit(module.apply)
    prefill = jax.jit(functools.partial(module.apply, method=Decoder.prefill, max_length=16))
    step = jax.jit(functools.partial(module.apply, method=Decoder.decode_step))
    expected = np.asarray(forward(variables, ids, mask))
    expected_steps = []
    logits, cache = prefill(variables, ids, mask)
    for token in (5, 9, 11, 13):
        expected_steps.append(np.asarray(logits))
        logits, cache = step(variables, jnp.full((4,), token), cache)
    expected_steps.append(np.asarray(logits))

    _, sharded_params = hf.load_decoder(gemma2_dir, mesh=mesh8)
    sharded_vars = {"params": sharded_params}
    data = sharding.batch_sharding(mesh8, 2)
    with sharding.use_mesh(mesh8):
        s_forward = jax.jit(module.apply)
        s_prefill = jax.jit(functools.partial(module.apply, method=Decoder.prefill,
                                              max_length=16))
        s_step = jax.jit(functools.partial(module.apply, method=Decoder.decode_step))
        s_ids, s_mask = jax.device_put(ids, data), jax.device_put(mask, data)
        got = s_forward(sharded_vars, s_ids, s_mask)
        assert spec(got) == (BATCH, None, "tensor")
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)

        logits, cache = s_prefill(sharded_vars, s_ids, s_mask)
        assert spec(cache.keys) == (None, BATCH, None, "tensor", None)
        for i, token in enumerate((5, 9, 11, 13)):
            np.testing.assert_allclose(np.asarray(logits), expected_steps[i], atol=1e-4,
                                       rtol=0, err_msg=f"step {i}")
            logits, cache = s_step(sharded_vars, jnp.full((4,), token), cache)
        np.testing.assert_allclose(np.asarray(logits), expected_steps[-1], atol=1e-4, rtol=0)
        assert spec(cache.keys) == (None, BATCH, None, "tensor", None)
        assert spec(logits) == (BATCH, "tensor")


def test_single_kv_head_stays_whole_under_tensor_parallelism(tmp_path, mesh8):
    """Gemma 2B's one KV head cannot be split over tensor=2: replicated there, and the
    sharded forward still matches."""
    path = save_tiny("gemma", tmp_path)
    ids, mask = batch()
    module, params = hf.load_decoder(path)
    expected = np.asarray(jax.jit(module.apply)({"params": params}, ids, mask))
    _, sharded = hf.load_decoder(path, mesh=mesh8)
    assert spec(sharded["layers"]["attn"]["k_proj"]["kernel"]) == (None, "fsdp", None, None)
    assert spec(sharded["layers"]["attn"]["q_proj"]["kernel"]) == (None, "fsdp", "tensor",
                                                                   None)
    with sharding.use_mesh(mesh8):
        data = NamedSharding(mesh8, PartitionSpec(BATCH, None))
        got = jax.jit(module.apply)({"params": sharded}, jax.device_put(ids, data),
                                    jax.device_put(mask, data))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)
