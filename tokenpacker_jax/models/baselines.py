"""The projectors TokenPacker is compared with (paper Table 3), behind TokenPacker's interface.

Every module maps (x_last [B, N, W], x_multi [B, N, W * L]) -> tokens [B, M, out_dim];
N = grid^2 patches, M is the token budget: (grid / scale_factor)^2 or ``num_queries``.
They use the single-level features only (as in their papers); ``x_multi`` is accepted and
ignored so that the model can call any projector the same way.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenpacker_jax.models import layers
from tokenpacker_jax.models.lora import LoraConfig
from tokenpacker_jax.models.tokenpacker import (
    LENGTH_AXES,
    MultiheadAttention,
    check_scale,
    grid_size,
    mlp2x,
)

GRID_AXES = ("activation_batch", None, None, "activation_embed")


def _kw(module) -> dict:
    return dict(dtype=jnp.dtype(module.dtype), param_dtype=jnp.dtype(module.param_dtype))


def _as_grid(x: jax.Array) -> jax.Array:
    """[B, N, C] -> [B, grid, grid, C] (row-major patches)."""
    batch, num_tokens, channels = x.shape
    grid = grid_size(num_tokens)
    return layers.constrain(x.reshape(batch, grid, grid, channels), GRID_AXES)


def _as_tokens(x: jax.Array) -> jax.Array:
    """[B, h, w, C] -> [B, h * w, C]."""
    batch, height, width, channels = x.shape
    return layers.constrain(x.reshape(batch, height * width, channels), LENGTH_AXES)


def avg_pool(x: jax.Array, scale_factor: int) -> jax.Array:
    """Mean of each non-overlapping s x s block: [B, G, G, C] -> [B, G/s, G/s, C] (equals
    PyTorch ``AdaptiveAvgPool2d(G/s)`` when s divides G, the only case allowed here)."""
    batch, grid, _, channels = x.shape
    out = check_scale(grid, scale_factor)
    s = scale_factor
    return x.reshape(batch, out, s, out, s, channels).mean(axis=(2, 4))


def space_to_depth(x: jax.Array, scale_factor: int) -> jax.Array:
    """[B, G, G, C] -> [B, G/s, G/s, s*s*C], channels ordered (ki, kj, c)."""
    batch, grid, _, channels = x.shape
    out = check_scale(grid, scale_factor)
    s = scale_factor
    x = x.reshape(batch, out, s, out, s, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, out, out, s * s * channels)


def depthwise_conv3x3(features: int, *, use_bias: bool, kw: dict, name: str) -> nn.Conv:
    """A 3x3, stride 1, 'same' padded convolution with one filter per channel.

    Channels go over the tensor axis ('mlp'): over fsdp, like the batch, the partitioner
    would have to replicate the whole activation around the convolution.
    """
    return nn.Conv(features, (3, 3), padding=1, feature_group_count=features, use_bias=use_bias,
                   kernel_init=nn.with_logical_partitioning(layers.trunc_normal(),
                                                            (None, None, None, "mlp")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          ("mlp",)),
                   name=name, **kw)


def sincos_2d(dim: int, height: int, width: int) -> np.ndarray:
    """Fixed 2D sin-cos positions [height * width, dim] (MAE / Qwen-VL): the first half
    encodes the column, the second the row, each as [sin | cos] over dim/4 frequencies."""
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")

    def one_axis(pos):
        angles = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


class Projector(nn.Module, kw_only=True):
    """The fields every projector here shares: the LLM width and the compute / parameter
    dtypes (the keyword arguments ``projectors.build_projector`` passes to all of them).

    Keyword-only: inherited fields come first in dataclass order, so a positional
    ``AvgPoolMLP(2, 4096)`` would no longer mean (scale_factor, out_dim).
    """

    out_dim: int = 4096
    dtype: str = "float32"
    param_dtype: str = "float32"


class PooledProjector(Projector, kw_only=True):
    """A projector that shrinks the patch grid by ``scale_factor`` on each side."""

    scale_factor: int = 2


class MLP2xGelu(Projector, kw_only=True):
    """LLaVA-1.5 ``mlp2x_gelu``: Linear -> GELU -> Linear on every patch; keeps all N tokens."""

    lora: LoraConfig | None = None  # adapters on the dense layers it names

    @nn.compact
    def __call__(self, x_last: jax.Array, x_multi: jax.Array | None = None) -> jax.Array:
        grid_size(x_last.shape[1])
        x = layers.constrain(x_last, LENGTH_AXES)
        return mlp2x(x, self.out_dim, self.out_dim, layers.gelu_exact, kw=_kw(self),
                     lora=self.lora)


class AvgPoolMLP(PooledProjector, kw_only=True):
    """Average pooling: the mean of each s x s patch block, then LLaVA's 2-layer GELU MLP."""

    @nn.compact
    def __call__(self, x_last: jax.Array, x_multi: jax.Array | None = None) -> jax.Array:
        pooled = avg_pool(_as_grid(x_last).astype(jnp.float32), self.scale_factor)
        x = _as_tokens(pooled.astype(x_last.dtype))
        return mlp2x(x, self.out_dim, self.out_dim, layers.gelu_exact, kw=_kw(self))


class PixelShuffleMLP(PooledProjector, kw_only=True):
    """Pixel shuffle: each s x s block's features concatenated on channels (space-to-depth,
    s*s*W wide), then a 2-layer GELU MLP."""

    @nn.compact
    def __call__(self, x_last: jax.Array, x_multi: jax.Array | None = None) -> jax.Array:
        x = _as_tokens(space_to_depth(_as_grid(x_last), self.scale_factor))
        return mlp2x(x, self.out_dim, self.out_dim, layers.gelu_exact, kw=_kw(self))


class LDPv2(PooledProjector, kw_only=True):
    """LDP-v2 (MobileVLM V2): 2-layer GELU MLP per patch, s x s average pooling, then a
    positional 3x3 depthwise convolution added back (PEG, with residual)."""

    @nn.compact
    def __call__(self, x_last: jax.Array, x_multi: jax.Array | None = None) -> jax.Array:
        kw = _kw(self)
        grid_size(x_last.shape[1])
        x = mlp2x(layers.constrain(x_last, LENGTH_AXES), self.out_dim, self.out_dim,
                  layers.gelu_exact, kw=kw)
        x = avg_pool(_as_grid(x), self.scale_factor)
        x = x + depthwise_conv3x3(self.out_dim, use_bias=True, kw=kw, name="peg")(x)
        return _as_tokens(x)


class RegNetBottleneck(nn.Module):
    """Honeybee's ResNet block (timm RegNet bottleneck, bottleneck ratio 1): 1x1 conv, 3x3
    depthwise conv, squeeze-excitation (ratio 0.25), 1x1 conv, each normalised, plus the
    (projected) shortcut; SiLU. [B, H, W, C_in] -> [B, H, W, features]."""

    features: int
    eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = _kw(self)
        in_features = x.shape[-1]

        def conv1x1(h, name, axes=("embed", "mlp")):
            h = layers.dense(self.features, axes=axes, use_bias=False, name=name, **kw)(h)
            return layers.layer_norm(self.eps, name=f"{name}_norm", **kw)(h)

        shortcut = x if in_features == self.features else conv1x1(x, "downsample")
        h = nn.silu(conv1x1(x, "conv1"))
        h = depthwise_conv3x3(self.features, use_bias=False, kw=kw, name="conv2")(h)
        h = nn.silu(layers.layer_norm(self.eps, name="conv2_norm", **kw)(h))
        squeeze = h.mean(axis=(1, 2), keepdims=True)
        reduced = max(1, round(in_features * 0.25))
        squeeze = nn.relu(layers.dense(reduced, axes=("mlp", None), name="se_reduce",
                                       **kw)(squeeze))
        h = h * nn.sigmoid(layers.dense(self.features, axes=(None, "mlp"), name="se_expand",
                                        **kw)(squeeze))
        h = conv1x1(h, "conv3", axes=("mlp", "embed"))
        return layers.constrain(nn.silu(h + shortcut), GRID_AXES)


class CAbstractor(PooledProjector, kw_only=True):
    """C-Abstractor (Honeybee): learned positions, ``depth`` ResNet blocks, s x s average
    pooling, ``depth`` more blocks, then a 2-layer SiLU MLP to the LLM width."""

    embed_dim: int = 1024
    depth: int = 3

    @nn.compact
    def __call__(self, x_last: jax.Array, x_multi: jax.Array | None = None) -> jax.Array:
        kw = _kw(self)
        _, num_tokens, width = x_last.shape
        positions = self.param(
            "pos_emb", nn.with_logical_partitioning(layers.trunc_normal(), ("position", "embed")),
            (num_tokens, width), jnp.dtype(self.param_dtype))
        x = _as_grid(x_last + positions.astype(x_last.dtype)[None])
        block = dict(features=self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.depth):
            x = RegNetBottleneck(**block, name=f"s1_block_{i}")(x)
        x = avg_pool(x, self.scale_factor)
        for i in range(self.depth):
            x = RegNetBottleneck(**block, name=f"s2_block_{i}")(x)
        return mlp2x(_as_tokens(x), self.out_dim, self.out_dim, nn.silu, kw=kw,
                     prefix="readout")


class Resampler(PooledProjector, kw_only=True):
    """Perceiver resampler (Qwen-VL): learned queries with 2D sin-cos positions
    cross-attend to the patches (keys with their own 2D sin-cos positions), then LayerNorm
    and a linear map to the LLM width. ``num_queries`` (a square) queries, or
    (grid / scale_factor)^2 when it is 0."""

    num_queries: int = 0
    embed_dim: int = 1024
    num_heads: int = 8
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x_last: jax.Array, x_multi: jax.Array | None = None) -> jax.Array:
        kw = _kw(self)
        batch, num_tokens, width = x_last.shape
        grid = grid_size(num_tokens)
        if self.num_queries:
            num_queries = self.num_queries
            query_grid = math.isqrt(num_queries)
            if query_grid * query_grid != num_queries:
                raise ValueError(f"resampler: num_queries {num_queries} is not a square "
                                 f"(its 2D positions need a query grid)")
        else:
            query_grid = check_scale(grid, self.scale_factor)
            num_queries = query_grid * query_grid
        dim = self.embed_dim
        x = layers.constrain(x_last, LENGTH_AXES)
        # Qwen-VL projects the patches only when the widths differ.
        if width != dim:
            x = layers.dense(dim, axes=("embed", "mlp"), use_bias=False, name="kv_proj",
                             **kw)(x)
        x = layers.layer_norm(self.eps, name="ln_kv", **kw)(x)
        queries = self.param(
            "query", nn.with_logical_partitioning(layers.trunc_normal(), ("position", "embed")),
            (num_queries, dim), jnp.dtype(self.param_dtype))
        queries = layers.layer_norm(self.eps, name="ln_q", **kw)(queries)
        query_pos = jnp.asarray(sincos_2d(dim, query_grid, query_grid), kw["dtype"])
        key_pos = jnp.asarray(sincos_2d(dim, grid, grid), kw["dtype"])
        queries = jnp.broadcast_to((queries + query_pos)[None], (batch, num_queries, dim))
        out, _ = MultiheadAttention(self.num_heads, self.dtype, self.param_dtype, name="attn")(
            queries, x + key_pos[None], x)
        # Batch-only sharding here is also a workaround: without it XLA's SPMD partitioner
        # (jax 0.10.2, CPU) swaps batch shards of this batch-free-query attention followed by
        # two (tensor, fsdp)-sharded matmuls; test_projectors.py catches it.
        out = layers.constrain(out, LENGTH_AXES)
        out = layers.layer_norm(self.eps, name="ln_post", **kw)(out)
        out = layers.dense(self.out_dim, axes=("mlp", "embed"), use_bias=False, name="proj",
                           **kw)(out)
        return layers.constrain(out, LENGTH_AXES)
