"""Answering questions about images with a trained checkpoint: prompts, KV-cache decoding.

    python -m tokenpacker_jax.generate --checkpoint=WORKDIR --image=FILE --prompt=TEXT

The prompt (``data/prompt.py``) is the user turn of the checkpoint's conversation template,
ending where the assistant's answer begins. With an image, the turn is what training makes of
a turn holding ``<image>`` (``conversation.place_image``): ``<image>``, newline, the question
stripped; just ``<image>`` for an empty question. For a question without surrounding
whitespace this is the reference's evaluation prompt, ``<image>`` + newline + question; its
evaluation scripts keep surrounding whitespace, and for an empty question leave ``<image>`` +
newline, a turn its training never produces. Prompts of a batch are LEFT-padded (the
decoder's KV-cache convention), prefilled once, then decoded one token per step on the device
until every row has stopped (EOS or a template stop token) or ``max_new_tokens``; greedy at
temperature 0, else sampled with optional top-k / top-p.
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
from absl import flags, logging

from tokenpacker_jax import user_error
from tokenpacker_jax.assembly import load_trained
from tokenpacker_jax.data.example import ExampleBuilder, example_builder
from tokenpacker_jax.data.image import load_image
from tokenpacker_jax.data.prompt import build_prompt, left_pad
from tokenpacker_jax.models import mllm
from tokenpacker_jax.models.decoder import unstack_layers


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut


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


def unscanned(model: mllm.MultimodalLM, params: Any) -> tuple[mllm.MultimodalLM, Any]:
    """The same model with ``decoder.scan_layers=False`` and its parameters in that layout
    (the decoder's layer stack split per layer; nothing else changes)."""
    config = model.config
    decoder = dataclasses.replace(config.decoder, scan_layers=False)
    params = {**params, "decoder": unstack_layers(params["decoder"], decoder.num_layers)}
    return mllm.MultimodalLM(dataclasses.replace(config, decoder=decoder)), params


class Generator:
    """Compiled prefill + decode loop for one model; one compile per (batch, length) bucket,
    done before timing so the reported latencies are those of the compiled programs."""

    def __init__(self, model: mllm.MultimodalLM, params: Any, stop_ids: Sequence[int],
                 pad_id: int, sampling: SamplingConfig = SamplingConfig(),
                 unstack_layers: bool | None = None):
        """``unstack_layers``: run the decoder's layers as separate modules over per-layer
        weights (split once here, a copy of the decoder's weights) rather than scanned over
        the stack; default: on the CPU, where XLA copies each scanned layer's weight slice
        at every decoding step (BENCHMARKS.md, "Against transformers' PyTorch LLaVA")."""
        if unstack_layers is None:
            unstack_layers = jax.default_backend() == "cpu"
        if unstack_layers and model.config.decoder.scan_layers:
            model, params = unscanned(model, params)
        self.model, self.params = model, params
        self.stop_ids = jnp.asarray(sorted(set(stop_ids)), jnp.int32)
        self.pad_id = pad_id
        self.sampling = sampling
        self._compiled: dict[tuple, tuple[Any, Any]] = {}

    def _prefill(self, params, inputs, max_length):
        return self.model.apply({"params": params}, **inputs, max_length=max_length,
                                method=mllm.MultimodalLM.prefill)

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

        if not self.model.config.decoder.scan_layers:
            cache = cache.per_layer()  # updated in place by each step (see per_layer)
        tokens = jnp.full((batch, steps), self.pad_id, jnp.int32)
        init = (jnp.int32(0), logits, cache, key, tokens, jnp.zeros(batch, bool))
        return jax.lax.while_loop(cond, body, init)[4]

    def _programs(self, batch: dict[str, np.ndarray], max_length: int):
        shapes = tuple((k, v.shape) for k, v in sorted(batch.items()))
        if shapes not in self._compiled:
            prefill = jax.jit(self._prefill, static_argnums=2).lower(
                self.params, batch, max_length).compile()
            logits, cache = jax.eval_shape(
                functools.partial(self._prefill, max_length=max_length), self.params, batch)
            decode = jax.jit(self._decode).lower(self.params, logits, cache,
                                                 jax.random.key(0)).compile()
            self._compiled[shapes] = (prefill, decode)
        return self._compiled[shapes]

    def __call__(self, batch: dict[str, np.ndarray], seed: int = 0) -> dict[str, Any]:
        """Left-padded prompts -> generated ids [B, max_new_tokens] (pad after stopping),
        with the prefill time (time to first token) and the decode time."""
        length = batch["input_ids"].shape[1]
        prefill, decode = self._programs(batch, length + self.sampling.max_new_tokens)
        start = time.perf_counter()
        logits, cache = prefill(self.params, batch)
        logits.block_until_ready()
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        tokens = np.asarray(decode(self.params, logits, cache, jax.random.key(seed)))
        decode_s = time.perf_counter() - start
        return {"tokens": tokens, "time_to_first_token_s": prefill_s, "decode_s": decode_s}

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


def main(argv):
    del argv
    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if f.image and len(f.image) not in (1, len(f.prompt)):
        raise flags.ValidationError("--image: give one image, or one per --prompt")
    images = [load_image(path) for path in f.image] if f.image else [None]  # before the model
    trained = load_trained(f.checkpoint)
    sampling = SamplingConfig(max_new_tokens=f.max_new_tokens, temperature=f.temperature,
                              top_k=f.top_k, top_p=f.top_p)
    generator = Generator(trained.model, trained.params, trained.tokenizer.stop_ids,
                          trained.tokenizer.pad_id, sampling)
    builder = example_builder(trained.config.data, trained.tokenizer, trained.tokens_per_tile)
    if len(images) == 1:
        images = images * len(f.prompt)
    questions = list(zip(f.prompt, images, strict=True))
    results = answer(generator, builder, trained.tokenizer, questions)
    for prompt, result in zip(f.prompt, results, strict=True):
        if f.json:
            print(to_json({"prompt": prompt, **result}))
        else:
            print(result["text"])


if __name__ == "__main__":

    flags.DEFINE_string("checkpoint", None, "Training run directory (its newest checkpoint).")
    flags.DEFINE_multi_string("image", [], "Image file(s): one for all prompts or one each.")
    flags.DEFINE_multi_string("prompt", None, "Question(s); several make one batch.")
    flags.DEFINE_integer("max_new_tokens", 32, "Answer length limit.")
    flags.DEFINE_float("temperature", 0.0, "0: greedy; else sampling temperature.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: all).")
    flags.DEFINE_bool("json", False, "One JSON object per prompt: text, token_ids, "
                                     "time_to_first_token_s, tokens_per_s.")
    flags.mark_flags_as_required(["checkpoint", "prompt"])
    user_error.run_absl(main, "tokenpacker_jax.generate")
