"""LLaMA / Gemma decoders: HF config.json <-> DecoderConfig, and the weight name tables.

Families: LLaMA-2 / Vicuna and LLaMA-3.x (``llama``; also the reference LLaVA / TokenPacker
``llava_llama``), Gemma 1 (``gemma``), Gemma 2 (``gemma2``) and Gemma 3 text
(``gemma3_text``, or the text part of a multimodal ``gemma3`` config).

Both config.json layouts are read: transformers 4.x (``rope_theta`` + ``rope_scaling``, as in
the released Vicuna-1.5, LLaMA-3.x and Gemma checkpoints) and 5.x (``rope_parameters``);
``decoder_config_to_hf`` writes either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenpacker_jax.convert.mapping import FLAT, IDENTITY, LINEAR, LINEAR_IN2, RenamedKeys, Rule
from tokenpacker_jax.models.decoder_config import DecoderConfig
from tokenpacker_jax.user_error import CheckpointError

# model_type -> family. ``llava_llama`` is the reference LLaVA / TokenPacker checkpoint: a
# LLaMA config with extra multimodal fields, whose LLM keys are the LLaMA keys.
FAMILY_OF_MODEL_TYPE = {"llama": "llama", "llava_llama": "llama", "gemma": "gemma",
                        "gemma2": "gemma2", "gemma3_text": "gemma3"}
# A multimodal model_type -> the model_type of its LLM (``text_config``).
TEXT_MODEL_TYPE = {"gemma3": "gemma3_text"}
_ARCHITECTURE = {"llama": "LlamaForCausalLM", "gemma": "GemmaForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
_MODEL_TYPE = {"llama": "llama", "gemma": "gemma", "gemma2": "gemma2",
               "gemma3": "gemma3_text"}

# Defaults of transformers' config classes, for config.json files listing only some values.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_theta=10000.0, attention_bias=False, mlp_bias=False, bos_token_id=1,
                  eos_token_id=2, pad_token_id=None),
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                  head_dim=256, hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10000.0,
                  attention_bias=False, bos_token_id=2, eos_token_id=1, pad_token_id=0),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, hidden_activation="gelu_pytorch_tanh",
                   max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True,
                   rope_theta=10000.0, attention_bias=False, query_pre_attn_scalar=256,
                   sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0, bos_token_id=2, eos_token_id=1,
                   pad_token_id=0),
    "gemma3": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, hidden_activation="gelu_pytorch_tanh",
                   max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=True,
                   rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, attention_bias=False,
                   query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                   final_logit_softcapping=None, attn_logit_softcapping=None, bos_token_id=2,
                   eos_token_id=1, pad_token_id=0),
}

# What each family's architecture fixes (checked on export so a config that mixes the
# families cannot be written under a model_type that would run it differently).
_FAMILY_TRAITS = {
    "llama": dict(norm_plus_one=False, scale_embeddings=False, post_norms=False,
                  attn_logit_softcap=None, final_logit_softcap=None, layer_types=None,
                  query_pre_attn_scalar=None, qk_norm=False, rope_local_theta=None),
    "gemma": dict(norm_plus_one=True, scale_embeddings=True, post_norms=False,
                  attn_logit_softcap=None, final_logit_softcap=None, layer_types=None,
                  query_pre_attn_scalar=None, attention_bias=False, qk_norm=False,
                  rope_local_theta=None),
    "gemma2": dict(norm_plus_one=True, scale_embeddings=True, post_norms=True,
                   attention_bias=False, mlp_bias=False, qk_norm=False, rope_local_theta=None),
    "gemma3": dict(norm_plus_one=True, scale_embeddings=True, post_norms=True, qk_norm=True,
                   attention_bias=False, mlp_bias=False),
}


def family_of_model_type(model_type: str | None) -> str | None:
    """Our decoder family of a config.json ``model_type`` (a multimodal one's: its LLM's), or
    None for an unknown one."""
    return FAMILY_OF_MODEL_TYPE.get(TEXT_MODEL_TYPE.get(model_type, model_type))


def _rope_from_hf(values: Mapping[str, Any], family: str) -> dict[str, Any]:
    """Our rope_* fields from either layout."""
    params = values.get("rope_parameters")
    local = None
    if params is None:  # transformers 4.x
        params = dict(values.get("rope_scaling") or {})
        params.setdefault("rope_theta", values.get("rope_theta", 10000.0))
        if family == "gemma3":
            local = {"rope_type": "default", "rope_theta": values["rope_local_base_freq"]}
    else:
        params = dict(params)
        if family == "gemma3":  # 5.x: one entry per layer type
            local = dict(params.get("sliding_attention") or {})
            local.setdefault("rope_theta", values["rope_local_base_freq"])
            params = dict(params.get("full_attention") or {})
        elif any(isinstance(v, Mapping) for v in params.values()):
            raise CheckpointError("config.json: per-layer-type rope_parameters are not supported "
                                  f"for {family} ({sorted(params)})")
        params.setdefault("rope_theta", values.get("rope_theta", 10000.0))
    out = _one_rope(params, values)
    if local is not None:
        if local.get("rope_type", local.get("type", "default")) != "default":
            raise CheckpointError(f"config.json: scaled RoPE on sliding layers ({local}) is not "
                                  "supported")
        out["rope_local_theta"] = float(local["rope_theta"])
    return out


def _one_rope(params: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    rope_type = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = dict(rope_theta=float(params["rope_theta"]), rope_type=rope_type)
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
        out["rope_original_max_position"] = int(params.get(
            "original_max_position_embeddings", values["max_position_embeddings"]))
    if rope_type not in ("default", "linear", "llama3"):
        raise CheckpointError(f"config.json: rope type {rope_type!r} is not supported "
                              "(default, linear, llama3)")
    return out


def _eos_tuple(eos: Any) -> tuple[int, ...]:
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def decoder_config_from_hf(hf_config: Mapping[str, Any], **overrides) -> DecoderConfig:
    """Our DecoderConfig from a LLaMA / Gemma / Gemma 2 ``config.json`` (4.x or 5.x)."""
    model_type = hf_config.get("model_type")
    if model_type in TEXT_MODEL_TYPE and "text_config" in hf_config:  # multimodal: its LLM
        model_type = TEXT_MODEL_TYPE[model_type]
        hf_config = {"model_type": model_type, **hf_config["text_config"]}
    if model_type not in FAMILY_OF_MODEL_TYPE:
        raise CheckpointError(f"config.json: model_type {model_type!r} is not a supported decoder "
                              f"(expected one of {sorted(FAMILY_OF_MODEL_TYPE)})")
    family = FAMILY_OF_MODEL_TYPE[model_type]
    # None is a real value for some keys (pad_token_id, soft-capping off), so no filtering.
    v = {**_HF_DEFAULTS[family], **hf_config}
    heads = int(v["num_attention_heads"])
    head_dim = v.get("head_dim") or int(v["hidden_size"]) // heads
    if family == "llama":
        act = v["hidden_act"]
    else:
        # Gemma 1 configs say "gelu" meaning the tanh approximation (transformers maps it so).
        act = v.get("hidden_activation") or v.get("hidden_act") or "gelu_pytorch_tanh"
        act = "gelu_pytorch_tanh" if act == "gelu" else act
    fields: dict[str, Any] = dict(
        family=family,
        vocab_size=int(v["vocab_size"]),
        width=int(v["hidden_size"]),
        mlp_dim=int(v["intermediate_size"]),
        num_layers=int(v["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(v.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        hidden_act=str(act),
        norm_eps=float(v["rms_norm_eps"]),
        tie_embeddings=bool(v["tie_word_embeddings"]),
        attention_bias=bool(v.get("attention_bias", False)),
        mlp_bias=bool(v.get("mlp_bias", False)),
        max_position_embeddings=int(v["max_position_embeddings"]),
        bos_token_id=v.get("bos_token_id"),
        eos_token_id=_eos_tuple(v.get("eos_token_id")),
        pad_token_id=v.get("pad_token_id"),
        **_rope_from_hf(v, family),
    )
    if family != "llama":
        fields.update(norm_plus_one=True, scale_embeddings=True)
    if family in ("gemma2", "gemma3"):
        if v.get("use_bidirectional_attention"):
            raise CheckpointError("config.json: use_bidirectional_attention (embedding models) is "
                                  "not supported")
        num_layers = fields["num_layers"]
        # Gemma 2 alternates from a sliding layer 0; Gemma 3 repeats 5 sliding + 1 global.
        pattern = 2 if family == "gemma2" else int(v.get("sliding_window_pattern") or 6)
        layer_types = v.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention"
            for i in range(num_layers)]
        softcap = v.get("attn_logit_softcapping")
        final_softcap = v.get("final_logit_softcapping")
        fields.update(
            post_norms=True,
            query_pre_attn_scalar=float(v["query_pre_attn_scalar"]),
            attn_logit_softcap=None if softcap is None else float(softcap),
            final_logit_softcap=None if final_softcap is None else float(final_softcap),
            sliding_window=int(v["sliding_window"]),
            layer_types=tuple(layer_types),
            qk_norm=family == "gemma3",
        )
    fields.update(overrides)
    return DecoderConfig(**fields)


def _check_family(config: DecoderConfig) -> None:
    wrong = {name: getattr(config, name) for name, value in _FAMILY_TRAITS[config.family].items()
             if getattr(config, name) != value}
    if config.family == "gemma3" and config.rope_local_theta is None:
        wrong["rope_local_theta"] = None
    if wrong:
        raise ValueError(f"decoder config of family {config.family!r} has {wrong}, which a "
                         f"{_ARCHITECTURE[config.family]} cannot express")


def _int_if_integral(value: float | None) -> float | int | None:
    """transformers 5 validates query_pre_attn_scalar as an int."""
    return int(value) if value is not None and float(value).is_integer() else value


def decoder_config_to_hf(config: DecoderConfig, layout: str = "5") -> dict[str, Any]:
    """A ``config.json`` dict for ``config``: layout "5" (``rope_parameters``) or "4"
    (``rope_theta`` + ``rope_scaling``). transformers 5 reads both."""
    if layout not in ("4", "5"):
        raise ValueError(f"config.json layout must be '4' or '5', got {layout!r}")
    _check_family(config)
    eos = list(config.eos_token_id)
    out: dict[str, Any] = dict(
        architectures=[_ARCHITECTURE[config.family]],
        model_type=_MODEL_TYPE[config.family],
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=config.mlp_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=config.attention_bias,
        attention_dropout=0.0,
        bos_token_id=config.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
        pad_token_id=config.pad_token_id,
        use_cache=True,
    )
    if config.family == "llama":
        out.update(hidden_act=config.hidden_act, mlp_bias=config.mlp_bias)
    elif config.family == "gemma":
        out.update(hidden_act=config.hidden_act)
        if layout == "4":
            out.update(hidden_activation=config.hidden_act)
    else:
        out.update(hidden_activation=config.hidden_act,
                   query_pre_attn_scalar=_int_if_integral(config.query_pre_attn_scalar),
                   sliding_window=config.sliding_window,
                   layer_types=list(config.layer_types or ()),
                   attn_logit_softcapping=config.attn_logit_softcap,
                   final_logit_softcapping=config.final_logit_softcap)
        if layout == "4":
            out.update(hidden_act=config.hidden_act)
        if config.family == "gemma3":
            out.update(use_bidirectional_attention=False)
    rope: dict[str, Any] = {}
    if config.rope_type in ("linear", "llama3"):
        rope["factor"] = config.rope_factor
    if config.rope_type == "llama3":
        rope.update(low_freq_factor=config.rope_low_freq_factor,
                    high_freq_factor=config.rope_high_freq_factor,
                    original_max_position_embeddings=config.rope_original_max_position)
    if layout == "5":
        out["rope_parameters"] = dict(rope_type=config.rope_type,
                                      rope_theta=config.rope_theta, **rope)
        if config.family == "gemma3":
            out["rope_parameters"] = {
                "full_attention": out["rope_parameters"],
                "sliding_attention": dict(rope_type="default",
                                          rope_theta=config.rope_local_theta)}
    else:
        out["rope_theta"] = config.rope_theta
        out["rope_scaling"] = dict(rope_type=config.rope_type, **rope) if rope else None
        if config.family == "gemma3":
            out["rope_local_base_freq"] = config.rope_local_theta
    return out


def decoder_table(config: DecoderConfig) -> list[Rule]:
    """Our parameter path <-> HF ``*ForCausalLM`` key, for the config's family."""
    layer = "model.layers.{i}."
    ours = ("layers",)
    table = [
        Rule(("embedder", "embedding"), "model.embed_tokens.weight", IDENTITY),
        Rule(("final_norm", "scale"), "model.norm.weight", IDENTITY),
    ]
    if not config.tie_embeddings:
        table.append(Rule(("lm_head", "kernel"), "lm_head.weight", LINEAR))
    for proj in ("q_proj", "k_proj", "v_proj"):
        table.append(Rule((*ours, "attn", proj, "kernel"), f"{layer}self_attn.{proj}.weight",
                          LINEAR))
        if config.attention_bias:
            table.append(Rule((*ours, "attn", proj, "bias"), f"{layer}self_attn.{proj}.bias",
                              FLAT))
    table.append(Rule((*ours, "attn", "o_proj", "kernel"), f"{layer}self_attn.o_proj.weight",
                      LINEAR_IN2))
    if config.attention_bias:
        table.append(Rule((*ours, "attn", "o_proj", "bias"), f"{layer}self_attn.o_proj.bias"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        table.append(Rule((*ours, "mlp", proj, "kernel"), f"{layer}mlp.{proj}.weight", LINEAR))
        if config.mlp_bias:
            table.append(Rule((*ours, "mlp", proj, "bias"), f"{layer}mlp.{proj}.bias"))
    if config.qk_norm:
        table += [Rule((*ours, "attn", f"{x}_norm", "scale"), f"{layer}self_attn.{x}_norm.weight")
                  for x in ("q", "k")]
    if config.post_norms:
        norms = {"pre_attention_norm": "input_layernorm",
                 "post_attention_norm": "post_attention_layernorm",
                 "pre_mlp_norm": "pre_feedforward_layernorm",
                 "post_mlp_norm": "post_feedforward_layernorm"}
    else:
        # LLaMA's "post_attention_layernorm" is the norm in front of the MLP.
        norms = {"pre_attention_norm": "input_layernorm",
                 "pre_mlp_norm": "post_attention_layernorm"}
    for our_name, hf_name in norms.items():
        table.append(Rule((*ours, our_name, "scale"), f"{layer}{hf_name}.weight"))
    return table


# Where the LLM's keys sit in the checkpoints we read: *ForCausalLM ("model." + "lm_head."),
# a bare *Model (no prefix, no head), transformers 5 multimodal models
# ("model.language_model."), and older nestings ("language_model.model.").
_BODY_PREFIXES = ("model.", "", "model.language_model.", "language_model.model.")
_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")
_BODY_PARTS = ("embed_tokens.", "layers.", "norm.")


class DecoderKeys(RenamedKeys):
    """View of a checkpoint under the ``*ForCausalLM`` key names of the table.

    Keeps only the LLM's keys: multimodal checkpoints (reference LLaVA / TokenPacker) also
    hold the vision tower and projector, which other loaders read. Dropped as well: RoPE
    ``inv_freq`` buffers (older ``.bin`` files) and the output head of tied models.
    """

    def __init__(self, state: Mapping, config: DecoderConfig):
        prefix = next((p for p in _BODY_PREFIXES if f"{p}embed_tokens.weight" in state), None)
        if prefix is None:
            raise CheckpointError("checkpoint has no token embedding (looked for "
                                  f"{[p + 'embed_tokens.weight' for p in _BODY_PREFIXES]})")
        names: dict[str, str] = {}
        for key in state:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            if key in _HEAD_KEYS:
                if not config.tie_embeddings:
                    names["lm_head.weight"] = key
                continue
            if key.startswith(prefix) and key[len(prefix):].startswith(_BODY_PARTS):
                names["model." + key[len(prefix):]] = key
        super().__init__(state, names)
