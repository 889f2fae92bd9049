"""The multimodal LLM: frozen vision tower -> projector -> decoder (LLaVA-style).

Visual tokens replace the ``<image>`` placeholder of each sample. The data pipeline has
already expanded the placeholder into the right number of positions (and, for HD, put the
separator tokens between tiles), marking them in ``image_mask``; the model fills the k-th
marked position of a sample with that sample's k-th visual token. Shapes are static:

    input_ids      int   [B, T]      text ids (anything at image positions)
    image_mask     bool  [B, T]      True where a visual token goes
    attention_mask int   [B, T]      1 for real tokens, 0 for padding
    pixel_values   float [B, N, S, S, 3]   N tiles per sample (1 without HD)
    segment_ids    int   [B, T]      optional: packed rows, 0 for padding
    positions      int   [B, T]      optional: RoPE positions (restarting in each segment)

Visual tokens of a sample are its tiles' tokens in tile order, M per tile (valid tiles
first, so padding tiles are never referenced). A packed row holds several samples, each a
segment of its own: their tiles lie in the row's N tile slots in the order of their
segments, so the k-th marked position of the row is still the row's k-th visual token, and
attention never crosses a segment (``models/attention.py``). Parameters live under three top-level
collections, which is what training stages mask: ``vision_tower``, ``projector``,
``decoder``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenpacker_jax.models import layers
from tokenpacker_jax.models import lora as lora_lib
from tokenpacker_jax.models.decoder import Decoder, DecoderConfig, KVCache
from tokenpacker_jax.models.lora import LoraConfig
from tokenpacker_jax.models.projectors import ProjectorConfig, build_projector
from tokenpacker_jax.models.vision import VisionConfig, VisionTransformer, select_features

PARAM_GROUPS = ("vision_tower", "projector", "decoder")


@dataclasses.dataclass(frozen=True)
class MLLMConfig:
    vision: VisionConfig
    projector: ProjectorConfig  # its out_dim must equal the decoder width
    decoder: DecoderConfig
    select_layer: int = -2
    multi_layers: tuple[int, ...] = (12, 16, 22, 23)
    train_vision: bool = False  # False: no gradient flows into the tower

    def __post_init__(self):
        if self.projector.out_dim != self.decoder.width:
            raise ValueError(f"projector out_dim {self.projector.out_dim} must equal the "
                             f"decoder width {self.decoder.width}")
        object.__setattr__(self, "multi_layers", tuple(self.multi_layers))


def lora_configs(config: MLLMConfig) -> dict[str, LoraConfig | None]:
    """{group: its LoRA config, or None} for the three parameter groups."""
    return {"vision_tower": config.vision.lora, "projector": config.projector.lora,
            "decoder": config.decoder.lora}


def without_adapters(config: MLLMConfig) -> MLLMConfig:
    """The same model without LoRA: the plain parameter layout that pretrained checkpoints,
    earlier stages and merged runs have."""
    return dataclasses.replace(
        config, vision=dataclasses.replace(config.vision, lora=None),
        projector=dataclasses.replace(config.projector, lora=None),
        decoder=dataclasses.replace(config.decoder, lora=None))


def merge_adapters(config: MLLMConfig, params: dict, fold: bool = True) -> dict:
    """Parameters of ``without_adapters(config)``: every group's adapters folded into its
    base (``lora.merge``; ``fold=False`` drops them instead), quantised kernels dequantised."""
    configs = lora_configs(config)
    return {group: tree if configs.get(group) is None else
            lora_lib.merge(tree, configs[group], fold=fold)
            for group, tree in params.items()}


def uses_dropout(config: MLLMConfig) -> bool:
    """Whether training must pass a ``dropout`` rng (LoRA dropout somewhere)."""
    return any(c is not None and c.dropout > 0 for c in lora_configs(config).values())


def splice_visual_tokens(text_embeds: jax.Array, visual_tokens: jax.Array,
                         image_mask: jax.Array) -> jax.Array:
    """Puts visual token k of each sample at its k-th ``image_mask`` position.

    Args:
      text_embeds: [B, T, H] token embeddings.
      visual_tokens: [B, V, H] visual tokens of each sample, in order.
      image_mask: [B, T] bool.
    Returns:
      [B, T, H]: ``visual_tokens`` at marked positions, ``text_embeds`` elsewhere.
    """
    num_visual = visual_tokens.shape[1]
    index = jnp.clip(jnp.cumsum(image_mask, axis=1) - 1, 0, num_visual - 1)
    gathered = jnp.take_along_axis(visual_tokens, index[..., None], axis=1)
    return jnp.where(image_mask[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class MultimodalLM(nn.Module):
    """Vision tower + projector + decoder; see the module docstring for the inputs."""

    config: MLLMConfig

    def setup(self):
        cfg = self.config
        self.vision_tower = VisionTransformer(cfg.vision)
        self.projector = build_projector(cfg.projector)
        self.decoder = Decoder(cfg.decoder)

    def encode_images(self, pixel_values: jax.Array) -> jax.Array:
        """Pixels [B, N, S, S, 3] -> visual tokens [B, N * M, H] (tiles in order)."""
        batch, tiles = pixel_values.shape[:2]
        flat = pixel_values.reshape(batch * tiles, *pixel_values.shape[2:])
        hidden = self.vision_tower(flat)
        x_last, x_multi = select_features(
            hidden, has_class_token=self.config.vision.has_class_token,
            select_layer=self.config.select_layer, multi_layers=self.config.multi_layers)
        if not self.config.train_vision:
            x_last, x_multi = jax.lax.stop_gradient((x_last, x_multi))
        tokens = self.projector(x_last, x_multi)
        tokens = tokens.reshape(batch, tiles * tokens.shape[1], tokens.shape[2])
        return layers.constrain(tokens, ("activation_batch", "activation_length",
                                         "activation_embed"))

    def embed(self, input_ids: jax.Array, image_mask: jax.Array,
              pixel_values: jax.Array) -> jax.Array:
        """Decoder input embeddings [B, T, H] with the visual tokens spliced in."""
        text = self.decoder.embed(input_ids)
        return splice_visual_tokens(text, self.encode_images(pixel_values), image_mask)

    def __call__(self, input_ids: jax.Array, image_mask: jax.Array, pixel_values: jax.Array,
                 attention_mask: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """Next-token logits [B, T, vocab] (float32)."""
        embeds = self.embed(input_ids, image_mask, pixel_values)
        return self.decoder(attention_mask=attention_mask, positions=positions,
                            inputs_embeds=embeds, segment_ids=segment_ids)

    def hidden_states(self, input_ids: jax.Array, image_mask: jax.Array,
                      pixel_values: jax.Array, attention_mask: jax.Array,
                      segment_ids: jax.Array | None = None,
                      positions: jax.Array | None = None) -> jax.Array:
        """The decoder's final-norm outputs [B, T, W], which ``logits`` maps to the vocabulary
        (a chunked loss applies it a piece of the sequence at a time); same arguments as
        ``__call__``."""
        embeds = self.embed(input_ids, image_mask, pixel_values)
        return self.decoder.hidden_states(attention_mask=attention_mask, positions=positions,
                                          inputs_embeds=embeds, segment_ids=segment_ids)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-norm outputs [..., W] -> logits [..., vocab] (float32)."""
        return self.decoder.logits(hidden)

    def prefill(self, input_ids: jax.Array, image_mask: jax.Array, pixel_values: jax.Array,
                attention_mask: jax.Array, *, max_length: int) -> tuple[jax.Array, KVCache]:
        """Runs left-padded prompts; logits [B, vocab] of each row's last token + the cache."""
        embeds = self.embed(input_ids, image_mask, pixel_values)
        return self.decoder.prefill(attention_mask=attention_mask, inputs_embeds=embeds,
                                    max_length=max_length)

    def decode_step(self, token_ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One token per row [B] -> logits [B, vocab] and the advanced cache."""
        return self.decoder.decode_step(token_ids, cache)


def token_loss_sums(logits: jax.Array, target_ids: jax.Array,
                    loss_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sums over supervised tokens: (cross-entropy, correct argmax predictions, count).

    Args:
      logits: [B, T, V] float32; target_ids: [B, T] next tokens; loss_mask: [B, T] (1 =
        supervised).
    Sums rather than means, so microbatches and hosts combine exactly.
    """
    mask = loss_mask.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, target_ids[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == target_ids).astype(jnp.float32)
    return ((log_z - target_logit) * mask).sum(), (correct * mask).sum(), mask.sum()


def chunked_token_loss_sums(head, hidden: jax.Array, target_ids: jax.Array,
                            loss_mask: jax.Array, chunk: int
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``token_loss_sums`` of ``head(hidden)``, ``chunk`` positions at a time.

    Args:
      head: final-norm outputs [B, C, W] -> logits [B, C, V] (float32).
      hidden: [B, T, W]; target_ids, loss_mask: [B, T]; T is padded to a multiple of
        ``chunk`` with unsupervised positions.
    The logits of one chunk exist at a time, in the forward pass and (each chunk recomputed
    under ``jax.checkpoint``) in the backward pass: [B, chunk, V] float32 instead of
    [B, T, V]. Same sums and gradients as the whole-sequence loss, up to summation order.
    """
    batch, length = target_ids.shape
    pieces = -(-length // chunk)
    pad = pieces * chunk - length

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(batch, pieces, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def body(sums, piece):
        h, targets, mask = piece
        return jax.tree.map(jnp.add, sums, token_loss_sums(head(h), targets, mask)), None

    zero = jnp.zeros((), jnp.float32)
    sums, _ = jax.lax.scan(body, (zero, zero, zero),
                           (split(hidden), split(target_ids), split(loss_mask)))
    return sums


def loss_and_metrics(logits: jax.Array, target_ids: jax.Array,
                     loss_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy over supervised tokens, and token accuracy.

    Returns:
      (loss, {"loss", "accuracy", "supervised_tokens"}), means over supervised tokens.
    """
    loss_sum, correct, count = token_loss_sums(logits, target_ids, loss_mask)
    denominator = jnp.maximum(count, 1.0)
    loss = loss_sum / denominator
    return loss, {"loss": loss, "accuracy": correct / denominator, "supervised_tokens": count}

