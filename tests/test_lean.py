"""The lean full fine-tune's pieces: the chunked loss (same value and gradients as the loss
over all logits at once), attention in query pieces (the same against one piece), bfloat16
Adam first moments, and the remat policies (same values and gradients whatever the backward
keeps). The step's options (bfloat16 microbatch gradients) are in tests/test_train_step.py."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tokenpacker_jax.models import attention, layers, mllm
from tokenpacker_jax.models.decoder import Decoder, DecoderConfig
from tokenpacker_jax.optim import make_optimizer

CONFIG = DecoderConfig(vocab_size=96, width=32, mlp_dim=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, remat_policy="full")
BATCH, LENGTH = 3, 13


@pytest.fixture(scope="module")
def decoder():
    module = Decoder(CONFIG)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CONFIG.vocab_size, (BATCH, LENGTH)).astype(np.int32)
    params = nn.meta.unbox(module.init(jax.random.key(0), ids)["params"])
    # Kernels large enough that the logits spread over several units.
    params = jax.tree.map(lambda p: p * 8 if p.ndim >= 2 else p, params)
    targets = np.roll(ids, -1, axis=1)
    mask = (rng.random((BATCH, LENGTH)) > 0.3).astype(np.float32)
    return module, params, ids, targets, mask


def mean_loss(module, ids, targets, mask, chunk, params):
    if chunk:
        hidden = module.apply({"params": params}, ids, method=Decoder.hidden_states)

        def head(h):
            return module.apply({"params": params}, h, method=Decoder.logits)

        total, correct, count = mllm.chunked_token_loss_sums(head, hidden, targets, mask, chunk)
    else:
        logits = module.apply({"params": params}, ids)
        total, correct, count = mllm.token_loss_sums(logits, targets, mask)
    return total / count, (correct, count)


@pytest.mark.parametrize("chunk", [4, 5, LENGTH, 32])
def test_chunked_loss_equals_the_plain_loss_and_gradients(decoder, chunk):
    """Chunks of 4 and 5 leave a padded last piece; 13 is one piece; 32 pads the whole."""
    module, params, ids, targets, mask = decoder
    grad = jax.jit(jax.value_and_grad(mean_loss, argnums=5, has_aux=True), static_argnums=(0, 4))
    (plain, (correct, count)), plain_grads = grad(module, ids, targets, mask, 0, params)
    (chunked, (c_correct, c_count)), chunked_grads = grad(module, ids, targets, mask, chunk,
                                                          params)
    assert float(plain) > 1.0 and float(count) == mask.sum()
    np.testing.assert_allclose(float(chunked), float(plain), atol=1e-6, rtol=0)
    assert (float(c_correct), float(c_count)) == (float(correct), float(count))
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain_grads))
    assert scale > 1e-3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                 chunked_grads, plain_grads)


def test_chunked_loss_never_holds_all_logits(decoder):
    """In the compiled gradient, no buffer as large as the [B, T, vocab] float32 logits."""
    module, params, ids, targets, mask = decoder
    long_ids = np.tile(ids, (1, 8))  # T = 104: the whole logits are 8x a chunk's
    long_targets, long_mask = np.tile(targets, (1, 8)), np.tile(mask, (1, 8))

    def compiled(chunk):
        fn = jax.jit(jax.grad(lambda p: mean_loss(module, long_ids, long_targets, long_mask,
                                                  chunk, p)[0]))
        return fn.lower(params).compile().as_text()

    whole = f"f32[{BATCH},{long_ids.shape[1]},{CONFIG.vocab_size}]"
    assert whole in compiled(0)
    assert whole not in compiled(13)


def test_bfloat16_first_moments():
    optim = ml_collections.ConfigDict(dict(
        lr=1e-3, group_lr={}, schedule="constant", warmup_ratio=0.0, weight_decay=0.0,
        b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0, mu_dtype="bfloat16"))
    params = {"decoder": {"kernel": jnp.ones((4, 4)), "scale": jnp.ones((4,))}}
    tx, _ = make_optimizer(optim, params, total_steps=10)
    state = tx.init(params)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    dtypes = {jax.tree_util.keystr(path): leaf.dtype for path, leaf in leaves
              if getattr(leaf, "ndim", 0) >= 1}
    assert any(".mu" in k for k in dtypes) and any(".nu" in k for k in dtypes)
    assert all(d == jnp.bfloat16 for k, d in dtypes.items() if ".mu" in k)
    assert all(d == jnp.float32 for k, d in dtypes.items() if ".nu" in k)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("policy", ["dots", "save_attention"])
def test_remat_policies_give_the_same_gradients(decoder, policy):
    """Each policy against full remat, up to float32 rounding (recomputation may fuse
    differently). offload_attention needs a TPU's or GPU's host memory space."""
    module, params, ids, targets, mask = decoder
    other = Decoder(dataclasses.replace(CONFIG, remat_policy=policy))

    def grads(m):
        return jax.jit(jax.grad(lambda p: mean_loss(m, ids, targets, mask, 0, p)[0]))(params)

    expected = grads(module)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-4),
                 grads(other), expected)
    assert layers.remat_policy(policy) is layers.REMAT_POLICIES[policy]


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_attention_in_chunks_equals_attention(softcap):
    """Query pieces of 5 over 13 positions (a padded last piece), causal and padded keys,
    with and without soft-capping: the same output and gradients as one piece."""
    rng = np.random.default_rng(3)
    query = jnp.asarray(rng.normal(size=(2, 13, 4, 8)), jnp.float32)
    key, value = (jnp.asarray(rng.normal(size=(2, 13, 2, 8)), jnp.float32) for _ in range(2))
    positions = jnp.broadcast_to(jnp.arange(13), (2, 13))
    key_positions = positions.at[1, :3].set(-1)
    mask = attention.attention_mask(jnp.arange(13), positions, jnp.arange(13), key_positions)

    def loss(fn, q, k, v):
        out = fn(q, k, v, mask, scale=0.3, softcap=softcap)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    chunked = functools.partial(attention.attend_in_chunks, chunk=5)
    value_a, grads_a = jax.value_and_grad(functools.partial(loss, chunked), (0, 1, 2))(
        query, key, value)
    value_b, grads_b = jax.value_and_grad(functools.partial(loss, attention.attend), (0, 1, 2))(
        query, key, value)
    np.testing.assert_allclose(value_a, value_b, rtol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
