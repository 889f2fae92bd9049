"""LoRA adapters on dense layers, and the quantised frozen base of QLoRA.

A dense layer ``x [..., *in] -> [..., *out]`` named in ``LoraConfig.targets`` computes

    y = x . W + (alpha / rank) * (dropout(x) . A) . B

with ``A = lora_a [*in, rank]`` (PEFT's ``lora_A.weight`` [rank, in], transposed) and
``B = lora_b [rank, *out]`` (``lora_B.weight`` [out, rank], transposed), stored beside the
layer's base weight. ``A`` starts as PEFT's Kaiming-uniform (bound 1/sqrt(fan_in)), ``B`` at
zero, so a fresh adapter leaves the layer unchanged. Dropout acts only when the caller
passes a ``dropout`` rng (training); inference passes none.

The base weight of an adapted layer is either ``kernel`` [*in, *out] in the layer's
``param_dtype``, or, with ``quantize`` set, stored compressed and dequantised for each
matmul (only adapted layers are quantised, so a quantised kernel always sits beside its
adapters):

- ``int8``: ``kernel_codes`` int8 [*in, *out] and ``kernel_scales`` float32
  [*in[:-1], in[-1] / block, *out]: W = codes * scale, one scale (absmax / 127) per block of
  ``block_size`` consecutive entries of the last input axis, for each output;
- ``nf4``: the 16 levels of the 4-bit NormalFloat of QLoRA (quantiles of a normal
  distribution, scaled to [-1, 1]) times the block's absmax: ``kernel_codes`` uint8
  [*in[:-1], in[-1] / 2, *out] (two 4-bit level indices per byte, the even entry in the low
  nibble) and ``kernel_scales`` float32 (the absmax) as for int8.

Stacked (scanned) layers carry a leading layers axis on every one of these arrays.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

QUANTIZE = ("none", "int8", "nf4")
# Logical name of the adapters' rank axis: split over the FSDP devices where the layer's own
# axes leave them free (lora_b [r, *out] of q, k, v, gate, up), so that adapters and their
# optimizer state are not replicated (sharding.DEFAULT_RULES).
RANK_AXIS = "lora_rank"
ADAPTERS = ("lora_a", "lora_b")
CODES, SCALES = "kernel_codes", "kernel_scales"
# Every linear layer of a LLaMA / Gemma decoder but the output head (PEFT's "all-linear").
DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The 4-bit NormalFloat levels (QLoRA, Dettmers et al. 2023, appendix E).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapters of one model part: which dense layers (by module name, fnmatch patterns),
    their rank, alpha and dropout, and how the adapted layers' frozen base is stored."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = DECODER_TARGETS
    quantize: str = "none"  # one of QUANTIZE
    block_size: int = 64  # entries of the last input axis per quantisation scale
    param_dtype: str = "float32"  # of the adapters (the base keeps the layer's)

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"lora quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        if self.block_size < 1:
            raise ValueError(f"lora block_size must be >= 1, got {self.block_size}")
        if not self.targets:
            raise ValueError("lora targets name no layer")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def applies_to(self, name: str | None) -> bool:
        return name is not None and any(fnmatch.fnmatchcase(name, p) for p in self.targets)



def block_length(size: int, config: LoraConfig, where: str = "") -> int:
    """Entries per scale along an input axis of ``size`` (the whole axis if shorter)."""
    block = min(config.block_size, size)
    if size % block or (config.quantize == "nf4" and block % 2):
        raise ValueError(f"{where or 'lora'}: the last input axis ({size}) does not split into "
                         f"blocks of {block}" + (" of even length" if config.quantize == "nf4"
                                                 else "") + "; set lora.block_size")
    return block


def quantize(kernel: jax.Array, num_out_axes: int, config: LoraConfig,
             where: str = "") -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of a float kernel [..., *in, *out] (see the module docstring)."""
    axis = kernel.ndim - num_out_axes - 1  # the last input axis
    size = kernel.shape[axis]
    block = block_length(size, config, where)
    shape = kernel.shape
    blocked = kernel.astype(jnp.float32).reshape(
        shape[:axis] + (size // block, block) + shape[axis + 1:])
    absmax = jnp.max(jnp.abs(blocked), axis=axis + 1, keepdims=True)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    if config.quantize == "int8":
        codes = jnp.round(blocked / safe * 127.0).astype(jnp.int8).reshape(shape)
        return codes, (absmax / 127.0).squeeze(axis + 1)
    if config.quantize != "nf4":
        raise ValueError(f"quantize: no storage for {config.quantize!r}")
    normalised = blocked / safe
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    # Index of the nearest level: how many midpoints lie below (fuses into one pass).
    index = jnp.sum(normalised[..., None] > midpoints, axis=-1).astype(jnp.uint8)
    index = index.reshape(shape[:axis] + (size // 2, 2) + shape[axis + 1:])
    low, high = jnp.take(index, 0, axis=axis + 1), jnp.take(index, 1, axis=axis + 1)
    return low | (high << 4), absmax.squeeze(axis + 1)


def dequantize(codes: jax.Array, scales: jax.Array, num_out_axes: int, config: LoraConfig,
               dtype: Any) -> jax.Array:
    """The kernel [..., *in, *out] in ``dtype`` from its codes and scales."""
    axis = codes.ndim - num_out_axes - 1
    if config.quantize == "int8":
        values = codes.astype(jnp.float32)
    else:
        low = (codes & 15).astype(jnp.int32)
        high = (codes >> 4).astype(jnp.int32)
        index = jnp.stack([low, high], axis=axis + 1)
        shape = codes.shape[:axis] + (2 * codes.shape[axis],) + codes.shape[axis + 1:]
        values = jnp.asarray(NF4_LEVELS)[index.reshape(shape)]
    size = values.shape[axis]
    blocks = scales.shape[axis]
    blocked = values.reshape(values.shape[:axis] + (blocks, size // blocks)
                             + values.shape[axis + 1:])
    kernel = blocked * jnp.expand_dims(scales.astype(jnp.float32), axis + 1)
    return kernel.reshape(values.shape).astype(dtype)


def codes_shape(kernel_shape: Sequence[int], num_out_axes: int,
                config: LoraConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(codes shape, scales shape) for a kernel of ``kernel_shape``."""
    shape = tuple(kernel_shape)
    axis = len(shape) - num_out_axes - 1
    block = block_length(shape[axis], config)
    scales = shape[:axis] + (shape[axis] // block,) + shape[axis + 1:]
    if config.quantize == "nf4":
        return shape[:axis] + (shape[axis] // 2,) + shape[axis + 1:], scales
    return shape, scales


def codes_dtype(config: LoraConfig) -> Any:
    return jnp.int8 if config.quantize == "int8" else jnp.uint8



def kaiming_uniform(num_in_axes: int) -> Any:
    """PEFT's ``lora_A`` init (``kaiming_uniform_(a=sqrt(5))``): U(-b, b), b = 1/sqrt(fan_in),
    over the flattened input axes of ``lora_a`` [*in, rank]."""

    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / math.sqrt(math.prod(shape[:num_in_axes]))
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


Adapters = tuple[jax.Array, jax.Array]  # lora_a [*in, rank], lora_b [rank, *features]


def adapter_params(module: nn.Module, in_shape: tuple[int, ...], config: LoraConfig,
                   in_axes: Sequence[str | None], out_axes: Sequence[str | None],
                   features: Sequence[int]) -> Adapters:
    """``lora_a`` [*in, rank] and ``lora_b`` [rank, *features] of ``module`` (call from
    inside its compact method; B starts at zero, so a new adapter changes nothing)."""
    a = module.param("lora_a", nn.with_logical_partitioning(kaiming_uniform(len(in_axes)),
                                                            (*in_axes, RANK_AXIS)),
                     in_shape + (config.rank,), jnp.dtype(config.param_dtype))
    b = module.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                            (RANK_AXIS, *out_axes)),
                     (config.rank,) + tuple(features), jnp.dtype(config.param_dtype))
    return a, b


def adapter_delta(module: nn.Module, x: jax.Array, adapters: Adapters, config: LoraConfig,
                  dtype: Any) -> jax.Array:
    """(alpha / rank) * (dropout(x) . A) . B: x [..., *in] -> [..., *features] (dropout from
    ``module``'s "dropout" stream when it has one)."""
    a, b = adapters
    n_in = a.ndim - 1
    h = x
    if config.dropout > 0 and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - config.dropout, h.shape)
        h = jnp.where(keep, h / (1.0 - config.dropout), 0.0).astype(h.dtype)
    contract = (tuple(range(h.ndim - n_in, h.ndim)), tuple(range(n_in)))
    low = jax.lax.dot_general(h, jnp.asarray(a, dtype), (contract, ((), ())))
    delta = jax.lax.dot_general(low, jnp.asarray(b, dtype), (((low.ndim - 1,), (0,)), ((), ())))
    return delta * jnp.asarray(config.scale, dtype)


def folded_delta(adapters: Adapters, config: LoraConfig, dtype: Any) -> jax.Array:
    """(alpha / rank) * A . B as a kernel [*in, *features], to add to the base kernel."""
    a, b = adapters
    delta = jnp.tensordot(jnp.asarray(a, dtype), jnp.asarray(b, dtype), axes=1)
    return delta * jnp.asarray(config.scale, dtype)



def is_adapter(path: Sequence[Any]) -> bool:
    """Does the leaf at ``path`` (keys, or jax key entries) hold LoRA weights."""
    last = path[-1]
    return getattr(last, "key", last) in ADAPTERS


def has_adapters(tree: Any) -> bool:
    return any(is_adapter(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree))


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(nn.meta.unbox(tree))


def merge(params: Any, config: LoraConfig, fold: bool = True) -> dict:
    """``params`` in the layout of the same model without adapters: every adapter folded
    into its base (``fold``; else dropped) and quantised kernels dequantised. The kernel is
    W + (alpha / rank) * A . B, computed in float32 and cast to the base's dtype (the
    adapters' dtype for a quantised base)."""
    flat = _flat(params)
    out = {}
    for path, value in flat.items():
        leaf, parent = path[-1], path[:-1]
        if leaf in ADAPTERS or leaf == SCALES:
            continue
        if leaf not in ("kernel", CODES) or parent + ("lora_a",) not in flat:
            out[path] = value
            continue
        a, b = flat[parent + ("lora_a",)], flat[parent + ("lora_b",)]
        if leaf == CODES:
            num_out = value.ndim - (a.ndim - 1)
            base = dequantize(value, flat[parent + (SCALES,)], num_out, config, jnp.float32)
            dtype = a.dtype
        else:
            base, dtype = value, value.dtype
        if fold:
            base = base.astype(jnp.float32) + lora_product(a, b, base.shape, config.scale)
        out[parent + ("kernel",)] = base.astype(dtype)
    return traverse_util.unflatten_dict(out)


def lora_product(a: jax.Array, b: jax.Array, kernel_shape: Sequence[int],
                 scale: float) -> jax.Array:
    """scale * A . B as a float32 kernel of ``kernel_shape`` [*lead, *in, *out]."""
    lead = (a.ndim - 1) + (b.ndim - 1) - len(kernel_shape)
    lead_shape = tuple(kernel_shape[:lead])
    a2 = a.astype(jnp.float32).reshape(lead_shape + (-1, a.shape[-1]))
    b2 = b.astype(jnp.float32).reshape(lead_shape + (b.shape[lead], -1))
    product = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
    return (scale * product).reshape(tuple(kernel_shape))


def adapt(base: Any, target: Any, config: LoraConfig, shardings: Any = None) -> dict:
    """Leaves of ``target`` (the adapted model's (abstract) params) that ``base`` (a tree
    in the unadapted layout: float kernels, no adapters) provides: every leaf of ``base``
    that ``target`` has, and the codes and scales of quantised kernels, computed from
    ``base``'s float kernels (straight into ``shardings``, a tree like ``target``, if given).
    Adapters are left out (the caller initialises them)."""
    flat_base, flat_target = _flat(base), _flat(target)
    flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    out = {}
    for path, value in flat_base.items():
        if path in flat_target:
            out[path] = value
            continue
        parent = path[:-1]
        if path[-1] != "kernel" or parent + (CODES,) not in flat_target:
            raise ValueError(f"{'/'.join(path)}: no such parameter in the adapted model")
        num_out = value.ndim - (flat_target[parent + ("lora_a",)].ndim - 1)
        where = "/".join(path)
        out_shardings = tuple(flat_shardings.get(parent + (name,)) for name in (CODES, SCALES))
        fn = jax.jit(lambda w, n=num_out, w_=where: quantize(w, n, config, where=w_),
                     out_shardings=out_shardings if None not in out_shardings else None)
        out[parent + (CODES,)], out[parent + (SCALES,)] = fn(value)
    return traverse_util.unflatten_dict(out)
