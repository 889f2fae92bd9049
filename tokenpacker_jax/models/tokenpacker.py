"""TokenPacker (docs/algorithm.md): point queries from interpolation, region-to-point attention.

The vision tower gives ``x_last`` [B, N, W] (one level) and ``x_multi`` [B, N, W * L]
(L levels on channels), N = grid * grid patches. TokenPacker turns them into
M = (grid / s)^2 tokens for the LLM:

    K = LN_k(Linear(GELU(Linear(x_multi))))         [B, N, D]   (V likewise)
    q = bilinear downsample of x_last to grid / s    [B, M, W]   (float32, half-pixel)
    Q = LN_q(Linear(q))                              [B, M, D]
    attention of each query over its own s*s region of K / V   [B, M, D]
    tokens = Linear(GELU(Linear(.)))                 [B, M, out_dim]

Sizes come from the inputs (grid, W, L), not from the reference's hard-coded 24 / 1024 / 4096,
so the same module serves other towers. Parameter names follow the reference state dict
(``k_proj_1.0`` -> ``k_proj_1_0``, ``clip_attn.in_proj_weight`` -> ``clip_attn/{q,k,v}_proj``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenpacker_jax.models import layers
from tokenpacker_jax.models.lora import LoraConfig

LENGTH_AXES = ("activation_batch", "activation_length", "activation_embed")
REGION_AXES = ("activation_batch", "activation_region", "activation_slot", "activation_embed")



def grid_size(num_tokens: int) -> int:
    """Side of the square patch grid holding ``num_tokens`` patches (ValueError otherwise)."""
    grid = math.isqrt(num_tokens)
    if grid * grid != num_tokens:
        raise ValueError(f"projector input has {num_tokens} tokens, which is not a square "
                         f"patch grid (drop the class token first)")
    return grid


def check_scale(grid: int, scale_factor: int) -> int:
    """``grid // scale_factor``, or a ValueError when the scale does not divide the grid."""
    if scale_factor < 1 or grid % scale_factor:
        valid = [s for s in range(1, grid + 1) if grid % s == 0]
        raise ValueError(f"scale_factor {scale_factor} does not divide the {grid}x{grid} "
                         f"patch grid (valid: {valid})")
    return grid // scale_factor


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's bilinear resize along one axis as two taps per output: (lower [out_size],
    upper [out_size] input indices, weight of the upper one [out_size]).

    Half-pixel centres (``align_corners=False``), no antialiasing: output i samples the input
    at ``(i + 0.5) * in / out - 0.5`` clamped at 0, mixing its two neighbours linearly (the
    upper one clamped to the edge).
    """
    src = np.maximum((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0.0)
    lower = np.floor(src).astype(np.int64)
    return lower, np.minimum(lower + 1, in_size - 1), src - lower


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float64 weights of ``bilinear_taps`` as a matrix (rows sum to 1)."""
    lower, upper, frac = bilinear_taps(in_size, out_size)
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lower), 1.0 - frac)
    np.add.at(matrix, (rows, upper), frac)
    return matrix


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """[B, H, W, C] -> [B, h, w, C] float32, bilinear as ``F.interpolate(align_corners=False)``.

    Two taps per output along each axis (``bilinear_taps``) rather than ``jax.image.resize``,
    whose default antialiases when downsampling (the reference does not), or interpolation
    matrices, which XLA:CPU multiplies as thin matmuls with transposes around them (about 1%
    of the projector's time at batch 8). s = 2 gives exactly the 2x2 block means.
    """
    x = x.astype(jnp.float32)
    for axis, out_size in zip((1, 2), size, strict=True):
        lower, upper, frac = bilinear_taps(x.shape[axis], out_size)
        shape = [1] * x.ndim
        shape[axis] = out_size
        frac = jnp.asarray(frac.reshape(shape), jnp.float32)
        x = jnp.take(x, lower, axis) * (1 - frac) + jnp.take(x, upper, axis) * frac
    return x


def group_regions(x: jax.Array, grid: int, scale_factor: int) -> jax.Array:
    """[B, grid*grid, C] -> [B, M, s*s, C]: region (i, j) at row i*(grid/s) + j holds the
    positions (s*i + ki, s*j + kj) at slot ki*s + kj (docs/algorithm.md §4)."""
    batch, _, channels = x.shape
    g, s = grid // scale_factor, scale_factor
    x = x.reshape(batch, g, s, g, s, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, g * g, s * s, channels)


def mlp2x(x: jax.Array, hidden: int, out: int, act, *, kw: dict, prefix: str = "mlp",
          axes: tuple[str, ...] = ("embed", "mlp", "embed"),
          lora: LoraConfig | None = None) -> jax.Array:
    """Linear -> act -> Linear named ``{prefix}_0`` / ``{prefix}_2`` (PyTorch Sequential indices
    0 and 2, the activation being index 1). Call from inside a compact method."""
    h = layers.dense(hidden, axes=axes[:2], name=f"{prefix}_0", lora=lora, **kw)(x)
    h = layers.constrain(h, (*LENGTH_AXES[:-1], "activation_mlp"))
    return layers.dense(out, axes=axes[1:], name=f"{prefix}_2", lora=lora, **kw)(act(h))


def packed_xavier_uniform(num_packed: int = 3, num_in_axes: int = 1) -> layers.Initializer:
    """Xavier-uniform of one part of a packed [num_packed * out, in] PyTorch weight.

    ``nn.MultiheadAttention`` initialises its packed ``in_proj_weight`` [3D, D] as one matrix,
    so each of our separate q/k/v kernels has the bound sqrt(6 / (D + 3D)), not sqrt(6 / 2D).
    """

    def init(key, shape, dtype=jnp.float32):
        fan_in = math.prod(shape[:num_in_axes])
        fan_out = math.prod(shape[num_in_axes:]) * num_packed
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init



class MultiheadAttention(nn.Module):
    """PyTorch ``nn.MultiheadAttention(D, heads)`` without dropout or mask, batch first.

    ``query`` [B, R, D]; ``key`` / ``value`` either [B, R, S, D] (region attention: query r
    sees only its own S keys) or [B, S, D] (cross attention: every query sees all S keys).
    Returns the output [B, R, D] and the float32 softmax weights [B, R, heads, S].

    The packed ``in_proj_weight`` is stored as three kernels ``{q,k,v}_proj`` [D, heads,
    head_dim] so heads can be split over the tensor axis; converters pack and unpack it.

    Region attention projects no key or value: each key is seen by one query only, so its
    projections move to the query side, R rows instead of R*S (19.6 instead of the reference's
    21.4 GFLOP per image at scale 2). Per head, q . (k Wk + bk) = (Wk q) . k + q . bk, and the
    last term is the same for every key of a softmax, so it drops out; the weights sum to
    one, so the weighted sum of (v Wv + bv) is (weighted sum of v) Wv + bv.
    """

    num_heads: int
    dtype: str = "float32"
    param_dtype: str = "float32"
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
        dim = query.shape[-1]
        if dim % self.num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {self.num_heads} heads")
        head_dim = dim // self.num_heads
        kw = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
        in_proj = dict(features=(self.num_heads, head_dim), axes=("embed", "heads", "head_dim"),
                       kernel_init=packed_xavier_uniform(3), lora=self.lora, **kw)
        q_proj, k_proj, v_proj = (layers.dense(name=f"{part}_proj", **in_proj)
                                  for part in "qkv")
        q = q_proj(query) * head_dim**-0.5  # scaled before the product, as PyTorch does
        if key.ndim == query.ndim + 1:
            out, weights = self.region_attention(q, key, value, k_proj, v_proj)
        elif key.ndim == query.ndim:
            out, weights = self.cross_attention(q, k_proj(key), v_proj(value))
        else:
            raise ValueError(f"attention: key of shape {key.shape} fits neither region "
                             f"[B, R, S, D] nor cross [B, S, D] attention for query "
                             f"{query.shape}")
        out = layers.dense(dim, axes=("heads", "head_dim", "embed"), axis=(-2, -1),
                           name="out_proj", lora=self.lora, **kw)(out)
        return out, weights

    @staticmethod
    def region_attention(q: jax.Array, key: jax.Array, value: jax.Array, k_proj: layers.Dense,
                         v_proj: layers.Dense) -> tuple[jax.Array, jax.Array]:
        """q [B, R, heads, head_dim] (projected, scaled); key, value [B, R, S, D] unprojected
        -> per-head outputs [B, R, heads, head_dim], weights [B, R, heads, S].

        The D-wide per-head tensors are kept heads-first ([heads, B, R, D]), the layout in
        which the per-head matmuls produce and consume them: batch-first, XLA:CPU transposes
        each of them (2 x 38 MB at the paper's sizes and batch 8).
        """
        heads_axes = ("activation_batch", "activation_region", "activation_heads", None)
        wide_axes = ("activation_heads", "activation_batch", "activation_region",
                     "activation_embed")
        k_kernel, _ = k_proj.merged_kernel(key.shape[-1:])  # its bias drops out of the softmax
        v_kernel, v_bias = v_proj.merged_kernel(value.shape[-1:])
        q = layers.constrain(q, heads_axes)
        key, value = layers.constrain(key, REGION_AXES), layers.constrain(value, REGION_AXES)
        q_keys = layers.constrain(jnp.einsum("brhd,ehd->hbre", q, k_kernel), wide_axes)
        logits = jnp.einsum("hbre,brse->hbrs", q_keys, key)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        weights = layers.constrain(weights, (*wide_axes[:-1], None))
        mixed = jnp.einsum("hbrs,brse->hbre", weights.astype(value.dtype), value)
        mixed = layers.constrain(mixed, wide_axes)
        out = jnp.einsum("hbre,ehd->brhd", mixed, v_kernel) + v_bias
        weights = layers.constrain(weights.transpose(1, 2, 0, 3), (*heads_axes[:-1], None))
        return layers.constrain(out, heads_axes), weights

    @staticmethod
    def cross_attention(q: jax.Array, k: jax.Array, v: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
        """q [B, R, heads, head_dim], k / v [B, S, heads, head_dim] (projected) -> per-head
        outputs [B, R, heads, head_dim], weights [B, R, heads, S]."""
        q_axes = ("activation_batch", "activation_length", "activation_heads", None)
        q, k, v = (layers.constrain(t, q_axes) for t in (q, k, v))
        logits = jnp.einsum("brhd,bshd->brhs", q, k)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        weights = layers.constrain(weights, (*q_axes[:-1], None))
        out = jnp.einsum("brhs,bshd->brhd", weights.astype(v.dtype), v)
        return layers.constrain(out, q_axes), weights



class TokenPacker(nn.Module):
    """TokenPacker projector: (x_last [B, N, W], x_multi [B, N, W*L]) -> [B, M, out_dim].

    N = grid^2 patches, M = (grid / scale_factor)^2 tokens. With ``return_attention=True``
    also returns the region attention weights [B, M, num_heads, s*s] (float32), slot
    k = ki * s + kj for patch (s*i + ki, s*j + kj) of token (i, j).
    Defaults are the reference's (CLIP-L/14-336 features, 7B LLM, 144 tokens).
    """

    scale_factor: int = 2
    out_dim: int = 4096
    embed_dim: int = 1024
    num_heads: int = 8
    layer_norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    lora: LoraConfig | None = None  # adapters on the dense layers it names

    @nn.compact
    def __call__(self, x_last: jax.Array, x_multi: jax.Array, return_attention: bool = False):
        batch, num_tokens, width = x_last.shape
        if x_multi.shape[:2] != (batch, num_tokens) or x_multi.shape[-1] % width:
            raise ValueError(f"TokenPacker: x_multi {x_multi.shape} must be [B, N, W * levels] "
                             f"for x_last {x_last.shape}")
        grid = grid_size(num_tokens)
        out_grid = check_scale(grid, self.scale_factor)
        kw = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
        dim = self.embed_dim
        x_last = layers.constrain(x_last, LENGTH_AXES)
        x_multi = layers.constrain(x_multi, LENGTH_AXES)

        def injected(prefix: str) -> jax.Array:
            """K or V: LN(Linear(GELU(Linear(x_multi)))), [B, N, D]."""
            h = mlp2x(x_multi, dim, dim, layers.gelu_exact, kw=kw, prefix=f"{prefix}_proj_1",
                      lora=self.lora)
            h = layers.layer_norm(self.layer_norm_eps, name=f"ln_{prefix}_1", **kw)(h)
            return layers.constrain(h, LENGTH_AXES)

        keys = group_regions(injected("k"), grid, self.scale_factor)
        values = group_regions(injected("v"), grid, self.scale_factor)
        keys, values = layers.constrain(keys, REGION_AXES), layers.constrain(values, REGION_AXES)

        # Point queries: a coarse view of the single-level features (docs/algorithm.md §2).
        image = x_last.reshape(batch, grid, grid, width)
        points = resize_bilinear(image, (out_grid, out_grid)).astype(x_last.dtype)
        points = points.reshape(batch, out_grid * out_grid, width)
        query = layers.dense(dim, axes=("embed", "mlp"), use_bias=False, name="q_proj_1",
                             lora=self.lora, **kw)(points)
        query = layers.layer_norm(self.layer_norm_eps, name="ln_q_1", **kw)(query)
        query = layers.constrain(query, LENGTH_AXES)

        packed, weights = MultiheadAttention(self.num_heads, self.dtype, self.param_dtype,
                                             self.lora, name="clip_attn")(query, keys, values)
        packed = layers.constrain(packed, LENGTH_AXES)
        tokens = mlp2x(packed, self.out_dim, self.out_dim, layers.gelu_exact, kw=kw,
                       lora=self.lora)
        tokens = layers.constrain(tokens, LENGTH_AXES)
        return (tokens, weights) if return_attention else tokens
