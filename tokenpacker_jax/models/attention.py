"""Decoder self-attention: rotary positions, masks, and the attention kernel.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads
(N % K == 0: K == N multi-head, 1 < K < N grouped-query, K == 1 multi-query), H head dim.

Masks are built from two kinds of coordinates per token:

- its *slot*: index along the sequence (or the KV cache). Causality is on slots: a query
  sees keys in slots <= its own, as Hugging Face does.
- its *position*: the RoPE position id; -1 marks a slot that holds no token (padding, or a
  cache slot not yet written). Sliding windows and the bidirectional prefix are measured in
  positions, so they do not depend on which side the batch is padded.

Packed rows (training) carry a *segment id* per slot instead: several samples share a row,
each with its own id and positions that restart at 0, and 0 marks padding. There a query sees
the keys of its own segment at slots <= its own (and within the window), which every kernel
computes alike: ``segment_mask`` written out for XLA and cuDNN, the splash kernel on TPU
(``tokenpacker_jax.models.splash``). ``attention_kernel`` picks one per platform.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from tokenpacker_jax.models import layers, splash
from tokenpacker_jax.models.decoder_config import DecoderConfig
from tokenpacker_jax.models.kv_cache import heads_as_rows, rows_as_heads
from tokenpacker_jax.models.rms_norm import RMSNorm

HEADS_ACT = ("activation_batch", "activation_length", "activation_heads", None)
KV_HEADS_ACT = ("activation_batch", "activation_length", "activation_kv_heads", None)
CACHE_AXES = ("layers", *KV_HEADS_ACT)
# A per-layer cache array [B*K, S, H] (``KVCache.per_layer``).
PER_LAYER_CACHE_AXES = ("activation_batch", "activation_length", None)


def rope_inverse_frequencies(config: DecoderConfig, local: bool = False) -> np.ndarray:
    """Inverse frequencies [H/2] (float32), with the configured scaling (HF's formulas).

    ``local``: those of the sliding-window layers when they have their own base (Gemma 3:
    ``rope_local_theta``, never scaled).
    """
    dim = config.head_dim
    theta = config.rope_local_theta if local else config.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / np.power(np.float32(theta), exponents)).astype(np.float32)
    if local:
        return inv_freq
    if config.rope_type == "linear":
        inv_freq = inv_freq / np.float32(config.rope_factor)
    elif config.rope_type == "llama3":
        # Llama 3.1: long wavelengths slowed down by `factor`, short ones kept, a smooth ramp
        # between the two cut-offs.
        factor = config.rope_factor
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        old_context = config.rope_original_max_position
        low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_tables(config: DecoderConfig, positions: jax.Array,
                local: bool = False) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, H] (float32) for integer positions [B, T]."""
    inv_freq = jnp.asarray(rope_inverse_frequencies(config, local))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, heads, H] by the angles of cos/sin [B, T, H] (rotate-half layout)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention_mask(q_slots: jax.Array, q_positions: jax.Array, k_slots: jax.Array,
                   k_positions: jax.Array, *, sliding_window: int | None = None,
                   prefix_length: jax.Array | None = None) -> jax.Array:
    """Boolean mask [B, 1, T, S]: True where query t may attend key s.

    Args:
      q_slots: [T] slots of the queries; k_slots: [S] slots of the keys.
      q_positions: [B, T] positions of the queries.
      k_positions: [B, S] positions of the keys, -1 where the slot holds no token.
      sliding_window: if set, only keys with q_pos - k_pos < sliding_window.
      prefix_length: optional [B]: the tokens with positions < prefix_length[b] (e.g. an
        image and a system prompt) attend to each other in both directions.
    """
    valid = (k_positions >= 0)[:, None, :]
    allowed = (k_slots[None, :] <= q_slots[:, None])[None]
    if prefix_length is not None:
        prefix = prefix_length[:, None, None]
        allowed = allowed | ((q_positions[:, :, None] < prefix)
                             & (k_positions[:, None, :] < prefix))
    mask = valid & allowed
    if sliding_window is not None:
        mask = mask & (q_positions[:, :, None] - k_positions[:, None, :] < sliding_window)
    return mask[:, None]


def segment_mask(segment_ids: jax.Array, sliding_window: int | None = None) -> jax.Array:
    """Boolean mask [B, 1, T, T] of packed rows: True where query t may attend key s.

    A query sees the keys of its own segment (``segment_ids`` [B, T]; padding, id 0, is a
    segment of its own) at slots <= its own, and with ``sliding_window`` only keys less
    than that many slots back. Inside a segment slots and positions advance together, so
    the window is the one ``attention_mask`` measures in positions.
    """
    slots = jnp.arange(segment_ids.shape[1])
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (slots[None, :]
                                                                   <= slots[:, None])[None]
    if sliding_window is not None:
        mask = mask & (slots[:, None] - slots[None, :] < sliding_window)[None]
    return mask[:, None]


# Kernels of the packed rows' attention (``DecoderConfig.attention_impl``; None: by platform).
KERNELS = ("xla", "cudnn", "splash")


def attention_kernel(config: DecoderConfig, length: int) -> str:
    """The kernel for packed rows of ``length`` positions: the configured one, or by the
    platform the computation is for (the current mesh's devices, else the default backend):
    splash on TPU when the rows tile into its blocks, cuDNN on NVIDIA GPUs for 16-bit
    compute without soft-capping, XLA otherwise."""
    if config.attention_impl is not None:
        return config.attention_impl
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    platform = device.platform if device is not None else jax.default_backend()
    if platform == "tpu" and splash.supports(length):
        return "splash"
    if (platform in ("gpu", "cuda") and config.attn_logit_softcap is None
            and jnp.dtype(config.dtype) in (jnp.bfloat16, jnp.float16)
            and config.head_dim <= 128 and config.head_dim % 8 == 0):
        return "cudnn"
    return "xla"


def attend(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array, *,
           scale: float, softcap: float | None = None, implementation: str | None = None,
           causal: bool = False) -> jax.Array:
    """Softmax attention: query [B, T, N, H], key/value [B, S, K, H], mask [B, 1, T, S].

    Without soft-capping this is ``jax.nn.dot_product_attention`` (XLA anywhere, cuDNN flash
    attention on NVIDIA GPUs; ``causal``: the mask is causal as well, which lets cuDNN skip
    the blocks above the diagonal). Gemma 2 caps the logits as cap * tanh(logits / cap)
    before the mask, which that function cannot express, so that case is written out here
    (XLA only). Returns [B, T, N, H] in the query's dtype.
    """
    if softcap is None:
        return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale,
                                            is_causal=causal, implementation=implementation)
    batch, length, num_heads, head_dim = query.shape
    num_kv = key.shape[2]
    grouped = query.reshape(batch, length, num_kv, num_heads // num_kv, head_dim)
    logits = jnp.einsum("btkgh,bskh->bkgts", grouped, key,
                        preferred_element_type=jnp.float32) * scale
    logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", weights, value)
    return out.reshape(batch, length, num_heads, head_dim)


def attend_in_chunks(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array,
                     *, chunk: int, **kwargs) -> jax.Array:
    """``attend`` ``chunk`` queries at a time: the same values, with the logits of one piece
    [B, heads, chunk, S] alive at a time (each piece is recomputed in the backward pass,
    ``jax.checkpoint``) instead of [B, heads, T, S]. Shapes as ``attend``."""
    batch, length = query.shape[:2]
    if length <= chunk:
        return attend(query, key, value, mask, **kwargs)
    pieces = -(-length // chunk)
    pad = pieces * chunk - length
    q = jnp.pad(query, [(0, 0), (0, pad), (0, 0), (0, 0)])
    m = jnp.pad(jnp.broadcast_to(mask, (batch, 1, length, mask.shape[-1])),
                [(0, 0), (0, 0), (0, pad), (0, 0)])
    q = jnp.moveaxis(q.reshape(batch, pieces, chunk, *q.shape[2:]), 1, 0)
    m = jnp.moveaxis(m.reshape(batch, 1, pieces, chunk, m.shape[-1]), 2, 0)

    @jax.checkpoint
    def one(piece):
        q_piece, m_piece = piece
        return attend(q_piece, key, value, m_piece, **kwargs)

    out = jax.lax.map(one, (q, m))  # [pieces, B, chunk, N, H]
    out = jnp.moveaxis(out, 0, 1).reshape(batch, pieces * chunk, *out.shape[3:])
    return out[:, :length]


def attend_one_token(query: jax.Array, key_cache: jax.Array, value_cache: jax.Array,
                     mask: jax.Array, *, scale: float,
                     softcap: float | None = None) -> jax.Array:
    """``attend`` for one new token per row over per-layer caches, in their layout: query
    [B, 1, N, H], key_cache / value_cache [B*K, S, H], mask [B, 1, 1, S] -> [B, 1, N, H].

    Both products are batched matmuls over the B*K axis with the cache as it lies
    ([S, H] . [H, G] and [G, S] . [S, H]), so XLA:CPU reads each cache once and copies
    neither (see ``KVCache.per_layer``).
    """
    batch, length, num_heads, head_dim = query.shape
    if length != 1:
        raise ValueError(f"attend_one_token: one query per row, got {length}")
    rows, max_length, _ = key_cache.shape
    num_kv = rows // batch
    grouped = query.reshape(rows, num_heads // num_kv, head_dim)  # [B*K, G, H]
    logits = jnp.einsum("nsh,ngh->ngs", key_cache, grouped.astype(key_cache.dtype),
                        preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    row_mask = jnp.broadcast_to(mask[:, 0, 0, None, None, :], (batch, num_kv, 1, max_length))
    logits = jnp.where(row_mask.reshape(rows, 1, max_length), logits,
                       jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(value_cache.dtype)
    out = jnp.einsum("ngs,nsh->ngh", weights, value_cache,
                     preferred_element_type=jnp.float32)
    return out.reshape(batch, 1, num_heads, head_dim).astype(query.dtype)


class Attention(nn.Module):
    """Self-attention with RoPE and an optional KV cache: x [B, T, W] -> [B, T, W].

    ``cache`` is None (plain forward); or the keys and values of ALL layers [L, B, S, K, H]
    with ``layer`` the index of this one: writing the new tokens into the whole stack in
    place (rather than scanning per-layer slices in and out) keeps a decoding step from
    copying the cache; or, with ``layer`` None, this layer's own keys and values
    [B*K, S, H] (``KVCache.per_layer``, the CPU's decoding layout). With ``cache_index``
    None the new keys go to slot 0 and the queries attend to the new keys only (prefill);
    otherwise they go to slot ``cache_index`` and the queries attend to every slot
    (decoding). Returns (output, updated cache or None).

    Packed rows (no cache): ``segment_ids`` [B, T], and ``mask`` either their dense
    ``segment_mask`` (XLA / cuDNN) or None for the splash kernel, which builds its own from
    the segment ids and, for Gemma's sliding layers, the scalar ``is_sliding``.
    """

    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None,
                 cache: tuple[jax.Array, jax.Array] | None = None,
                 layer: jax.Array | None = None, cache_index: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, is_sliding: jax.Array | None = None):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, use_bias=cfg.attention_bias,
                  lora=cfg.lora)
        q = layers.dense((cfg.num_heads, cfg.head_dim), axes=("embed", "heads", "head_dim"),
                         name="q_proj", **kw)(x)
        k = layers.dense((cfg.num_kv_heads, cfg.head_dim),
                         axes=("embed", "kv_heads", "head_dim"), name="k_proj", **kw)(x)
        v = layers.dense((cfg.num_kv_heads, cfg.head_dim),
                         axes=("embed", "kv_heads", "head_dim"), name="v_proj", **kw)(x)
        if cfg.qk_norm:  # Gemma 3: RMSNorm over each head's query and key, before RoPE
            q = RMSNorm(cfg.norm_eps, cfg.norm_plus_one, cfg.param_dtype, name="q_norm")(q)
            k = RMSNorm(cfg.norm_eps, cfg.norm_plus_one, cfg.param_dtype, name="k_norm")(k)
        q = layers.constrain(apply_rope(q, cos, sin), HEADS_ACT)
        k = layers.constrain(apply_rope(k, cos, sin), KV_HEADS_ACT)
        v = layers.constrain(v, KV_HEADS_ACT)

        new_cache = out = None
        if cache is not None:
            start = 0 if cache_index is None else cache_index
            if layer is None:  # this layer's own [B*K, S, H]
                new_cache = tuple(
                    layers.constrain(jax.lax.dynamic_update_slice(
                        own, heads_as_rows(new).astype(own.dtype), (0, start, 0)),
                        PER_LAYER_CACHE_AXES)
                    for own, new in zip(cache, (k, v), strict=True))
                if cache_index is not None and q.shape[1] == 1:  # a decoding step
                    out = attend_one_token(q, *new_cache, mask, scale=cfg.query_scale,
                                           softcap=cfg.attn_logit_softcap)
                elif cache_index is not None:
                    k, v = (rows_as_heads(own, k.shape[0]).astype(q.dtype) for own in new_cache)
            else:
                new_cache = tuple(
                    layers.constrain(
                        jax.lax.dynamic_update_slice(stack, new[None].astype(stack.dtype),
                                                     (layer, 0, start, 0, 0)), CACHE_AXES)
                    for stack, new in zip(cache, (k, v), strict=True))
                if cache_index is not None:
                    k, v = (layers.constrain(
                        jax.lax.dynamic_index_in_dim(stack, layer, axis=0, keepdims=False),
                        KV_HEADS_ACT).astype(q.dtype) for stack in new_cache)

        if out is None and mask is None:
            out = splash.splash_attention(q, k, v, segment_ids, scale=cfg.query_scale,
                                          softcap=cfg.attn_logit_softcap,
                                          sliding_window=cfg.sliding_window,
                                          is_sliding=is_sliding)
        elif out is None:
            packed = segment_ids is not None and cache is None
            kernel = attention_kernel(cfg, q.shape[1]) if packed else cfg.attention_impl
            implementation = None if kernel in (None, "splash") else kernel
            if cfg.attention_chunk:  # the causal hint would not hold for a piece of queries
                out = attend_in_chunks(q, k, v, mask, chunk=cfg.attention_chunk,
                                       scale=cfg.query_scale, softcap=cfg.attn_logit_softcap,
                                       implementation=implementation)
            else:
                out = attend(q, k, v, mask, scale=cfg.query_scale,
                             softcap=cfg.attn_logit_softcap, causal=packed,
                             implementation=implementation)
        out = checkpoint_name(layers.constrain(out, HEADS_ACT), layers.ATTENTION_OUT)
        out = layers.dense(cfg.width, axes=("heads", "head_dim", "embed"), axis=(-2, -1),
                           name="o_proj", **kw)(out)
        return out, new_cache
