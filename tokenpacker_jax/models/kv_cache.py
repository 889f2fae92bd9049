"""The key/value cache for decoding with a static maximum length.

``KVCache`` is a pytree (it goes through ``jax.jit`` as an argument and comes back as a
result, so a generation loop can donate it). Slots are filled left to right: ``prefill``
writes the prompt into slots [0, T), every ``decode_step`` writes one token into slot
``index`` for the whole batch. Which slots hold a token, and at which RoPE position, is
recorded per row in ``positions``, so prompts padded on either side decode correctly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from tokenpacker_jax.models.decoder_config import DecoderConfig

# Logical axis names of ``KVCache.positions`` (for sharding constraints).
POSITION_AXES = ("activation_batch", "activation_length")


@struct.dataclass
class KVCache:
    """Per-layer keys and values plus the bookkeeping of which slots are filled.

    keys, values: [L, B, S, K, H] (compute dtype), S = the static maximum length; or, in
      the per-layer layout (``per_layer``), tuples of L arrays [B*K, S, H] (row-major
      over B then K).
    positions: [B, S] int32, RoPE position of the token in each slot, -1 = no token.
    index: [] int32, the next slot to write (the same for every row).
    next_position: [B] int32, the position the next token of each row gets.
    """

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    index: jax.Array
    next_position: jax.Array

    @property
    def max_length(self) -> int:
        if isinstance(self.keys, tuple):  # per-layer [B*K, S, H]
            return self.keys[0].shape[1]
        return self.keys.shape[2]  # [L, B, S, K, H]

    def per_layer(self) -> KVCache:
        """The same cache with keys and values split into one array [B*K, S, H] per layer,
        for the unscanned decoder (``scan_layers=False``), split once before a decoding
        loop. What XLA:CPU does with the other layouts, per decoding step: a whole [L, ...]
        stack is copied each time one layer's slot is written and that layer read back (24
        copies of the cache per token for 12 layers), where separate arrays are updated in
        place; slots before heads ([B, S, K, H]) get each layer's keys and values
        transposed for the attention's matmuls; and two batch axes ([B, K, S, H]) are
        merged for them by a reshape that XLA fuses with a second copy of the cache write,
        which then copies every array. [B*K, S, H] is the matmuls' own layout: nothing is
        copied."""
        if isinstance(self.keys, tuple):
            return self
        return self.replace(keys=tuple(heads_as_rows(self.keys)),
                            values=tuple(heads_as_rows(self.values)))


def heads_as_rows(x: jax.Array) -> jax.Array:
    """[..., B, T, K, H] -> [..., B*K, T, H]: keys or values in the per-layer cache's
    layout (``KVCache.per_layer``)."""
    *lead, batch, length, heads, head_dim = x.shape
    return jnp.swapaxes(x, -3, -2).reshape(*lead, batch * heads, length, head_dim)


def rows_as_heads(x: jax.Array, batch: int) -> jax.Array:
    """[B*K, S, H] -> [B, S, K, H], the inverse of ``heads_as_rows``."""
    rows, length, head_dim = x.shape
    return jnp.swapaxes(x.reshape(batch, rows // batch, length, head_dim), 1, 2)


def init_cache(config: DecoderConfig, batch: int, max_length: int,
               dtype: Any = None) -> KVCache:
    """An empty cache (every slot free) for ``batch`` rows of up to ``max_length`` tokens."""
    shape = (config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    return KVCache(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        positions=jnp.full((batch, max_length), -1, jnp.int32),
        index=jnp.zeros((), jnp.int32),
        next_position=jnp.zeros((batch,), jnp.int32),
    )
