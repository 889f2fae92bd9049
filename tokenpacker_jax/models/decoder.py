"""Decoder-only LLMs: LLaMA-2 / Vicuna, LLaMA-3.x, Gemma 1, 2 and 3 (text), pure Flax Linen.

``Decoder(config)`` maps token ids [B, T] (or input embeddings [B, T, W], e.g. text with
visual tokens spliced in) to next-token logits [B, T, vocab] (float32)::

    logits = module.apply({"params": params}, input_ids, attention_mask)
    x = module.apply({"params": params}, input_ids, method=Decoder.embed)   # [B, T, W]
    logits = module.apply({"params": params}, inputs_embeds=x, attention_mask=mask)

``embed`` includes Gemma's sqrt(width) factor and the main call does not apply it again to
``inputs_embeds`` (transformers 5.x does the same), so embeddings spliced in from elsewhere
(visual tokens) are taken as they are.

Padding: ``attention_mask`` [B, T] (1 = token, 0 = padding) may pad either side; positions
default to the number of tokens before each one (cumsum - 1), which is what Hugging Face's
``generate`` uses. Packed rows (training) pass ``segment_ids`` [B, T] instead (several
samples per row, 0 = padding; ``models/attention.py``): attention stays inside a segment,
and positions default to each slot's distance from the start of its segment.

Decoding with the KV cache (``prefill`` then ``decode_step``) takes prompts padded on either
side; the convention of this project (``generate``) is LEFT padding, so that every row's
newest token sits in the same cache slot and no slots are wasted.

Layers run under ``nn.scan`` (parameters stacked on a leading ``layers`` axis) wrapped in
``nn.remat`` with the configured policy. Gemma 2's alternation of sliding-window and global
layers is a per-layer boolean scanned alongside the parameters, so there is one layer body.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenpacker_jax.models import layers
from tokenpacker_jax.models.attention import (
    Attention,
    attention_kernel,
    attention_mask,
    rope_tables,
    segment_mask,
)
from tokenpacker_jax.models.decoder_config import DecoderConfig
from tokenpacker_jax.models.kv_cache import POSITION_AXES, KVCache, init_cache
from tokenpacker_jax.models.rms_norm import RMSNorm

__all__ = ["Decoder", "DecoderConfig", "KVCache", "init_cache"]

RESIDUAL_ACT = ("activation_batch", "activation_length", "activation_embed")


def _norm(cfg: DecoderConfig, name: str | None = None) -> RMSNorm:
    return RMSNorm(cfg.norm_eps, cfg.norm_plus_one, cfg.param_dtype, name=name)


class Embedder(nn.Module):
    """Token embedding table [vocab, W]: ids -> vectors, and (tied head) vectors -> logits."""

    config: DecoderConfig

    def setup(self):
        cfg = self.config
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                      ("vocab", "embed")),
            (cfg.vocab_size, cfg.width), cfg.param_dtype)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """[B, T] int -> [B, T, W] in the compute dtype (times sqrt(W) for Gemma)."""
        cfg = self.config
        # Gather the FSDP-split width first (as for any weight under FSDP): a lookup into
        # the split table would need the output replicated and re-split by the compiler.
        # gather_embedding_table=False does exactly that instead, which spares the whole
        # table's copy (and its gradient's) on each chip.
        table = self.embedding
        if cfg.gather_embedding_table:
            table = layers.constrain(table, ("vocab", None))
        x = jnp.take(table, input_ids, axis=0).astype(cfg.dtype)
        if cfg.scale_embeddings:
            # HF rounds sqrt(W) to the model dtype first (55.4256 -> 55.5 in bfloat16).
            x = x * np.float32(math.sqrt(cfg.width)).astype(cfg.dtype)
        return layers.constrain(x, RESIDUAL_ACT)

    def attend(self, x: jax.Array) -> jax.Array:
        """[..., W] -> [..., vocab] with the transposed table."""
        cfg = self.config
        return jnp.einsum("...w,vw->...v", x.astype(cfg.dtype),
                          self.embedding.astype(cfg.dtype))


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), [B, T, W] -> [B, T, W]."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, use_bias=cfg.mlp_bias,
                  lora=cfg.lora)
        hidden_axes = ("activation_batch", "activation_length", "activation_mlp")
        gate = layers.dense(cfg.mlp_dim, axes=("embed", "mlp"), name="gate_proj", **kw)(x)
        up = layers.dense(cfg.mlp_dim, axes=("embed", "mlp"), name="up_proj", **kw)(x)
        h = layers.activation(cfg.hidden_act)(layers.constrain(gate, hidden_axes))
        h = h * layers.constrain(up, hidden_axes)
        return layers.dense(cfg.width, axes=("mlp", "embed"), name="down_proj", **kw)(h)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + [post_norm] attn(norm x), then + [post_norm] mlp(norm x).

    Scanned over layers with carry (x [B, T, W], cache: None or the keys and values of all
    layers); ``per_layer`` = (is this a sliding-window layer, layer index) is scanned, the
    rest is shared by all layers. ``segment_ids``: packed rows (None otherwise); with masks
    None, the splash kernel masks by them itself.
    """

    config: DecoderConfig

    @nn.compact
    def __call__(self, carry, per_layer, rope, global_mask, local_mask, cache_index,
                 segment_ids=None):
        cfg = self.config
        x, cache = carry
        is_sliding, layer = per_layer
        mask = global_mask if local_mask is None else jnp.where(is_sliding, local_mask,
                                                                  global_mask)
        (cos, sin), local_rope = rope
        if local_rope is not None:
            cos, sin = (jnp.where(is_sliding, local, full)
                        for local, full in zip(local_rope, (cos, sin), strict=True))
        x = layers.constrain(x, RESIDUAL_ACT)
        h = _norm(cfg, "pre_attention_norm")(x)
        h, cache = Attention(cfg, name="attn")(h, cos, sin, mask, cache, layer, cache_index,
                                               segment_ids, is_sliding)
        if cfg.post_norms:
            h = _norm(cfg, "post_attention_norm")(h)
        x = x + h
        h = _norm(cfg, "pre_mlp_norm")(x)
        h = MLP(cfg, name="mlp")(h)
        if cfg.post_norms:
            h = _norm(cfg, "post_mlp_norm")(h)
        x = layers.constrain(x + h, RESIDUAL_ACT)
        return (x, cache), None


def _layer_class(cfg: DecoderConfig) -> type[nn.Module]:
    if cfg.remat_policy == "none":
        return DecoderLayer
    return nn.remat(DecoderLayer, policy=layers.remat_policy(cfg.remat_policy),
                    prevent_cse=False)


def _scanned_layers(cfg: DecoderConfig) -> nn.Module:
    return nn.scan(
        _layer_class(cfg),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg)


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions [B, T]: number of tokens before each slot (pads get 0), as HF generate."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0) * mask


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions [B, T] of packed rows: slots since the start of each slot's segment (a
    segment starts where the id changes)."""
    slots = jnp.arange(segment_ids.shape[1])
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return slots - jax.lax.cummax(jnp.where(starts, slots, 0), axis=1)


class Decoder(nn.Module):
    """The LLM: ids or embeddings [B, T(, W)] -> logits [B, T, vocab] (float32)."""

    config: DecoderConfig

    def setup(self):
        cfg = self.config
        self.embedder = Embedder(cfg)
        if cfg.scan_layers:
            self.layers = _scanned_layers(cfg)
        else:  # named layers_0 .. layers_{L-1}
            self.layers = [_layer_class(cfg)(cfg) for _ in range(cfg.num_layers)]
        self.final_norm = _norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = layers.dense(cfg.vocab_size, axes=("embed", "vocab"),
                                        use_bias=False, dtype=cfg.dtype,
                                        param_dtype=cfg.param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings [B, T, W] as the decoder consumes them (Gemma: scaled)."""
        return self.embedder(input_ids)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-norm outputs [..., W] -> logits [..., vocab] in float32 (soft-capped for
        Gemma 2)."""
        cfg = self.config
        if cfg.tie_embeddings:
            out = self.embedder.attend(hidden)
        else:
            out = self.lm_head(hidden.astype(cfg.dtype))
        out = out.astype(jnp.float32)
        if cfg.final_logit_softcap is not None:
            out = cfg.final_logit_softcap * jnp.tanh(out / cfg.final_logit_softcap)
        axes = ("activation_batch",) + ("activation_length",) * (out.ndim - 2)
        return layers.constrain(out, axes + ("activation_vocab",))

    def __call__(self, input_ids: jax.Array | None = None,
                 attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, *,
                 inputs_embeds: jax.Array | None = None,
                 prefix_length: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, vocab] for ids [B, T] or embeddings [B, T, W].

        Args:
          attention_mask: [B, T], 1 for tokens, 0 for padding (default: all tokens).
          positions: [B, T] RoPE positions (default: ``default_positions(attention_mask)``,
            or with ``segment_ids`` ``segment_positions``).
          prefix_length: optional [B]; tokens at positions < prefix_length attend
            bidirectionally among themselves (e.g. an image prefix).
          segment_ids: optional [B, T], packed rows (0 = padding): attention stays inside a
            segment and ``attention_mask`` is not consulted.
        """
        return self.logits(self.hidden_states(input_ids, attention_mask, positions,
                                              inputs_embeds=inputs_embeds,
                                              prefix_length=prefix_length,
                                              segment_ids=segment_ids))

    def hidden_states(self, input_ids=None, attention_mask=None, positions=None, *,
                      inputs_embeds=None, prefix_length=None, segment_ids=None) -> jax.Array:
        """The final-norm outputs [B, T, W] (what ``logits`` consumes); same arguments."""
        if segment_ids is None:
            x, mask, positions = self._inputs(input_ids, inputs_embeds, attention_mask,
                                              positions)
            x, _ = self._layers(x, positions, mask, prefix_length, cache=None,
                                cache_index=None)
            return self.final_norm(x)
        if prefix_length is not None:
            raise ValueError("decoder: prefix_length does not apply to packed rows "
                             "(segment_ids)")
        if positions is None:
            positions = segment_positions(segment_ids)
        x, _, positions = self._inputs(input_ids, inputs_embeds, segment_ids > 0, positions)
        return self.final_norm(self._packed_layers(x, positions, segment_ids))

    def prefill(self, input_ids=None, attention_mask=None, positions=None, *,
                inputs_embeds=None, prefix_length=None,
                max_length: int) -> tuple[jax.Array, KVCache]:
        """Runs the prompts and fills a fresh cache of ``max_length`` slots.

        Prompts [B, T] (ids or embeddings), padded on either side (left by convention), with
        T <= max_length. Returns the logits [B, vocab] after each row's last token and the
        cache (index = T).
        """
        x, mask, positions = self._inputs(input_ids, inputs_embeds, attention_mask, positions)
        batch, length = mask.shape
        if length > max_length:
            raise ValueError(f"prefill: prompt length {length} exceeds max_length {max_length}")
        cache = init_cache(self.config, batch, max_length)
        x, (keys, values) = self._layers(x, positions, mask, prefix_length,
                                         cache=(cache.keys, cache.values), cache_index=None)
        key_positions = jnp.where(mask, positions, -1).astype(jnp.int32)
        last = length - 1 - jnp.argmax(mask[:, ::-1], axis=1)
        last_hidden = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        cache = KVCache(
            keys=keys, values=values,
            positions=layers.constrain(
                cache.positions.at[:, :length].set(key_positions), POSITION_AXES),
            index=jnp.asarray(length, jnp.int32),
            next_position=jnp.max(key_positions, axis=1) + 1)
        return self.logits(self.final_norm(last_hidden)), cache

    def decode_step(self, token_ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Feeds one token per row [B] at slot ``cache.index``; returns logits [B, vocab] and
        the advanced cache. The caller keeps index < max_length (slots are not checked
        inside jit; writing past the end would overwrite the last slot)."""
        x = self.embed(token_ids[:, None])
        q_positions = cache.next_position[:, None]
        slot = cache.index
        key_positions = jax.lax.dynamic_update_slice_in_dim(cache.positions, q_positions,
                                                            slot, axis=1)
        key_positions = layers.constrain(key_positions, POSITION_AXES)
        global_mask, local_mask = self._masks(slot[None], q_positions,
                                              jnp.arange(cache.max_length), key_positions,
                                              prefix_length=None)
        x, (keys, values) = self._run_layers((x, (cache.keys, cache.values)),
                                             self._rope(q_positions), global_mask,
                                             local_mask, slot)
        new_cache = KVCache(keys=keys, values=values, positions=key_positions, index=slot + 1,
                            next_position=cache.next_position + 1)
        return self.logits(self.final_norm(x[:, 0])), new_cache

    def _inputs(self, input_ids, inputs_embeds, attention_mask, positions):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("decoder: pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        x = layers.constrain(x.astype(self.config.dtype), RESIDUAL_ACT)
        batch, length = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), jnp.bool_)
        mask = attention_mask.astype(jnp.bool_)
        if positions is None:
            positions = default_positions(mask)
        return x, mask, positions.astype(jnp.int32)

    def _masks(self, q_slots, q_positions, k_slots, k_positions, prefix_length):
        cfg = self.config
        global_mask = attention_mask(q_slots, q_positions, k_slots, k_positions,
                                     prefix_length=prefix_length)
        local_mask = None
        if cfg.has_sliding_layers:
            local_mask = attention_mask(q_slots, q_positions, k_slots, k_positions,
                                        sliding_window=cfg.sliding_window,
                                        prefix_length=prefix_length)
        return global_mask, local_mask

    def _packed_layers(self, x, positions, segment_ids):
        """x [B, T, W] of packed rows through every layer (no cache)."""
        cfg = self.config
        global_mask = local_mask = None
        if attention_kernel(cfg, x.shape[1]) != "splash":
            global_mask = segment_mask(segment_ids)
            if cfg.has_sliding_layers:
                local_mask = segment_mask(segment_ids, cfg.sliding_window)
        x, _ = self._run_layers((x, None), self._rope(positions), global_mask, local_mask,
                                None, segment_ids)
        return x

    def _layers(self, x, positions, mask, prefix_length, cache, cache_index):
        slots = jnp.arange(x.shape[1])
        key_positions = jnp.where(mask, positions, -1)
        global_mask, local_mask = self._masks(slots, positions, slots, key_positions,
                                              prefix_length)
        return self._run_layers((x, cache), self._rope(positions), global_mask, local_mask,
                                cache_index)

    def _run_layers(self, carry, rope, global_mask, local_mask, cache_index,
                    segment_ids=None):
        """(x, cache) through every layer, scanned or one module after another; the cache
        is None, the [L, ...] stacks of keys and values, or (unscanned only) tuples of
        per-layer arrays (``KVCache.per_layer``), returned in the layout it came in."""
        x, cache = carry
        per_layer_cache = cache is not None and isinstance(cache[0], tuple)
        if self.config.scan_layers:
            if per_layer_cache:
                raise ValueError("decoder: the scanned layers take the cache as [L, ...] "
                                 "stacks, not per-layer arrays")
            carry, _ = self.layers(carry, self._per_layer(), rope, global_mask, local_mask,
                                   cache_index, segment_ids)
            return carry
        sliding, index = self._per_layer()
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            # A per-layer cache: this layer's own arrays (no layer index); else the stacks.
            own = (cache[0][i], cache[1][i]) if per_layer_cache else cache
            (x, own), _ = layer((x, own), (sliding[i], None if per_layer_cache else index[i]),
                                rope, global_mask, local_mask, cache_index, segment_ids)
            if per_layer_cache:
                keys.append(own[0])
                values.append(own[1])
            else:
                cache = own
        return x, ((tuple(keys), tuple(values)) if per_layer_cache else cache)

    def _rope(self, positions):
        """(cos, sin) of the global layers, and of the sliding ones where they differ."""
        cfg = self.config
        local = rope_tables(cfg, positions, local=True) if cfg.rope_local_theta else None
        return rope_tables(cfg, positions), local

    def _per_layer(self):
        cfg = self.config
        return (jnp.asarray(cfg.sliding_layers), jnp.arange(cfg.num_layers, dtype=jnp.int32))


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Decoder parameters with the scanned ``layers`` stack [L, ...] split into
    ``layers_0`` .. ``layers_{L-1}``: the layout of ``scan_layers=False``."""
    unstacked = {name: value for name, value in params.items() if name != "layers"}
    for i in range(num_layers):
        unstacked[f"layers_{i}"] = jax.tree.map(lambda stack, i=i: stack[i], params["layers"])
    return unstacked
