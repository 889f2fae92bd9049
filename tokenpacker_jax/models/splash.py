"""Splash attention (the Pallas TPU kernel) over packed rows, under ``shard_map``.

Shapes: B rows, T positions, N query heads, K key/value heads (N % K == 0), H head dim.

    out = splash_attention(query [B, T, N, H], key [B, T, K, H], value [B, T, K, H],
                           segment_ids [B, T], scale=..., ...)     # -> [B, T, N, H]

The mask is the one ``attention.segment_mask`` writes out densely: a query sees the keys of
its own segment (segment 0, padding, included) at slots <= its own, and with a sliding
window only those less than ``sliding_window`` slots back. Logits are soft-capped
(Gemma 2) before the mask, as on the other paths. The kernel runs on one row at a time
(``jax.vmap`` over B); ``shard_map`` gives each device its rows and heads, split as the
logical rules split ``activation_batch`` and ``activation_heads`` (an axis that does not
divide the count stays whole). Gemma 2's alternation of sliding and global layers is a
``lax.cond`` between two kernels, as the layer kind is a scanned value.

On a machine without a TPU the kernel runs in Pallas' interpret mode (slow; for tests).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

# The kernel's tiles along the query and key axes: rows must be a multiple of the smaller.
BLOCK_SIZES = (512, 128)


def supports(length: int) -> bool:
    """Whether rows of ``length`` positions tile into the kernel's blocks."""
    return length % min(BLOCK_SIZES) == 0


def _block_sizes(length: int) -> kernel.BlockSizes:
    block = next(size for size in BLOCK_SIZES if length % size == 0)
    return kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                             block_q_dkv=block, block_kv_dkv=block,
                             block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)


def _make_kernel(num_heads: int, length: int, window: int | None, softcap: float | None,
                 interpret: bool):
    if window is None:
        mask = masks.CausalMask((length, length))
    else:  # keys at q - (window - 1) .. q
        mask = masks.LocalMask((length, length), (window - 1, 0), 0)
    return kernel.make_splash_mha(
        masks.MultiHeadMask([mask] * num_heads), head_shards=1, q_seq_shards=1,
        block_sizes=_block_sizes(length), attn_logits_soft_cap=softcap, interpret=interpret)


def _mesh_axes(logical: str, size: int, mesh) -> str | tuple[str, ...] | None:
    """The mesh axes the rules give ``logical``, if their product divides ``size``."""
    axes = nn.logical_to_mesh_axes((logical,))[0]
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    names = tuple(name for name in names if name in mesh.axis_names)
    if not names or size % math.prod(mesh.shape[name] for name in names):
        return None
    return names


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                     segment_ids: jax.Array, *, scale: float, softcap: float | None = None,
                     sliding_window: int | None = None, is_sliding: jax.Array | None = None,
                     interpret: bool | None = None) -> jax.Array:
    """Causal attention within segments; see the module docstring.

    Args:
      sliding_window: the window of the sliding layers (None: no layer slides).
      is_sliding: scalar bool, whether this layer slides (None: it does not).
      interpret: run the kernel in Pallas' interpret mode (default: unless the computation
        is for TPUs).
    Returns [B, T, N, H] in the query's dtype.
    """
    batch, length, num_heads, _ = query.shape
    num_kv = key.shape[2]
    if not supports(length):
        raise ValueError(f"splash attention: rows of {length} positions are not a multiple "
                         f"of {min(BLOCK_SIZES)}")
    mesh = jax.sharding.get_abstract_mesh()
    if interpret is None:
        device = None if mesh.empty else mesh.abstract_device
        platform = device.platform if device is not None else jax.default_backend()
        interpret = platform != "tpu"
    slides = sliding_window is not None and sliding_window < length and is_sliding is not None
    # [B, N, T, H]: the kernel's layout, heads before positions.
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in ((query * scale).astype(query.dtype), key,
                                               value))
    segment_ids = segment_ids.astype(jnp.int32)
    flag = jnp.asarray(False if is_sliding is None else is_sliding)

    def attend_shard(q, k, v, segments, flag):
        def run(window):
            splash = _make_kernel(q.shape[1], length, window, softcap, interpret)
            return jax.vmap(splash)(q, k, v, segment_ids=kernel.SegmentIds(segments, segments))

        if not slides:
            return run(None)
        return jax.lax.cond(flag, lambda: run(sliding_window), lambda: run(None))

    if mesh.empty:
        out = attend_shard(q, k, v, segment_ids, flag)
    else:
        rows = _mesh_axes("activation_batch", batch, mesh)
        heads = _mesh_axes("activation_heads", math.gcd(num_heads, num_kv), mesh)
        per_head = PartitionSpec(rows, heads, None, None)
        out = jax.shard_map(
            attend_shard, mesh=mesh,
            in_specs=(per_head, per_head, per_head, PartitionSpec(rows, None), PartitionSpec()),
            out_specs=per_head, check_vma=False)(q, k, v, segment_ids, flag)
    return jnp.swapaxes(out, 1, 2).astype(query.dtype)
