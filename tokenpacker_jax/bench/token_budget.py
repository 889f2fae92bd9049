"""Table 2: inference speed against the token budget, one LLM, 576 / 144 / 64 / 36 visual
tokens.

The same LLaMA-style decoder (``SIZES["full"]``: width 1024, 12 layers, vocabulary 32000,
about 220M parameters) behind the CLIP-L/14-336 tower, with LLaVA-1.5's MLP projector (all
576 patches) or TokenPacker at scale 2 / 3 / 4 (144 / 64 / 36 tokens). One prompt (batch 1)
of ``prompt_tokens`` text tokens (BOS first) plus the image's visual tokens, greedy, no stop
token, ``new_tokens`` generated. Random weights: speed does not depend on them.

Measured, each the median of ``runs`` calls of compiled programs:

- LLM prefill: the decoder alone over the prompt's embeddings [1, T, H] (T = text + visual),
  filling a KV cache of T + new_tokens slots (``Decoder.prefill``, the decoder's layers as
  ``Generator`` runs them: unscanned on the CPU), the budgets timed in
  turns (``measurement.time_interleaved``: the target is a ratio of two of them);
- time to first token: tower + projector + splice + LLM prefill, ``generate.Generator``'s
  prefill program (what ``generate --json`` reports);
- decode tokens/s: ``Generator``'s decode loop, new_tokens steps / its time;
- peak memory: XLA's plan for the larger of the two programs (arguments, i.e. the weights
  and the cache, + outputs + temporaries).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tokenpacker_jax.bench import hardware, measurement, report
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.generate import Generator, SamplingConfig
from tokenpacker_jax.models import layers, mllm
from tokenpacker_jax.models.decoder import Decoder, DecoderConfig
from tokenpacker_jax.models.projectors import ProjectorConfig, num_output_tokens
from tokenpacker_jax.models.vision import VisionConfig

TARGET_PREFILL_SPEEDUP = 3.0  # LLM prefill at 144 tokens vs 576


@dataclasses.dataclass(frozen=True)
class Sizes:
    vision: dict  # VisionConfig fields (empty: CLIP-L/14-336)
    decoder: dict  # DecoderConfig fields
    embed_dim: int  # TokenPacker's internal width
    heads: int  # TokenPacker's attention heads
    scales: tuple[int, ...]  # TokenPacker budgets, beside the MLP at all patches
    prompt_tokens: int  # text tokens of the prompt, BOS included
    new_tokens: int  # tokens generated per timed call
    batch: int = 1


SIZES = {
    "full": Sizes(vision={}, decoder=dict(vocab_size=32000, width=1024, mlp_dim=2816,
                                          num_layers=12, num_heads=16, num_kv_heads=16,
                                          head_dim=64),
                  embed_dim=1024, heads=8, scales=(2, 3, 4), prompt_tokens=32, new_tokens=32),
    "tiny": Sizes(vision=dict(image_size=48, patch_size=4, width=32, mlp_dim=64, num_layers=2,
                              num_heads=2),
                  decoder=dict(vocab_size=256, width=64, mlp_dim=128, num_layers=1,
                               num_heads=2, num_kv_heads=2, head_dim=32),
                  embed_dim=32, heads=2, scales=(2,), prompt_tokens=8, new_tokens=4),
}

PAPER_LAYERS = (12, 16, 22, 23)  # docs/reference.md §1, for a 24-layer tower


def model_config(sizes: Sizes, projector: str, scale: int) -> mllm.MLLMConfig:
    """The MLLM at ``sizes`` with ``projector`` (``mlp2x_gelu`` takes scale 1)."""
    vision = VisionConfig(**sizes.vision)
    decoder = DecoderConfig(**sizes.decoder)
    # The paper's feature levels, moved proportionally for a shallower tower.
    multi = tuple(max(1, round(layer * vision.num_layers / 24)) for layer in PAPER_LAYERS)
    return mllm.MLLMConfig(
        vision=vision,
        projector=ProjectorConfig(name=projector, scale_factor=scale, out_dim=decoder.width,
                                  embed_dim=sizes.embed_dim, num_heads=sizes.heads),
        decoder=decoder, select_layer=-2, multi_layers=multi)


def prompt_batch(config: mllm.MLLMConfig, sizes: Sizes, seed: int = 0) -> dict[str, np.ndarray]:
    """A generation batch as ``generate`` builds one, without padding: the model inputs of
    ``batch.synthetic_batch`` (BOS, M visual positions, prompt_tokens - 1 random text ids;
    random pixels)."""
    visual = num_output_tokens(config.projector, config.vision.grid_size)
    dims = batch_lib.Dims.of_model(config, sizes.prompt_tokens + visual)
    generated = batch_lib.synthetic_batch(
        dims, sizes.batch, visual_tokens=visual, vocab_size=config.decoder.vocab_size,
        seed=seed, bos_id=config.decoder.bos_token_id or 1)
    return batch_lib.select(generated, batch_lib.PREFILL_INPUTS)


@dataclasses.dataclass(frozen=True)
class Row:
    projector: str
    visual_tokens: int
    length: int  # prompt tokens the LLM prefills
    llm_prefill_ms: float
    first_token_ms: float
    decode_tokens_per_s: float
    peak_mib: float
    weights_mib: float
    compile_s: float


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One budget's model with its programs compiled, ready to time."""

    config: mllm.MLLMConfig
    params: Any
    batch: dict[str, np.ndarray]  # the prompt (``prompt_batch``)
    generator: Generator  # compiled for ``batch``
    compile_s: float  # prefill + decode programs
    peak_bytes: int  # XLA's plan of the larger of the two


_PREPARED: dict[tuple, Prepared] = {}


def prepare(sizes: Sizes, projector: str, scale: int, seed: int = 0) -> Prepared:
    """The model at one budget, built and compiled once per process (Table 3 times the
    576-token one again, in turns with transformers)."""
    key = (repr(sizes), projector, scale, seed)
    if key not in _PREPARED:
        config = model_config(sizes, projector, scale)
        model = mllm.MultimodalLM(config)
        params = measurement.random_params(
            model, **batch_lib.example_inputs(batch_lib.Dims.of_model(config, 8)), seed=seed)
        batch = prompt_batch(config, sizes, seed)
        generator = Generator(model, params, stop_ids=[], pad_id=0,
                              sampling=SamplingConfig(max_new_tokens=sizes.new_tokens))
        start = time.perf_counter()
        # Compiles both programs ahead of the timed calls (Generator compiles once per shape).
        programs = generator._programs(batch, batch["input_ids"].shape[1] + sizes.new_tokens)
        compile_s = time.perf_counter() - start
        _PREPARED[key] = Prepared(config=config, params=params, batch=batch,
                                  generator=generator, compile_s=compile_s,
                                  peak_bytes=max(map(measurement.program_bytes, programs)))
    return _PREPARED[key]


def generation_speed(sizes: Sizes, results: list[dict[str, Any]]) -> tuple[float, float]:
    """(time to first token ms, decode tokens/s): medians over ``Generator`` results."""
    first_token = np.median([r["time_to_first_token_s"] for r in results])
    decode_s = np.median([r["decode_s"] for r in results])
    return 1e3 * first_token, sizes.batch * sizes.new_tokens / decode_s


def llm_prefill(sizes: Sizes, prepared: Prepared, seed: int = 0) -> Callable[[], Any]:
    """A call of the compiled decoder alone over random embeddings [B, T, W] of the
    budget's prompt length, filling a cache of T + new_tokens slots: the decoder as
    ``Generator`` runs it (on the CPU, its layers unscanned over per-layer weights)."""
    batch, generator = prepared.batch, prepared.generator
    length = batch["input_ids"].shape[1]
    config = generator.model.config.decoder
    decoder = Decoder(config)
    rng = np.random.default_rng(seed)
    embeds = jnp.asarray(rng.standard_normal((sizes.batch, length, config.width),
                                             np.float32))
    mask = jnp.asarray(batch["attention_mask"])
    weights = generator.params["decoder"]
    program, _ = measurement.compile_jit(
        lambda p, e, m: decoder.apply({"params": p}, inputs_embeds=e, attention_mask=m,
                                      max_length=length + sizes.new_tokens,
                                      method=Decoder.prefill),
        weights, embeds, mask)
    return lambda: program(weights, embeds, mask)


def measure(sizes: Sizes, projector: str, scale: int, runs: int, llm_prefill_ms: float,
            seed: int = 0) -> Row:
    """Ours at one token budget (see the module docstring for what is timed), with its
    LLM prefill time measured beforehand (``run`` times the budgets' in turns)."""
    prepared = prepare(sizes, projector, scale, seed)
    params, batch = prepared.params, prepared.batch
    prepared.generator(batch)  # warm-up
    first_token_ms, decode_per_s = generation_speed(
        sizes, [prepared.generator(batch) for _ in range(runs)])
    return Row(projector=projector, visual_tokens=int(batch["image_mask"].sum()) // sizes.batch,
               length=batch["input_ids"].shape[1], llm_prefill_ms=llm_prefill_ms,
               first_token_ms=first_token_ms, decode_tokens_per_s=decode_per_s,
               peak_mib=prepared.peak_bytes / measurement.MiB,
               weights_mib=_nbytes(params) / measurement.MiB, compile_s=prepared.compile_s)


def budgets(sizes: Sizes) -> list[tuple[str, int]]:
    """(projector, scale) of the table's rows: the MLP at all patches, then TokenPacker."""
    return [("mlp2x_gelu", 1)] + [("tokenpacker", s) for s in sizes.scales]


def _nbytes(tree: Any) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def describe(sizes: Sizes, params: Any) -> str:
    """One sentence naming the model the rows were measured on."""
    vision, decoder = VisionConfig(**sizes.vision), DecoderConfig(**sizes.decoder)
    return (f"tower: ViT {vision.num_layers} layers x {vision.width} at {vision.image_size} "
            f"px / {vision.patch_size} ({vision.grid_size ** 2} patches); LLM: LLaMA-style "
            f"decoder, {decoder.num_layers} layers x {decoder.width}, MLP {decoder.mlp_dim}, "
            f"{decoder.num_heads} heads, vocabulary {decoder.vocab_size}, "
            f"{layers.count_params(params['decoder']) / 1e6:.0f}M parameters; batch {sizes.batch}, "
            f"{sizes.prompt_tokens} text tokens + the visual tokens, {sizes.new_tokens} new "
            f"tokens (greedy, no stop token); float32")


def run(size: str = "full", runs: int = measurement.MIN_RUNS, log=print, *,
        sizes: Sizes | None = None) -> report.Section:
    """Measures every budget; returns the BENCHMARKS.md section."""
    sizes = sizes or SIZES[size]
    header = hardware.machine()
    # LLM prefill at every budget, in turns (the target is a ratio of two of them).
    prefill = measurement.time_interleaved(
        {f"{projector} {scale}": llm_prefill(sizes, prepare(sizes, projector, scale))
         for projector, scale in budgets(sizes)}, runs=runs)
    rows = []
    for projector, scale in budgets(sizes):
        row = measure(sizes, projector, scale, runs, prefill[f"{projector} {scale}"].ms)
        log(f"{projector} ({row.visual_tokens} tokens): LLM prefill {row.llm_prefill_ms:.1f} "
            f"ms, first token {row.first_token_ms:.1f} ms, "
            f"{row.decode_tokens_per_s:.1f} tokens/s")
        rows.append(row)
    base = rows[0]
    table = report.markdown_table(
        ["projector", "visual tokens", "prompt length", "LLM prefill ms",
         "prefill speed-up vs all patches", "time to first token ms",
         "decode tokens/s", "peak memory MiB (weights)", "compile s"],
        [[r.projector, r.visual_tokens, r.length, f"{r.llm_prefill_ms:.1f}",
          f"{base.llm_prefill_ms / r.llm_prefill_ms:.2f}x",
          f"{r.first_token_ms:.1f}", f"{r.decode_tokens_per_s:.1f}",
          f"{r.peak_mib:.0f} ({r.weights_mib:.0f})", f"{r.compile_s:.1f}"] for r in rows])
    lines = [
        f"`python -m tokenpacker_jax.bench token_budget` (`--sizes={size}`). Machine: "
        f"{header}.",
        "",
        f"Model: {describe(sizes, prepare(sizes, *budgets(sizes)[0]).params)}. Random "
        f"weights. Median of {runs} runs after a warm-up, compiled programs (compile time "
        "apart). LLM prefill: the decoder alone over the prompt's embeddings, its layers "
        "as `generate.Generator` runs them, the budgets timed in turns (one call of each "
        "per round); time to first token: tower + projector + LLM prefill "
        "(`generate.Generator`); peak memory: XLA's plan of the larger of the prefill and "
        "decode programs (weights, KV cache, temporaries).",
        "",
        table,
    ]
    target_row = next((r for r in rows[1:] if r.visual_tokens == base.visual_tokens // 4),
                      None)
    if target_row is not None:
        speedup = base.llm_prefill_ms / target_row.llm_prefill_ms
        lines += ["", "Target: LLM prefill at a quarter of the tokens "
                      f"({target_row.visual_tokens} vs {base.visual_tokens}) at least "
                      f"{TARGET_PREFILL_SPEEDUP:.0f}x faster ({speedup:.2f}x): "
                      f"{report.verdict(speedup >= TARGET_PREFILL_SPEEDUP)}"]
    return report.section("token_budget", "Inference speed against the token budget",
                          "\n".join(lines))
