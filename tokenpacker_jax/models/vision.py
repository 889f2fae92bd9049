"""CLIP and SigLIP vision transformers (docs/reference.md §1), pure Flax Linen.

Input: pixels [B, H, W, C] float, already normalised (see ``tokenpacker_jax.data.image``).
Output: all hidden states, a tuple of L + 1 arrays [B, T, width]: index 0 is the embedding
output (after ``pre_layrnorm`` for CLIP), index i the output of encoder layer i. T is the
number of patches, plus one class token for CLIP.

The encoder layers run under ``nn.scan`` (parameters stacked on a leading ``layers`` axis)
wrapped in ``nn.remat`` with the configured policy, so compile time and activation memory do
not grow with depth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenpacker_jax.models import layers
from tokenpacker_jax.models.lora import LoraConfig

VISION_FAMILIES = ("clip", "siglip")


@dataclasses.dataclass(frozen=True)
class VisionConfig(layers.FromDict):
    """Architecture of a ViT tower; defaults are CLIP ViT-L/14 at 336 px."""

    family: str = "clip"  # "clip" (class token, pre-LN, quick_gelu) or "siglip"
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    width: int = 1024
    mlp_dim: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"
    # LoRA adapters on the dense layers it names (q_proj, k_proj, v_proj, out_proj, fc1,
    # fc2); None: no adapters.
    lora: LoraConfig | None = None

    def __post_init__(self):
        if self.family not in VISION_FAMILIES:
            raise ValueError(f"vision family must be one of {VISION_FAMILIES}, got {self.family!r}")
        if self.width % self.num_heads:
            raise ValueError(f"vision width {self.width} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.image_size < self.patch_size:
            raise ValueError(f"vision image_size {self.image_size} is smaller than "
                             f"patch_size {self.patch_size}")
        layers.activation(self.hidden_act)
        layers.remat_policy(self.remat_policy)

    @property
    def grid_size(self) -> int:
        """Patches per side (the conv drops a remainder, as PyTorch's does)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def has_class_token(self) -> bool:
        return self.family == "clip"

    @property
    def num_positions(self) -> int:
        return self.num_patches + int(self.has_class_token)



class Attention(nn.Module):
    """Multi-head self-attention with biases, [B, T, W] -> [B, T, W]."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        head_dim = cfg.width // cfg.num_heads
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, lora=cfg.lora)
        qkv_axes = ("embed", "heads", "head_dim")
        q = layers.dense((cfg.num_heads, head_dim), axes=qkv_axes, name="q_proj", **kw)(x)
        k = layers.dense((cfg.num_heads, head_dim), axes=qkv_axes, name="k_proj", **kw)(x)
        v = layers.dense((cfg.num_heads, head_dim), axes=qkv_axes, name="v_proj", **kw)(x)
        act_axes = ("activation_batch", "activation_length", "activation_heads", None)
        q, k, v = (layers.constrain(t, act_axes) for t in (q, k, v))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim**-0.5, k)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return layers.dense(cfg.width, axes=("heads", "head_dim", "embed"), axis=(-2, -1),
                            name="out_proj", **kw)(out)


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN1 x), then + mlp(LN2 x). [B, T, W] -> same."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        residual_axes = ("activation_batch", "activation_length", "activation_embed")
        x = layers.constrain(x, residual_axes)
        h = layers.layer_norm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + Attention(cfg, name="self_attn")(h)
        h = layers.layer_norm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
        h = layers.dense(cfg.mlp_dim, axes=("embed", "mlp"), name="fc1", lora=cfg.lora,
                         **kw)(h)
        h = layers.constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        h = layers.activation(cfg.hidden_act)(h)
        h = layers.dense(cfg.width, axes=("mlp", "embed"), name="fc2", lora=cfg.lora, **kw)(h)
        x = layers.constrain(x + h, residual_axes)
        # Scan carry and per-layer output are the same tensor: the hidden state.
        return x, x


class Encoder(nn.Module):
    """L encoder layers; returns the stacked per-layer outputs [L, B, T, W]."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        block = EncoderLayer
        if cfg.remat_policy != "none":
            block = nn.remat(block, policy=layers.remat_policy(cfg.remat_policy),
                             prevent_cse=False)
        scanned = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        _, outputs = scanned(cfg, name="layers")(x, None)
        return outputs


class VisionTransformer(nn.Module):
    """CLIP / SigLIP ViT: pixels [B, H, W, C] -> tuple of L + 1 hidden states [B, T, W]."""

    config: VisionConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, ...]:
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        batch, height, width, channels = pixels.shape
        if channels != cfg.num_channels:
            raise ValueError(f"vision tower expects {cfg.num_channels} channels (NHWC), "
                             f"got pixels of shape {pixels.shape}")
        p, g = cfg.patch_size, cfg.grid_size
        if height < g * p or width < g * p:
            raise ValueError(f"vision tower expects {cfg.image_size}x{cfg.image_size} pixels, "
                             f"got {height}x{width}")
        # A stride-p, kernel-p convolution is a matmul over non-overlapping patches;
        # like PyTorch's conv it ignores a remainder row/column of pixels.
        patches = pixels[:, : g * p, : g * p, :].astype(cfg.dtype)
        patches = patches.reshape(batch, g, p, g, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, g * g, p, p, channels)
        x = layers.dense(cfg.width, axes=("patch_height", "patch_width", "channels", "embed"),
                         axis=(-3, -2, -1), use_bias=cfg.family == "siglip",
                         name="patch_embedding", **kw)(patches)
        if cfg.has_class_token:
            class_embedding = self.param(
                "class_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",)),
                (cfg.width,), cfg.param_dtype)
            cls = jnp.broadcast_to(class_embedding.astype(cfg.dtype), (batch, 1, cfg.width))
            x = jnp.concatenate([cls, x], axis=1)
        position_embedding = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("position", "embed")),
            (cfg.num_positions, cfg.width), cfg.param_dtype)
        x = x + position_embedding.astype(cfg.dtype)[None]
        if cfg.family == "clip":
            x = layers.layer_norm(cfg.layer_norm_eps, name="pre_layrnorm", **kw)(x)
        x = layers.constrain(x, ("activation_batch", "activation_length", "activation_embed"))

        per_layer = Encoder(cfg, name="encoder")(x)
        # post_layernorm belongs to the released towers (it makes their pooled output) and is
        # kept so checkpoints round-trip and parameter counts match; TokenPacker never uses it
        # (docs/reference.md §1), and XLA drops this unused computation.
        layers.layer_norm(cfg.layer_norm_eps, name="post_layernorm", **kw)(per_layer[-1][:, :1])
        return (x, *[per_layer[i] for i in range(cfg.num_layers)])


def select_features(hidden_states: Sequence[jax.Array], *, has_class_token: bool,
                    select_layer: int = -2,
                    multi_layers: Sequence[int] = (12, 16, 22, 23)
                    ) -> tuple[jax.Array, jax.Array]:
    """The projector's two inputs from the tower's hidden states (docs/reference.md §1).

    Args:
      hidden_states: L + 1 arrays [B, T, W] (index 0 = embeddings).
      has_class_token: drop token 0 of every level (CLIP).
      select_layer: index of the single level, Python-style (-2 = second to last).
      multi_layers: indices of the levels concatenated on channels, in that order.
    Returns:
      x [B, N, W] and x_multi [B, N, W * len(multi_layers)], N = number of patches.
    """
    num_states = len(hidden_states)
    for index in (select_layer, *multi_layers):
        if not -num_states <= index < num_states:
            raise ValueError(f"feature layer {index} is out of range for a tower with "
                             f"{num_states} hidden states (embeddings + {num_states - 1} layers)")
    start = 1 if has_class_token else 0
    x = hidden_states[select_layer][:, start:]
    x_multi = jnp.concatenate([hidden_states[i][:, start:] for i in multi_layers], axis=-1)
    return x, x_multi
