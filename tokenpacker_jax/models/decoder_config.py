"""Architecture of the decoder LLMs (LLaMA-2 / Vicuna, LLaMA-3.x, Gemma 1, 2 and 3 text).

One frozen dataclass covers the families; the family name only picks defaults in the HF
converters, every behaviour is an explicit field:

| field           | LLaMA-2  | LLaMA-3.x    | Gemma 1     | Gemma 2         | Gemma 3 text  |
|-----------------|----------|--------------|-------------|-----------------|---------------|
| num_kv_heads    | = heads  | < heads      | 1 (2B: MQA) | < heads         | < heads       |
| rope_type       | default  | llama3       | default     | default         | default/linear|
| rope_local_theta| -        | -            | -           | -               | 10000         |
| hidden_act      | silu     | silu         | gelu_tanh   | gelu_tanh       | gelu_tanh     |
| norm_plus_one   | no       | no           | yes (1 + w) | yes             | yes           |
| scale_embeddings| no       | no           | sqrt(width) | sqrt(width)     | sqrt(width)   |
| tie_embeddings  | no       | no (3.2: yes)| yes         | yes             | yes           |
| post_norms      | no       | no           | no          | yes             | yes           |
| qk_norm         | no       | no           | no          | no              | yes           |
| query_pre_attn_ | None:    | None         | None        | 256 / 144       | 256 / 168     |
|   scalar        | head_dim |              |             |                 |               |
| softcap (attn / | -        | -            | -           | 50 / 30         | -             |
|   final logits) |          |              |             |                 |               |
| layer_types     | global   | global       | global      | sliding, global | 5 sliding : 1 |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from tokenpacker_jax.models import layers
from tokenpacker_jax.models.lora import LoraConfig

DECODER_FAMILIES = ("llama", "gemma", "gemma2", "gemma3")
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class DecoderConfig(layers.FromDict):
    """A decoder-only transformer; defaults are LLaMA-2 7B (Vicuna-7B v1.5)."""

    family: str = "llama"
    vocab_size: int = 32000
    width: int = 4096  # HF hidden_size
    mlp_dim: int = 11008  # HF intermediate_size
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"  # gate activation of the gated MLP (SwiGLU / GeGLU)
    norm_eps: float = 1e-5
    norm_plus_one: bool = False  # Gemma RMSNorm: x_hat * (1 + w), w stored as HF stores it
    post_norms: bool = False  # Gemma 2: RMSNorm after attention and after the MLP as well
    qk_norm: bool = False  # Gemma 3: RMSNorm over each query and key head before RoPE
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(width), in the compute dtype
    tie_embeddings: bool = False  # output head = embedding table transposed
    attention_bias: bool = False
    mlp_bias: bool = False
    # RoPE (rotate-half layout, as HF stores the weights).
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0  # linear and llama3
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_position: int = 8192  # llama3
    rope_local_theta: float | None = None  # Gemma 3: sliding layers' own base, unscaled
    max_position_embeddings: int = 4096  # recorded for config.json; nothing is sized by it
    # Attention.
    query_pre_attn_scalar: float | None = None  # logits scale = this ** -0.5 (None: head_dim)
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None  # keys with q_pos - k_pos < sliding_window are seen
    layer_types: tuple[str, ...] | None = None  # per layer; None = all "full_attention"
    # Special tokens, carried for generation and config.json round trips.
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    # Numerics and compilation.
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"
    # True: the layers run under nn.scan with weights stacked on a leading "layers" axis
    # (one compiled body; training). False: one module per layer ("layers_0", ...), for
    # decoding on XLA:CPU, which copies each scanned layer's weight slice before using it.
    scan_layers: bool = True
    # Attention kernel: "xla" / "cudnn" (jax.nn.dot_product_attention), or "splash" (the
    # Pallas TPU kernel; packed training rows only, decoding then uses XLA); None: splash on
    # TPU, cuDNN on GPU where it applies, else XLA (models/attention.py attention_kernel).
    attention_impl: str | None = None
    # > 0: attention this many queries at a time (the logits of one piece alive at once)
    attention_chunk: int = 0
    # Under FSDP: all-gather the embedding table before the lookup (True), or look tokens
    # up in the split table and move the activations instead (less memory, more traffic).
    gather_embedding_table: bool = True
    # LoRA adapters on the dense layers it names (models/lora.py); None: no adapters.
    lora: LoraConfig | None = None

    def __post_init__(self):
        if self.family not in DECODER_FAMILIES:
            raise ValueError(f"decoder family must be one of {DECODER_FAMILIES}, "
                             f"got {self.family!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"decoder num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"decoder rope_type must be one of {ROPE_TYPES}, "
                             f"got {self.rope_type!r}")
        if self.head_dim % 2:
            raise ValueError(f"decoder head_dim {self.head_dim} must be even for RoPE")
        if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"decoder attention_impl must be one of "
                             f"{ATTENTION_IMPLEMENTATIONS}, got {self.attention_impl!r}")
        if self.attention_chunk < 0:
            raise ValueError(f"decoder attention_chunk must be >= 0, got {self.attention_chunk}")
        if self.attention_impl == "cudnn" and self.attn_logit_softcap is not None:
            raise ValueError("decoder attention_impl 'cudnn' cannot soft-cap attention logits "
                             "(attn_logit_softcap is set); use None or 'xla'")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, tuple):
                object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"decoder layer_types has {len(self.layer_types)} entries "
                                 f"for {self.num_layers} layers")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"decoder layer_types: unknown {bad}; known {LAYER_TYPES}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("decoder layer_types has sliding layers but sliding_window "
                                 "is not set")
        if isinstance(self.lora, Mapping):
            object.__setattr__(self, "lora", LoraConfig(**self.lora))
        if not isinstance(self.eos_token_id, tuple):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        layers.activation(self.hidden_act)
        layers.remat_policy(self.remat_policy)

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it attend within the sliding window only."""
        if self.layer_types is None:
            return (False,) * self.num_layers
        return tuple(kind == "sliding_attention" for kind in self.layer_types)

    @property
    def has_sliding_layers(self) -> bool:
        return any(self.sliding_layers)

    @property
    def query_scale(self) -> float:
        """Factor on the attention logits q.k."""
        base = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
        return float(base) ** -0.5

