"""The splash kernel (Pallas, interpret mode on the CPU) masks packed rows as the XLA path
does: forward and gradients, grouped heads, soft-capping, Gemma's sliding window, on one
device and under shard_map on 8 (data=2, fsdp=2, tensor=2); and the kernel each platform
gets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tokenpacker_jax import sharding
from tokenpacker_jax.models import splash
from tokenpacker_jax.models.attention import attend, attention_kernel, segment_mask
from tokenpacker_jax.models.decoder_config import DecoderConfig

LENGTH, HEADS, KV_HEADS, HEAD_DIM, WINDOW, SOFTCAP, SCALE = 128, 4, 2, 8, 9, 3.0, 0.4


def packed_rows(batch, seed=0):
    """q, k, v and segment ids of ``batch`` rows: 2-4 samples of random lengths per row,
    then padding (segment 0)."""
    rng = np.random.default_rng(seed)
    segments = np.zeros((batch, LENGTH), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(5, LENGTH - 5), rng.integers(2, 5), replace=False))
        for segment, (start, end) in enumerate(zip((0, *cuts[:-1]), cuts, strict=True), 1):
            segments[row, start:end] = segment
    q = rng.standard_normal((batch, LENGTH, HEADS, HEAD_DIM), np.float32)
    k, v = rng.standard_normal((2, batch, LENGTH, KV_HEADS, HEAD_DIM), np.float32)
    weights = rng.standard_normal((batch, LENGTH, HEADS, HEAD_DIM), np.float32)
    return q, k, v, segments, weights


def xla(q, k, v, segments, is_sliding):
    mask = jnp.where(is_sliding, segment_mask(segments, WINDOW), segment_mask(segments))
    return attend(q, k, v, mask, scale=SCALE, softcap=SOFTCAP)


def kernel(q, k, v, segments, is_sliding):
    return splash.splash_attention(q, k, v, segments, scale=SCALE, softcap=SOFTCAP,
                                   sliding_window=WINDOW, is_sliding=is_sliding)


def value_and_grads(attention, weights):
    """(out, d(sum(out * weights))/d(q, k, v)) for the global and the sliding layer."""

    def run(q, k, v, segments):
        results = []
        for is_sliding in (jnp.asarray(False), jnp.asarray(True)):
            def loss(q, k, v, is_sliding=is_sliding):
                out = attention(q, k, v, segments, is_sliding)
                return jnp.sum(out * weights), out

            grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
            results.append((out, grads))
        return results

    return run


def assert_same(got, expected):
    for (out, grads), (out_ref, grads_ref) in zip(got, expected, strict=True):
        # Every slot, padding included: both paths let padding attend to padding.
        np.testing.assert_allclose(np.asarray(out), np.asarray(out_ref), atol=1e-5, rtol=0)
        for grad, grad_ref in zip(grads, grads_ref, strict=True):
            scale = float(np.abs(np.asarray(grad_ref)).max())
            np.testing.assert_allclose(np.asarray(grad), np.asarray(grad_ref),
                                       atol=1e-5 * max(scale, 1.0), rtol=0)


@pytest.fixture(scope="module")
def reference():
    """The XLA path on rows for 4 devices' worth of batch, on one device."""
    q, k, v, segments, weights = packed_rows(4)
    expected = jax.jit(value_and_grads(xla, weights))(q, k, v, segments)
    return (q, k, v, segments, weights), expected


def test_splash_masks_as_xla_forward_and_gradients(reference):
    (q, k, v, segments, weights), expected = reference
    rows = slice(0, 2)
    got = jax.jit(value_and_grads(kernel, weights[rows]))(q[rows], k[rows], v[rows],
                                                          segments[rows])
    assert_same(got, [(out[rows], tuple(g[rows] for g in grads)) for out, grads in expected])
    # The sliding window changes something (the rows' samples are longer than it).
    assert np.abs(np.asarray(expected[0][0]) - np.asarray(expected[1][0])).max() > 1e-2


def test_splash_under_shard_map_on_8_devices(reference, mesh8):
    """Rows over data x fsdp, heads (query and key/value alike) over tensor."""
    (q, k, v, segments, weights), expected = reference
    head_sharded = NamedSharding(mesh8, PartitionSpec(("data", "fsdp"), None, "tensor"))
    rows = NamedSharding(mesh8, PartitionSpec(("data", "fsdp")))
    with sharding.use_mesh(mesh8):
        run = jax.jit(value_and_grads(kernel, weights),
                      in_shardings=(head_sharded, head_sharded, head_sharded, rows))
        got = run(q, k, v, segments)
        lowered = run.lower(q, k, v, segments).as_text()
    assert "shard_map" in lowered or "sdy.manual_computation" in lowered
    assert got[0][0].sharding.shard_shape(got[0][0].shape) == (1, LENGTH, HEADS // 2, HEAD_DIM)
    assert_same(got, expected)


def test_kernel_per_platform():
    """Splash for TPU computations (also when compiled here for a TPU topology), cuDNN for
    16-bit GPU ones without soft-capping, XLA otherwise; a configured kernel wins."""
    llama = DecoderConfig(num_layers=1, dtype="bfloat16")
    gemma2 = dataclasses.replace(llama, attn_logit_softcap=50.0)

    def on(platform, config, length=2048):
        device = jax.sharding.AbstractDevice(device_kind="x", num_cores=1, platform=platform)
        mesh = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=device)
        with jax.sharding.use_abstract_mesh(mesh):
            return attention_kernel(config, length)

    assert on("tpu", llama) == "splash" and on("tpu", gemma2) == "splash"
    assert on("tpu", llama, length=88) == "xla"  # not a multiple of the kernel's blocks
    assert on("gpu", llama) == "cudnn" and on("gpu", gemma2) == "xla"
    assert on("gpu", dataclasses.replace(llama, dtype="float32")) == "xla"
    assert on("cpu", llama) == "xla"
    assert on("cpu", dataclasses.replace(llama, attention_impl="splash")) == "splash"
    with pytest.raises(ValueError, match="multiple of 128"):
        splash.splash_attention(*(jnp.zeros((1, 88, 2, 8)),) * 3, jnp.ones((1, 88)),
                                scale=1.0)
