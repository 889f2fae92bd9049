"""Table 3: ours against what people run today, transformers' PyTorch
``LlavaForConditionalGeneration``, at the same sizes with 576 visual tokens.

Both sides are the model of Table 2's first row (``token_budget.SIZES``: the CLIP-L/14-336
tower, LLaVA-1.5's MLP projector on all 576 patches, the ~220M-parameter LLaMA-style
decoder), random weights, float32, the same prompt layout ([BOS, 576 image tokens, 31 text
tokens]), greedy, no stop token, the same number of new tokens.

Theirs: ``model.generate`` under ``torch.inference_mode`` (transformers' default attention
implementation); time to first token = ``generate(max_new_tokens=1)``; decode tokens/s =
(new_tokens - 1) / (time of ``generate(max_new_tokens=new_tokens)`` - time to first token).
Ours: Table 2's model (``token_budget.prepare``, ``generate.Generator``: compiled prefill, then
a compiled decode loop of new_tokens steps). The two sides are timed in turns, one
generation of each per round (``measurement.time_interleaved``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from tokenpacker_jax.bench import hardware, measurement, report, token_budget

TARGET_DECODE_SPEEDUP = 1.5  # our decode tokens/s at least 1.5x transformers'


def hf_llava(config, image_seq_length: int) -> Any:
    """A random-weight transformers LlavaForConditionalGeneration of our ``MLLMConfig``'s
    sizes (mlp2x_gelu projector), eval mode, stop token disabled."""
    import torch  # noqa: PLC0415 (torch: optional, the PyTorch side of a comparison)
    from transformers import (  # noqa: PLC0415 (transformers: the PyTorch LLaVA)
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    v, d = config.vision, config.decoder
    vision = CLIPVisionConfig(
        hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
        num_channels=v.num_channels, hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps)
    text = LlamaConfig(
        vocab_size=d.vocab_size, hidden_size=d.width, intermediate_size=d.mlp_dim,
        num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads,
        num_key_value_heads=d.num_kv_heads, head_dim=d.head_dim, rms_norm_eps=d.norm_eps,
        rope_theta=d.rope_theta, max_position_embeddings=d.max_position_embeddings,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    llava = LlavaConfig(vision_config=vision, text_config=text,
                        image_token_index=d.vocab_size - 1, image_seq_length=image_seq_length,
                        projector_hidden_act="gelu", vision_feature_layer=config.select_layer,
                        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(llava).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@dataclasses.dataclass(frozen=True)
class Speed:
    first_token_ms: float
    decode_tokens_per_s: float


def hf_generate(config, batch: dict[str, np.ndarray]) -> tuple[Callable[[int], Any], str]:
    """(generate(new_tokens), attention implementation) of transformers' LLaVA of
    ``config``'s sizes on ``batch``'s prompt: ``model.generate``, greedy, exactly new_tokens."""
    import torch  # noqa: PLC0415 (torch: optional, the PyTorch side of a comparison)

    visual = int(batch["image_mask"][0].sum())
    device = hardware.torch_device()
    model = hf_llava(config, visual).to(device)
    ids = torch.from_numpy(np.where(batch["image_mask"], config.decoder.vocab_size - 1,
                                    batch["input_ids"]).astype(np.int64)).to(device)
    pixels = torch.from_numpy(
        batch["pixel_values"][:, 0].transpose(0, 3, 1, 2).copy()).to(device)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                  do_sample=False)

    def generate(new_tokens):
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"transformers generated {out.shape[1] - ids.shape[1]} tokens, "
                               f"expected {new_tokens}")
        return out

    return generate, model.config._attn_implementation


def measure(sizes: token_budget.Sizes, ours: token_budget.Prepared,
            runs: int) -> tuple[Speed, Speed, str]:
    """(ours, theirs, their attention implementation) on ``ours``' model and prompt, timed
    in turns: each round runs our generation, their ``generate(1)`` and their full
    ``generate`` once (see the module docstring)."""
    import torch  # noqa: PLC0415 (torch: optional, the PyTorch side of a comparison)

    generate, attention = hf_generate(ours.config, ours.batch)
    our_results = []
    with torch.inference_mode():
        timings = measurement.time_interleaved(
            {"ours": lambda: our_results.append(ours.generator(ours.batch)),
             "theirs first": lambda: generate(1),
             "theirs full": lambda: generate(sizes.new_tokens)}, runs=runs, warmup=2)
    first_ms, decode_per_s = token_budget.generation_speed(sizes, our_results[-runs:])
    first, full = timings["theirs first"], timings["theirs full"]
    decode_s = max(full.median - first.median, 1e-9)
    theirs = Speed(first_token_ms=first.ms,
                   decode_tokens_per_s=sizes.batch * (sizes.new_tokens - 1) / decode_s)
    return Speed(first_ms, decode_per_s), theirs, attention


def run(size: str = "full", runs: int = measurement.MIN_RUNS, log=print, *,
        sizes: token_budget.Sizes | None = None) -> report.Section:
    """Both sides at 576 tokens; returns the BENCHMARKS.md section."""
    sizes = sizes or token_budget.SIZES[size]
    header = hardware.machine(torch_threads=True)
    prepared = token_budget.prepare(sizes, "mlp2x_gelu", 1)
    visual = int(prepared.batch["image_mask"][0].sum())
    ours, theirs, attention = measure(sizes, prepared, runs)
    log(f"transformers: first token {theirs.first_token_ms:.1f} ms, "
        f"{theirs.decode_tokens_per_s:.1f} tokens/s")
    log(f"ours: first token {ours.first_token_ms:.1f} ms, "
        f"{ours.decode_tokens_per_s:.1f} tokens/s")
    speedup = ours.decode_tokens_per_s / theirs.decode_tokens_per_s
    table = report.markdown_table(
        ["implementation", "visual tokens", "time to first token ms", "decode tokens/s",
         "decode speed-up"],
        [[f"transformers LlavaForConditionalGeneration (PyTorch eager, "
          f"{attention} attention)", visual,
          f"{theirs.first_token_ms:.1f}", f"{theirs.decode_tokens_per_s:.1f}", "1.00x"],
         ["ours (JAX, `generate.Generator`)", visual,
          f"{ours.first_token_ms:.1f}", f"{ours.decode_tokens_per_s:.1f}", f"{speedup:.2f}x"]])
    body = "\n".join([
        f"`python -m tokenpacker_jax.bench llava_torch` (`--sizes={size}`). Machine: "
        f"{header}.",
        "",
        f"Model (both): {token_budget.describe(sizes, prepared.params)}; LLaVA-1.5 MLP "
        f"projector. Random weights. Median of {runs} runs after warm-up, the two sides in "
        "turns (one generation of each per round). Theirs: `generate` under "
        "`torch.inference_mode`, time to first token = `generate(max_new_tokens=1)`, decode "
        "= the remaining tokens over the extra time of the full `generate`. Ours: compiled "
        "prefill and decode loop (compile time excluded, see the table above).",
        "",
        table,
        "",
        f"Target: our decode at least {TARGET_DECODE_SPEEDUP}x theirs "
        f"({speedup:.2f}x): {report.verdict(speedup >= TARGET_DECODE_SPEEDUP)}",
    ])
    return report.section("llava_torch", "Against transformers' PyTorch LLaVA", body)
