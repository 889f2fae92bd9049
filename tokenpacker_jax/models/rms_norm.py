"""RMSNorm in the two conventions of the decoder families."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, statistics in float32. [..., D] -> same shape and dtype.

    LLaMA: w * x_hat (w starts at 1), x_hat cast to the input dtype before the product.
    Gemma: x_hat * (1 + w) (w starts at 0), all in float32, then cast.
    """

    eps: float
    plus_one: bool = False
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros_init() if self.plus_one else nn.initializers.ones_init()
        scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
        return scale.astype(x.dtype) * normed.astype(x.dtype)
