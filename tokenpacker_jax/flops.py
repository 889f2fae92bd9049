"""Analytic FLOPs of the multimodal model and peak FLOP/s of accelerators, for MFU.

Counts multiply-adds as 2 FLOPs and covers matmuls (projections, MLPs, attention scores and
values, the output head); norms, softmax and activations are left out, as usual for MFU.
Backward costs twice the forward for what is differentiated; a frozen part that gradients
flow through (the decoder in stage 1) still costs its activation gradients (1x forward),
but not its weight gradients.
"""

from __future__ import annotations

import dataclasses

from tokenpacker_jax.models.mllm import MLLMConfig

# Dense bf16 peak per chip / GPU (vendor figures), keyed by substrings of device_kind.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # Trillium
    "TPU v6e": 918e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
}


def peak_flops_per_device(device_kind: str) -> float | None:
    """Vendor bf16 dense peak for ``jax.devices()[0].device_kind``; None if unknown (CPU)."""
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return peak
    return None


def vision_forward_flops(config: MLLMConfig) -> float:
    """One image (tile) through the tower."""
    v = config.vision
    tokens = v.num_positions
    patch = 2 * tokens * v.patch_size**2 * v.num_channels * v.width
    per_layer = (2 * tokens * v.width * 4 * v.width  # q, k, v, out
                 + 2 * 2 * tokens * tokens * v.width  # scores and weighted sum
                 + 2 * 2 * tokens * v.width * v.mlp_dim)
    return patch + v.num_layers * per_layer


def projector_forward_flops(config: MLLMConfig, as_reference: bool = False) -> float:
    """One image (tile) through the projector (TokenPacker exactly; others approximately:
    their MLP on the packed tokens).

    TokenPacker as ours computes it (region attention projects its keys and values on the
    query side, ``tokenpacker.MultiheadAttention``), or with ``as_reference`` as
    docs/reference.md §3 writes it (``nn.MultiheadAttention`` projects every patch): 19.6 and
    21.4 GFLOP at the paper's scale 2.
    """
    p, v = config.projector, config.vision
    grid = v.grid_size
    patches = grid * grid
    levels = len(config.multi_layers)
    out = p.out_dim
    if p.name == "mlp2x_gelu":
        return 2 * patches * (v.width * out + out * out)
    tokens = (grid // p.scale_factor) ** 2
    mlp = 2 * tokens * (p.embed_dim * out + out * out)
    if p.name != "tokenpacker":
        return mlp + 2 * tokens * p.scale_factor**2 * v.width * p.embed_dim
    d, slots = p.embed_dim, p.scale_factor**2
    keys_values = 2 * 2 * patches * (levels * v.width * d + d * d)
    queries = 2 * tokens * d * d
    if as_reference:  # q, k, v in-projections (keys and values: every patch), out_proj
        attention = 2 * (tokens * d * d + 2 * patches * d * d + tokens * d * d)
        attention += 2 * 2 * tokens * slots * d  # scores + weighted values, head_dim wide
    else:  # q in-projection, Wk and Wv on the query side, out_proj
        attention = 2 * 4 * tokens * d * d
        attention += 2 * 2 * tokens * slots * p.num_heads * d  # the same, D wide per head
    return keys_values + queries + attention + mlp


def decoder_forward_flops(config: MLLMConfig, batch: int, length: int) -> float:
    """A batch of sequences through the LLM (causal attention counted at full T x T, as
    the kernels compute it)."""
    d = config.decoder
    q_dim, kv_dim = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    per_token_layer = 2 * (d.width * (q_dim + 2 * kv_dim) + q_dim * d.width
                           + 3 * d.width * d.mlp_dim)
    attention = 2 * 2 * length * q_dim  # per token per layer
    head = 2 * d.width * d.vocab_size
    return batch * length * (d.num_layers * (per_token_layer + attention) + head)


@dataclasses.dataclass(frozen=True)
class StepFlops:
    vision: float
    projector: float
    decoder: float

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.decoder


def train_step_flops(config: MLLMConfig, *, batch: int, length: int, tiles: int,
                     trainable: tuple[str, ...]) -> StepFlops:
    """FLOPs of one optimizer step over ``batch`` sequences with ``tiles`` images each."""
    images = batch * tiles
    vision_f = images * vision_forward_flops(config)
    projector_f = images * projector_forward_flops(config)
    decoder_f = decoder_forward_flops(config, batch, length)
    vision_mult = 3 if "vision_tower" in trainable else 1
    projector_mult = 3 if "projector" in trainable else 1
    # Gradients reach the projector through the decoder's activations in every stage; a
    # decoder with LoRA adapters computes no gradients for its frozen base, only its
    # adapters' (forward and both backward products).
    decoder_mult = 3 if "decoder" in trainable and config.decoder.lora is None else 2
    adapters = 0.0
    if "decoder" in trainable and config.decoder.lora is not None:
        adapters = 3 * decoder_adapter_flops(config, batch, length)
    return StepFlops(vision_f * vision_mult, projector_f * projector_mult,
                     decoder_f * decoder_mult + adapters)


def decoder_adapter_flops(config: MLLMConfig, batch: int, length: int) -> float:
    """Forward FLOPs of the decoder's LoRA adapters: x . A . B, 2 r (in + out) per token and
    adapted layer."""
    d = config.decoder
    q_dim, kv_dim = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    sizes = {"q_proj": (d.width, q_dim), "k_proj": (d.width, kv_dim),
             "v_proj": (d.width, kv_dim), "o_proj": (q_dim, d.width),
             "gate_proj": (d.width, d.mlp_dim), "up_proj": (d.width, d.mlp_dim),
             "down_proj": (d.mlp_dim, d.width)}
    per_token = sum(2 * d.lora.rank * (n_in + n_out) for name, (n_in, n_out) in sizes.items()
                    if d.lora.applies_to(name))
    return batch * length * d.num_layers * per_token
