"""The engine's compiled programs: one KV cache of B rows decoded in lockstep, rows filled
and emptied independently (``serving.engine`` schedules them).

Cache: ``KVCache`` with keys / values either per layer [B*K, S, H] (the unscanned decoder,
``KVCache.per_layer``) or stacked [L, B, S, K, H]; positions [B, S] (-1: no token);
``index`` the shared write slot; next_position [B].

    admit(model, params, cache, inputs, rows [P], start, sampling [P]...)
        prompts [P, T] (left-padded, ``data.prompt.left_pad``) prefilled and written into
        cache rows ``rows`` at slots [start, start + T) (rows >= B: dropped); the first
        token of each sampled -> (tokens [P], cache)
    decode(model, params, cache, tokens [B], live [B], sampling [B]...)
        one decoding step for every row; rows that are not ``live`` leave no token (their
        slot keeps position -1, their next position stays) -> (tokens [B], cache)
    shift(cache, shift)
        the slots moved ``shift`` to the left (right if negative); slots from outside
        [0, S) hold no token
    sample_rows(logits [R, V], seeds, counters, temperature, top_k, top_p [R]) -> [R]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tokenpacker_jax.models import mllm
from tokenpacker_jax.models.kv_cache import KVCache, heads_as_rows


def sample_rows(logits: jax.Array, seeds: jax.Array, counters: jax.Array,
                temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """One token per row from logits [R, V] with per-row settings [R]: greedy where the
    temperature is 0; else softmax(logits / temperature) cut to the top_k most likely
    (0: no cut) and to the smallest set whose mass reaches top_p, sampled with the key
    fold_in(key(seed), counter). Returns int32 [R]."""
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        kept = jnp.where(jnp.arange(vocab)[None] < k[:, None], ordered, -jnp.inf)
        kth = jnp.take_along_axis(ordered, k[:, None] - 1, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(kept, axis=-1), axis=-1)
        cut = jnp.sum(cumulative < top_p[:, None], axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(kept, jnp.minimum(cut, vocab - 1), axis=-1)
        cutoff = jnp.where(top_p[:, None] < 1.0, cutoff, -jnp.inf)
        scaled = jnp.where(scaled < jnp.maximum(kth, cutoff), -jnp.inf, scaled)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
        tokens = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(temperature > 0, tokens, greedy)

    # An all-greedy batch (the common case for evaluation) skips the sort over the vocabulary.
    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)


def _layer_arrays(cache: KVCache) -> bool:
    """Per-layer [B*K, S, H] arrays (else [L, B, S, K, H] stacks)."""
    return isinstance(cache.keys, tuple)


def admit(model: mllm.MultimodalLM, params: Any, cache: KVCache, inputs: dict[str, Any],
          rows: jax.Array, start: jax.Array, seeds: jax.Array, temperature: jax.Array,
          top_k: jax.Array, top_p: jax.Array) -> tuple[jax.Array, KVCache]:
    """See the module docstring."""
    length = inputs["input_ids"].shape[1]
    logits, fresh = model.apply({"params": params}, **inputs, max_length=length,
                                     method=mllm.MultimodalLM.prefill)
    slots = start + jnp.arange(length)
    heads = model.config.decoder.num_kv_heads
    if _layer_arrays(cache):  # [B*K, S, H] per layer
        flat_rows = (rows[:, None] * heads + jnp.arange(heads)).reshape(-1)

        def write(own, new):
            return own.at[flat_rows[:, None], slots[None]].set(
                heads_as_rows(new).astype(own.dtype), mode="drop")

        keys = tuple(write(own, fresh.keys[i]) for i, own in enumerate(cache.keys))
        values = tuple(write(own, fresh.values[i]) for i, own in enumerate(cache.values))
    else:  # [L, B, S, K, H]
        keys, values = (own.at[:, rows[:, None], slots[None]].set(
            new.astype(own.dtype), mode="drop")
            for own, new in ((cache.keys, fresh.keys), (cache.values, fresh.values)))
    positions = cache.positions.at[rows].set(-1, mode="drop")
    positions = positions.at[rows[:, None], slots[None]].set(fresh.positions, mode="drop")
    next_position = cache.next_position.at[rows].set(fresh.next_position, mode="drop")
    cache = cache.replace(keys=keys, values=values, positions=positions,
                          next_position=next_position)
    tokens = sample_rows(logits, seeds, jnp.zeros_like(rows), temperature, top_k, top_p)
    return tokens, cache

def decode(model: mllm.MultimodalLM, params: Any, cache: KVCache, tokens: jax.Array,
           live: jax.Array, seeds: jax.Array, counters: jax.Array, temperature: jax.Array,
           top_k: jax.Array, top_p: jax.Array) -> tuple[jax.Array, KVCache]:
    """See the module docstring."""
    logits, new = model.apply({"params": params}, tokens, cache,
                                   method=mllm.MultimodalLM.decode_step)
    slot = cache.index
    written = jax.lax.dynamic_index_in_dim(new.positions, slot, axis=1, keepdims=False)
    positions = jax.lax.dynamic_update_index_in_dim(
        new.positions, jnp.where(live, written, -1), slot, axis=1)
    new = new.replace(positions=positions,
                      next_position=jnp.where(live, new.next_position,
                                              cache.next_position))
    return sample_rows(logits, seeds, counters, temperature, top_k, top_p), new

def shift(cache: KVCache, shift: jax.Array) -> KVCache:
    """Slot s' takes slot s' + shift (slots from outside [0, S) hold no token)."""
    axis = 1 if _layer_arrays(cache) else 2

    def move(x):
        return jnp.roll(x, -shift, axis=axis)

    source = jnp.arange(cache.max_length) + shift
    inside = (source >= 0) & (source < cache.max_length)
    positions = jnp.where(inside[None], jnp.roll(cache.positions, -shift, axis=1), -1)
    return cache.replace(keys=jax.tree.map(move, cache.keys),
                         values=jax.tree.map(move, cache.values), positions=positions,
                         index=cache.index - shift)
