"""Visual projectors behind one interface, chosen by name (``projector.name`` in configs).

Every projector is a Linen module called as ``module.apply({"params": p}, x_last, x_multi)``
with x_last [B, N, W] (one feature level), x_multi [B, N, W * L] (L levels on channels),
N = grid^2 patches, and returns tokens [B, M, out_dim] for the LLM.

=============  ================================================  ==========================
name           what it is                                        tokens M
=============  ================================================  ==========================
tokenpacker    TokenPacker, region-to-point attention            (grid / scale_factor)^2
mlp2x_gelu     LLaVA-1.5 MLP on every patch                      grid^2 (scale_factor = 1)
avgpool        s x s average pooling + MLP                       (grid / scale_factor)^2
pixel_shuffle  space-to-depth + MLP                              (grid / scale_factor)^2
ldpv2          MobileVLM V2: MLP, average pooling, PEG conv      (grid / scale_factor)^2
c_abstractor   Honeybee: ResNet blocks, pooling, blocks, MLP     (grid / scale_factor)^2
resampler      Qwen-VL: learned queries, cross attention         num_queries, or
                                                                 (grid / scale_factor)^2 if 0
=============  ================================================  ==========================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn

from tokenpacker_jax.models import layers
from tokenpacker_jax.models.baselines import (
    AvgPoolMLP,
    CAbstractor,
    LDPv2,
    MLP2xGelu,
    PixelShuffleMLP,
    Resampler,
)
from tokenpacker_jax.models.lora import LoraConfig
from tokenpacker_jax.models.tokenpacker import TokenPacker, check_scale

__all__ = ["PROJECTORS", "ProjectorConfig", "TokenPacker", "build_projector",
           "num_output_tokens", "uses_multi_level"]


@dataclasses.dataclass(frozen=True)
class ProjectorConfig(layers.FromDict):
    """Which projector and its sizes; defaults are the paper's TokenPacker (144 tokens, 7B)."""

    name: str = "tokenpacker"  # one of PROJECTORS
    scale_factor: int = 2  # token budget: (grid / scale_factor)^2 tokens; 1 for mlp2x_gelu
    num_queries: int = 0  # resampler only: its token count; 0 = (grid / scale_factor)^2
    out_dim: int = 4096  # LLM width (4096 for 7B, 5120 for 13B)
    embed_dim: int = 1024  # internal width: tokenpacker, c_abstractor, resampler
    num_heads: int = 8  # tokenpacker, resampler
    depth: int = 3  # c_abstractor: ResNet blocks before and after pooling
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # LoRA adapters on the dense layers it names (tokenpacker and mlp2x_gelu).
    lora: LoraConfig | None = None

    def __post_init__(self):
        if self.name not in PROJECTORS:
            raise ValueError(f"projector.name {self.name!r} is not one of {sorted(PROJECTORS)}")
        if self.scale_factor < 1:
            raise ValueError(f"projector.scale_factor must be >= 1, got {self.scale_factor}")
        if self.name == "mlp2x_gelu" and self.scale_factor != 1:
            raise ValueError("projector.name 'mlp2x_gelu' keeps every patch token; set "
                             f"projector.scale_factor=1 (got {self.scale_factor})")
        if self.num_queries < 0:
            raise ValueError(f"projector.num_queries must be >= 0, got {self.num_queries}")
        if self.num_queries and self.name != "resampler":
            raise ValueError(f"projector.num_queries is only used by the resampler, but "
                             f"projector.name is {self.name!r} (set it to 0)")
        if self.num_queries and math.isqrt(self.num_queries) ** 2 != self.num_queries:
            raise ValueError(f"projector.num_queries {self.num_queries} must be a square")
        if self.name in ("tokenpacker", "resampler") and self.embed_dim % self.num_heads:
            raise ValueError(f"projector.embed_dim {self.embed_dim} is not divisible by "
                             f"projector.num_heads {self.num_heads}")
        if self.depth < 0:
            raise ValueError(f"projector.depth must be >= 0, got {self.depth}")
        if self.lora is not None and self.name not in LORA_PROJECTORS:
            raise ValueError(f"projector.name {self.name!r} takes no LoRA adapters (those that "
                             f"do: {LORA_PROJECTORS})")



LORA_PROJECTORS = ("tokenpacker", "mlp2x_gelu")


def num_output_tokens(config: ProjectorConfig, grid: int) -> int:
    """Tokens per image for a ``grid`` x ``grid`` patch input (ValueError if s does not
    divide the grid)."""
    if config.name == "mlp2x_gelu":
        return grid * grid
    if config.name == "resampler" and config.num_queries:
        return config.num_queries
    return check_scale(grid, config.scale_factor) ** 2


def uses_multi_level(config: ProjectorConfig) -> bool:
    """Whether the projector reads ``x_multi`` (the others ignore it; the caller may pass
    x_last twice and skip the concatenation)."""
    return config.name == "tokenpacker"


# name -> builder(config, {out_dim, dtype, param_dtype}) -> module
PROJECTORS: dict[str, Callable[[ProjectorConfig, dict], nn.Module]] = {
    "tokenpacker": lambda c, common: TokenPacker(
        scale_factor=c.scale_factor, embed_dim=c.embed_dim, num_heads=c.num_heads,
        lora=c.lora, **common),
    "mlp2x_gelu": lambda c, common: MLP2xGelu(lora=c.lora, **common),
    "avgpool": lambda c, common: AvgPoolMLP(scale_factor=c.scale_factor, **common),
    "pixel_shuffle": lambda c, common: PixelShuffleMLP(scale_factor=c.scale_factor, **common),
    "ldpv2": lambda c, common: LDPv2(scale_factor=c.scale_factor, **common),
    "c_abstractor": lambda c, common: CAbstractor(
        scale_factor=c.scale_factor, embed_dim=c.embed_dim, depth=c.depth, **common),
    "resampler": lambda c, common: Resampler(
        num_queries=c.num_queries, scale_factor=c.scale_factor, embed_dim=c.embed_dim,
        num_heads=c.num_heads, **common),
}


def build_projector(config: ProjectorConfig) -> nn.Module:
    """The projector module named by ``config.name``; its sizes follow its inputs."""
    common = dict(out_dim=config.out_dim, dtype=config.dtype, param_dtype=config.param_dtype)
    return PROJECTORS[config.name](config, common)
