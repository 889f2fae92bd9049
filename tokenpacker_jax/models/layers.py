"""Building blocks shared by the vision towers, projectors and decoders.

Every parameter carries logical axis names (see ``tokenpacker_jax.sharding``); dense kernels
are stored [in..., out...] as Flax does, so PyTorch ``Linear.weight`` [out, in] is transposed
by the converters, never here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenpacker_jax.models import lora as lora_lib

Dtype = Any
Initializer = Callable[..., jax.Array]


class FromDict:
    """``from_dict`` for the frozen config dataclasses: unknown fields are an error that
    names them (a typo in a config must not silently fall back to a default)."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        return cls(**dict(values))


def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU with the erf form (PyTorch ``nn.GELU()``); JAX/Flax default to the tanh form."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (HF ``gelu_pytorch_tanh`` / ``gelu_new``)."""
    return jax.nn.gelu(x, approximate=True)


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


# Hugging Face ``hidden_act`` / ``hidden_activation`` names -> functions.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_exact,
    "gelu_exact": gelu_exact,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


# Intermediates that layers name (``jax.ad_checkpoint.checkpoint_name``) for the policies
# below: the attention's output before its output projection [B, T, heads, head_dim].
ATTENTION_OUT = "attention_out"

# Remat policy names used in configs -> jax.checkpoint policies ("none" = no remat at all):
# what the backward pass keeps from the forward instead of recomputing it. "full" keeps only
# the layer's input; "save_attention" also the attention's output (the backward recomputes
# the projections and the MLP but not the attention); "offload_attention" keeps it in the
# host's memory instead of the accelerator's (TPU / GPU).
REMAT_POLICIES: dict[str, Any] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
    "save_attention": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
    "offload_attention": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[ATTENTION_OUT],
        offload_src="device", offload_dst="pinned_host"),
}


def remat_policy(name: str):
    if name == "none" or name in REMAT_POLICIES:
        return None if name == "none" else REMAT_POLICIES[name]
    raise ValueError(f"unknown remat policy {name!r}; known: none, {', '.join(REMAT_POLICIES)}")


def trunc_normal(stddev: float = 0.02) -> Initializer:
    """PyTorch ``trunc_normal_(std=stddev)``: cut at +-2 absolute (~100 sigma at 0.02, so in
    effect a plain normal of that std). JAX's ``truncated_normal`` bounds are in units of
    sigma, and its default +-2 sigma would shrink the std by 12% (to 0.88 * stddev)."""
    return nn.initializers.truncated_normal(stddev=stddev, lower=-2.0 / stddev,
                                            upper=2.0 / stddev)


class Dense(nn.Module):
    """Linear map over the trailing ``num_in_axes`` axes: [..., *in] -> [..., *features].

    Like ``nn.DenseGeneral``, but the kernel is created at its real shape
    [*in, *features] with logical axis names (DenseGeneral initialises a flattened kernel,
    which clashes with logical partitioning under a mesh). ``kernel_init`` sees the flattened
    [fan_in, fan_out] shape, so variance-scaling initialisers get the right fans.

    With ``lora`` set, the layer carries LoRA adapters and, if the config quantises, its
    kernel as codes and scales (``models/lora.py``).
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    num_in_axes: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = trunc_normal()
    bias_init: Initializer = nn.initializers.zeros_init()
    lora: lora_lib.LoraConfig | None = None

    @nn.compact
    def weights(self, in_shape: tuple[int, ...]
                ) -> tuple[jax.Array, jax.Array | None, lora_lib.Adapters | None]:
        """(kernel [*in_shape, *features], bias [*features] or None, the LoRA adapters or
        None) in the compute dtype, created here on first use. The kernel is the base's
        (dequantised where the base is quantised); callers add the adapters' share."""
        n_in, n_out = self.num_in_axes, len(self.features)
        if len(self.axes) != n_in + n_out:
            raise ValueError(f"{self.name}: axes {self.axes} must name {n_in} input and "
                             f"{n_out} output dimensions")
        kernel = self._kernel(tuple(in_shape) + tuple(self.features),
                              (math.prod(in_shape), math.prod(self.features)))
        adapters = None
        if self.lora is not None:
            adapters = lora_lib.adapter_params(self, tuple(in_shape), self.lora,
                                               self.axes[:n_in], self.axes[n_in:],
                                               self.features)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(self.bias_init,
                                                                   self.axes[n_in:]),
                              tuple(self.features), self.param_dtype)
            bias = jnp.asarray(bias, self.dtype)
        return kernel, bias, adapters

    def merged_kernel(self, in_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array | None]:
        """(kernel with the adapters folded in, bias), for callers that contract the kernel
        themselves. Adapter dropout cannot act on a folded kernel, so it refuses to train
        with it rather than leave it out silently."""
        kernel, bias, adapters = self.weights(in_shape)
        if adapters is not None:
            if self.lora.dropout > 0 and self.has_rng("dropout"):
                raise ValueError(
                    f"{self.name}: its LoRA adapters are folded into the kernel here (region "
                    f"attention contracts it on the query side), where dropout "
                    f"{self.lora.dropout} cannot act: set the adapters' dropout to 0 or "
                    f"leave this layer out of the targets")
            kernel = kernel + lora_lib.folded_delta(adapters, self.lora, self.dtype)
        return kernel, bias

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = self.num_in_axes
        kernel, bias, adapters = self.weights(tuple(x.shape[-n_in:]))
        x = x.astype(self.dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
        if adapters is not None:
            y = y + lora_lib.adapter_delta(self, x, adapters, self.lora, self.dtype)
        return y if bias is None else y + bias

    def _kernel(self, kernel_shape: tuple[int, ...], flat_shape: tuple[int, int]) -> jax.Array:
        """The kernel [*in, *out] in the compute dtype: a parameter, or dequantised from
        the codes and scales of a quantised base."""
        base_init = self.kernel_init

        def init(key, shape, dtype):
            return base_init(key, flat_shape, dtype).reshape(shape)

        config = self.lora
        if config is None or config.quantize == "none":
            kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                                kernel_shape, self.param_dtype)
            return jnp.asarray(kernel, self.dtype)
        # Both parameters come from one drawn kernel (a model initialised from scratch);
        # Flax also calls the init (on a dummy key) to check the shapes of given ones.
        shared = self.make_rng("params") if self.is_initializing() else None
        n_out = len(self.features)

        def quantized(index):
            def init_part(key):
                kernel = init(key if shared is None else shared, kernel_shape, jnp.float32)
                return lora_lib.quantize(kernel, n_out, config, where=self.name)[index]

            return nn.with_logical_partitioning(init_part, self.axes)

        codes = self.param(lora_lib.CODES, quantized(0))
        scales = self.param(lora_lib.SCALES, quantized(1))
        return lora_lib.dequantize(codes, scales, n_out, config, self.dtype)


def dense(features: int | Sequence[int], *, axes: tuple[str | None, ...], use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          kernel_init: Initializer = trunc_normal(),  # noqa: B008 (a pure function: safe to share)
          axis: int | Sequence[int] = -1, name: str | None = None,
          lora: lora_lib.LoraConfig | None = None) -> Dense:
    """A ``Dense`` whose kernel and bias carry logical axis names.

    ``axes`` names the kernel's dimensions, input axes first (e.g. ``("embed", "mlp")`` or
    ``("embed", "heads", "head_dim")``); the bias takes the output names. ``axis`` are the
    contracted input axes, which must be trailing (-1, or (-2, -1), ...). ``lora``: the
    adapters of the model part; the layer takes them if its ``name`` is one of the targets.
    """
    features_tuple = (features,) if isinstance(features, int) else tuple(features)
    axis_tuple = (axis,) if isinstance(axis, int) else tuple(axis)
    if axis_tuple != tuple(range(-len(axis_tuple), 0)):
        raise ValueError(f"dense {name}: contracted axes must be trailing, got {axis}")
    return Dense(features=features_tuple, axes=tuple(axes), num_in_axes=len(axis_tuple),
                 use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                 kernel_init=kernel_init, name=name,
                 lora=lora if lora is not None and lora.applies_to(name) else None)


def layer_norm(eps: float, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               name: str | None = None) -> nn.LayerNorm:
    """LayerNorm (scale and bias) with its statistics in float32 and logical names."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """``nn.with_logical_constraint`` under the current rules (no-op without a mesh)."""
    return nn.with_logical_constraint(x, axes)


def count_params(tree: Any) -> int:
    """Number of scalars in a parameter tree (works on arrays and ShapeDtypeStructs)."""
    leaves = jax.tree_util.tree_leaves(nn.meta.unbox(tree))
    return sum(math.prod(leaf.shape) for leaf in leaves)
