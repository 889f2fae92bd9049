"""A LoRA decoder's adapters in PEFT's format, and its base in the plain layout.

``save_peft_adapter`` writes ``adapter_config.json`` and ``adapter_model.safetensors`` so
that ``peft.PeftModel.from_pretrained(model, DIR)`` puts them on the transformers LLaMA /
Gemma model that ``hf.save_decoder`` wrote from ``base_params``: keys
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` [rank, in] and
``...lora_B.weight`` [out, rank], the module names being the transformers ones (which our
dense layers share). Nothing here needs PEFT itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenpacker_jax.convert import checkpoint_io, hf_decoder, mapping
from tokenpacker_jax.models import lora as lora_lib
from tokenpacker_jax.models.decoder_config import DecoderConfig

PEFT_PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def adapter_table(config: DecoderConfig) -> list[mapping.Rule]:
    """Our adapter paths <-> PEFT keys (without ``PEFT_PREFIX``) for every adapted layer
    of ``config`` (whose ``lora`` must be set)."""
    if config.lora is None:
        raise ValueError("the decoder has no LoRA adapters (its lora config is None)")
    table = []
    for rule in hf_decoder.decoder_table(config):
        module = rule.ours[-2] if len(rule.ours) > 1 else None
        if rule.ours[-1] != "kernel" or not config.lora.applies_to(module):
            continue
        stem = rule.torch_key.removesuffix(".weight")
        table.append(mapping.Rule(rule.ours[:-1] + ("lora_a",), f"{stem}.lora_A.weight",
                                  rule.transform))
        table.append(mapping.Rule(rule.ours[:-1] + ("lora_b",), f"{stem}.lora_B.weight",
                                  mapping.LINEAR))
    return table


def target_modules(config: DecoderConfig) -> list[str]:
    """The transformers module names that carry adapters (PEFT's ``target_modules``)."""
    return sorted({rule.ours[-2] for rule in adapter_table(config)})


def peft_config(config: DecoderConfig, base_model: str | None = None) -> dict[str, Any]:
    """``adapter_config.json`` of PEFT's LoRA for ``config.lora``."""
    lora = config.lora
    if lora is None:
        raise ValueError("the decoder has no LoRA adapters (its lora config is None)")
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "inference_mode": True, "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "target_modules": target_modules(config),
        "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def save_peft_adapter(config: DecoderConfig, params: Any, out: str | os.PathLike, *,
                      base_model: str | None = None, dtype: Any = None) -> None:
    """Writes the adapters of ``params`` (a LoRA decoder's) into ``out`` for PEFT."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = mapping.export_params(adapter_table(config), params,
                                    num_layers=config.num_layers, dtype=dtype)
    checkpoint_io.write_safetensors(((PEFT_PREFIX + key, value) for key, value in tensors),
                                    out, max_shard_bytes=2**62)
    os.replace(out / checkpoint_io.SAFETENSORS_SINGLE, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(peft_config(config, base_model), indent=2))


def base_params(params: Any, config: DecoderConfig) -> dict:
    """The decoder's parameters without adapters, quantised kernels dequantised (to the
    adapters' dtype): the layout of the same decoder with ``lora=None``."""
    if config.lora is None:
        return params
    return lora_lib.merge(params, config.lora, fold=False)
