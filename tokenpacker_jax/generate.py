"""Answering questions about images with a trained checkpoint: prompts, KV-cache decoding.

    python -m tokenpacker_jax.generate --checkpoint=WORKDIR --image=FILE --prompt=TEXT

The prompt is wrapped as the reference's evaluation does: ``<image>`` + newline + prompt as
the user turn of the checkpoint's conversation template, ending where the assistant's answer
begins. Prompts of a batch are LEFT-padded (the decoder's KV-cache convention), prefilled
once, then decoded one token per step on the device until every row has stopped (EOS or a
template stop token) or ``max_new_tokens``; greedy at temperature 0, else sampled with
optional top-k / top-p.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tokenpacker_jax.data.conversation import IMAGE_PLACEHOLDER, ImageSlot, Turn
from tokenpacker_jax.data.example import ExampleBuilder
from tokenpacker_jax.models import mllm


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut


@dataclasses.dataclass
class Prompt:
    """One tokenized prompt: ids with pad at visual positions, and its image arrays."""

    ids: np.ndarray  # int32 [L]
    image_mask: np.ndarray  # bool [L]
    pixel_values: np.ndarray  # float32 [N, S, S, 3]
    tile_mask: np.ndarray  # bool [N]


def build_prompt(builder: ExampleBuilder, question: str, image: Any | None) -> Prompt:
    """The generation prompt for ``question`` (about ``image``, a PIL image, if given).

    The template renders a one-turn conversation; everything from the first supervised
    segment of the answer on is dropped, so the prompt ends where the answer would begin.
    """
    text = f"{IMAGE_PLACEHOLDER}\n{question}" if image is not None else question
    template = builder.conversation.template
    segments = template.segments([Turn("human", text), Turn("gpt", "")])
    first_answer = next(i for i, s in enumerate(segments) if getattr(s, "supervised", False))
    segments = segments[:first_answer]
    tokens = builder.conversation.tokenize_segments(segments)
    ids = np.asarray(tokens.ids, np.int64)
    visual = np.zeros(len(ids), bool)
    pixels, tile_mask = builder._empty_pixels()
    if image is not None:
        if not any(isinstance(s, ImageSlot) for s in segments):
            raise ValueError(f"template {template.name!r} put no image slot in the prompt")
        pixels, tile_mask, span_ids, span_visual = builder.image_tiles(image)
        slot = int(np.flatnonzero(ids < 0)[0])
        ids = np.concatenate([ids[:slot], span_ids, ids[slot + 1:]])
        visual = np.concatenate([visual[:slot], span_visual, visual[slot + 1:]])
    return Prompt(ids.astype(np.int32), visual, pixels, tile_mask)


def left_pad(prompts: Sequence[Prompt], pad_id: int, length: int | None = None
             ) -> dict[str, np.ndarray]:
    """A batch of prompts, left-padded to ``length`` (default: the longest)."""
    length = length or max(len(p.ids) for p in prompts)
    batch = len(prompts)
    ids = np.full((batch, length), pad_id, np.int32)
    image_mask = np.zeros((batch, length), bool)
    attention = np.zeros((batch, length), np.int32)
    for row, prompt in enumerate(prompts):
        n = len(prompt.ids)
        if n > length:
            raise ValueError(f"prompt of {n} tokens is longer than the bucket {length}")
        ids[row, length - n:] = prompt.ids
        image_mask[row, length - n:] = prompt.image_mask
        attention[row, length - n:] = 1
    return dict(input_ids=ids, image_mask=image_mask, attention_mask=attention,
                pixel_values=np.stack([p.pixel_values for p in prompts]))


def bucket_length(length: int, multiple: int = 64) -> int:
    """Prompt lengths are rounded up so that one compile serves many prompts."""
    return -(-length // multiple) * multiple


def _choose(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    if sampling.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        order = jnp.sort(logits, axis=-1)[..., ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(order, axis=-1), axis=-1)
        # The smallest set whose mass reaches top_p: keep logits >= the cut-off logit.
        cut_index = jnp.sum(cumulative < sampling.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(order, cut_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Generator:
    """Compiled prefill + decode loop for one model; one compile per (batch, length)."""

    def __init__(self, model: mllm.MultimodalLM, params: Any, stop_ids: Sequence[int],
                 pad_id: int, sampling: SamplingConfig = SamplingConfig()):
        self.model, self.params = model, params
        self.stop_ids = jnp.asarray(sorted(set(stop_ids)), jnp.int32)
        self.pad_id = pad_id
        self.sampling = sampling

    @functools.partial(jax.jit, static_argnums=(0, 3))
    def _prefill(self, params, inputs, max_length):
        return self.model.apply({"params": params}, **inputs, max_length=max_length,
                                method=mllm.MultimodalLM.prefill)

    @functools.partial(jax.jit, static_argnums=(0,))
    def _decode(self, params, logits, cache, key):
        steps = self.sampling.max_new_tokens
        batch = logits.shape[0]

        def body(carry):
            step, logits, cache, key, tokens, done = carry
            key, sample_key = jax.random.split(key)
            token = _choose(logits, sample_key, self.sampling)
            token = jnp.where(done, self.pad_id, token)
            tokens = tokens.at[:, step].set(token)
            done = done | jnp.isin(token, self.stop_ids)
            logits, cache = self.model.apply({"params": params}, token, cache,
                                             method=mllm.MultimodalLM.decode_step)
            return step + 1, logits, cache, key, tokens, done

        def cond(carry):
            step, *_, done = carry
            return (step < steps) & ~jnp.all(done)

        tokens = jnp.full((batch, steps), self.pad_id, jnp.int32)
        init = (jnp.int32(0), logits, cache, key, tokens, jnp.zeros(batch, bool))
        return jax.lax.while_loop(cond, body, init)[4]

    def __call__(self, batch: dict[str, np.ndarray], seed: int = 0) -> dict[str, Any]:
        """Left-padded prompts -> generated ids [B, max_new_tokens] (pad after stopping),
        with the prefill time (time to first token) and decode tokens/s."""
        length = batch["input_ids"].shape[1]
        max_length = length + self.sampling.max_new_tokens
        start = time.perf_counter()
        logits, cache = self._prefill(self.params, batch, max_length)
        logits.block_until_ready()
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        tokens = np.asarray(self._decode(self.params, logits, cache, jax.random.key(seed)))
        decode_s = time.perf_counter() - start
        return {"tokens": tokens, "time_to_first_token_s": prefill_s,
                "decode_s": decode_s}

    def strip(self, tokens: np.ndarray) -> list[list[int]]:
        """Per row: the ids up to (not including) the first stop token."""
        stops = set(np.asarray(self.stop_ids).tolist())
        out = []
        for row in tokens.tolist():
            kept = []
            for token in row:
                if token in stops:
                    break
                kept.append(token)
            out.append(kept)
        return out


def answer(generator: Generator, builder: ExampleBuilder, tokenizer: Any,
           questions: Sequence[tuple[str, Any]], bucket: int = 64) -> list[dict[str, Any]]:
    """Answers (question, image) pairs in one batch; returns dicts with text, token_ids and
    timings."""
    prompts = [build_prompt(builder, question, image) for question, image in questions]
    length = bucket_length(max(len(p.ids) for p in prompts), bucket)
    result = generator(left_pad(prompts, generator.pad_id, length))
    rows = generator.strip(result["tokens"])
    out = []
    for ids in rows:
        per_s = len(ids) / result["decode_s"] if result["decode_s"] > 0 else 0.0
        out.append({"text": tokenizer.decode(ids).strip(), "token_ids": ids,
                    "time_to_first_token_s": result["time_to_first_token_s"],
                    "tokens_per_s": per_s})
    return out


def to_json(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False)
