"""The step-by-step decoding engine against ``Generator`` (itself tested against full
forward passes): greedy tokens equal whatever else shares the batch, however requests
arrive, across cache shifts and reused conversation turns; sampling against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from serving_helpers import QUESTIONS, write_tiny_run

from tokenpacker_jax.assembly import load_trained
from tokenpacker_jax.data.conversation import ASSISTANT, USER, Turn, place_image
from tokenpacker_jax.data.example import example_builder
from tokenpacker_jax.data.image import load_image
from tokenpacker_jax.data.prompt import build_prompt, conversation_prompt, left_pad
from tokenpacker_jax.generate import Generator, SamplingConfig
from tokenpacker_jax.serving.cache_rows import sample_rows
from tokenpacker_jax.serving.engine import Engine, EngineConfig, Request, Sampling
from tokenpacker_jax.serving.server import LoweringCounter
from tokenpacker_jax.serving.text import TextStream

STEPS = 6
BUCKET = 64
# The engine of tests/test_serve.py's and test_chat.py's servers: compiled once for all three
# files through the persistent compilation cache.
ENGINE = EngineConfig(slots=4, max_length=160, buckets=(BUCKET,), prefill_rows=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    run, data = write_tiny_run(tmp_path_factory.mktemp("engine"))
    trained = load_trained(str(run))
    builder = example_builder(trained.config.data, trained.tokenizer, trained.tokens_per_tile)
    images = [load_image(data / f"images/test/0000{i}.png") for i in range(4)]
    prompts = [build_prompt(builder, q, image) for q, image in zip(QUESTIONS, images, strict=True)]
    prompts.append(build_prompt(builder, "Describe a red circle.", None))  # text only
    generator = Generator(trained.model, trained.params, trained.tokenizer.stop_ids,
                          trained.tokenizer.pad_id, SamplingConfig(max_new_tokens=STEPS))
    alone = [generator.strip(generator(left_pad([p], generator.pad_id, BUCKET))["tokens"])[0]
             for p in prompts]
    engine = Engine(trained.model, trained.params, trained.tokenizer.stop_ids,
                    trained.tokenizer.pad_id, ENGINE)
    engine.compile()
    return trained, builder, images, prompts, alone, engine


def test_greedy_answers_equal_generator_however_requests_arrive(setup):
    _, _, _, prompts, alone, engine = setup
    assert len({len(p.ids) for p in prompts}) == len(prompts)  # left padding differs
    assert all(len(ids) == STEPS for ids in alone)  # (no stop token: every step compared)
    with LoweringCounter() as lowered:  # nothing is compiled after Engine.compile
        # All at once (more requests than rows: the last ones wait for a free row), sharing
        # prefills (2 rows a call) and decode steps.
        prefills, steps = engine.prefills, engine.steps
        requests = engine.run([Request(p, STEPS) for p in prompts])
        assert [r.tokens for r in requests] == alone
        assert [r.finish_reason for r in requests] == ["length"] * len(prompts)
        assert engine.prefills - prefills == 3 and engine.steps - steps == 2 * (STEPS - 1)
        # Staggered: each joins while the others are decoding, in another order and row, round
        # after round until the shared write slot has run into the end of the cache (twice).
        orders = ([4, 2, 0, 1, 3], [1, 3, 4, 0, 2], [0, 4, 1, 3, 2])
        for round_index in range(40):
            if engine.shifts >= 2:
                break
            order = orders[round_index % len(orders)]
            requests = {i: Request(prompts[i], STEPS) for i in order}
            for i in order:
                engine.submit(requests[i])
                engine.step()
                engine.step()
            while not all(r.done for r in requests.values()):
                engine.step()
            assert [requests[i].tokens for i in range(len(prompts))] == alone
        assert engine.shifts >= 2  # the cache moved under live rows and the answers held
    assert lowered.names == []


def test_stop_tokens_and_cancel_free_their_rows(setup):
    _, _, _, prompts, alone, engine = setup
    stop = alone[0][3]
    stopped = Request(prompts[0], STEPS, stop_ids=[stop])
    cancelled = Request(prompts[1], STEPS)
    other = Request(prompts[2], STEPS)
    for request in (stopped, cancelled, other):
        engine.submit(request)
    events = engine.step()
    cancelled.cancel()
    while not all(r.done for r in (stopped, cancelled, other)):
        events += engine.step()
    assert stopped.finish_reason == "stop" and stopped.tokens == alone[0][:3]
    assert cancelled.finish_reason == "cancelled" and len(cancelled.tokens) < STEPS
    assert other.tokens == alone[2]
    assert [e.finish_reason for e in events if e.request is stopped] == [None] * 3 + ["stop"]
    assert engine.live == 0 and not engine.busy
    with pytest.raises(ValueError, match="do not fit the context"):
        engine.submit(Request(prompts[0], 100))


def test_next_turn_reuses_the_parked_cache(setup):
    trained, builder, images, _, _, engine = setup
    turns = [Turn(USER, place_image(QUESTIONS[0]))]
    first = Request(conversation_prompt(builder, turns, images[0]), 4, keep=True)
    engine.run([first])
    answer = trained.tokenizer.decode(first.tokens).strip()
    turns += [Turn(ASSISTANT, answer), Turn(USER, "And the colour?")]
    prompt = conversation_prompt(builder, turns, images[0])
    second = Request(prompt, 4, keep=True, reuse=first)
    fresh = Request(prompt, 4)
    engine.run([second, fresh])
    assert second.reused_tokens > 0  # the earlier turn was not prefilled again
    assert second.tokens == fresh.tokens
    engine.release(second)


def test_sampling_keeps_to_top_k_and_top_p_and_repeats_with_its_seed(setup):
    _, _, _, prompts, alone, engine = setup
    sampling = Sampling(temperature=1.5, top_p=0.9, seed=7)
    alone_sampled = engine.run([Request(prompts[0], STEPS, sampling)])[0].tokens
    crowded = engine.run([Request(prompts[1], STEPS), Request(prompts[0], STEPS, sampling),
                          Request(prompts[2], STEPS, Sampling(temperature=1.0, seed=7))])
    assert crowded[1].tokens == alone_sampled != alone[0]
    top1 = engine.run([Request(prompts[3], STEPS, Sampling(temperature=2.0, top_k=1))])
    assert top1[0].tokens == alone[3]

    # The kept set against NumPy: sorted probabilities, the smallest prefix reaching top_p,
    # within the top k.
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32) * 2
    temperature = np.array([0.7, 1.0, 1.0, 2.0, 1.0, 0.0], np.float32)
    top_k = np.array([0, 5, 0, 3, 50, 0], np.int32)
    top_p = np.array([0.5, 1.0, 0.8, 0.9, 1.0, 1.0], np.float32)
    draws = 300
    samples = np.asarray(jax.jit(sample_rows)(
        jnp.asarray(np.repeat(logits, draws, axis=0)),
        jnp.repeat(jnp.arange(6, dtype=jnp.uint32), draws),
        jnp.tile(jnp.arange(draws, dtype=jnp.int32), 6),
        *(jnp.repeat(jnp.asarray(a), draws) for a in (temperature, top_k, top_p))))
    samples = samples.reshape(6, draws).T
    for row in range(6):
        if temperature[row] == 0:
            assert set(samples[:, row]) == {int(np.argmax(logits[row]))}
            continue
        order = np.argsort(-logits[row].astype(np.float64))
        probs = np.exp(logits[row][order] / temperature[row])
        probs /= probs.sum()
        k = top_k[row] or logits.shape[1]
        probs = probs[:k] / probs[:k].sum()
        nucleus = k if top_p[row] >= 1 else np.searchsorted(np.cumsum(probs), top_p[row]) + 1
        allowed = set(order[:min(k, nucleus)].tolist())
        assert set(samples[:, row].tolist()) <= allowed, row
        assert len(set(samples[:, row].tolist())) > 1 or len(allowed) == 1


def test_text_pieces_add_up_to_the_answer(setup):
    """Pieces handed out as tokens arrive concatenate to transformers' decoding of the
    whole answer (stripped), hold back half characters, and stop before a stop string
    that spans tokens."""
    tokenizer = setup[0].tokenizer
    text = " the red circle é is in the top left "
    ids = tokenizer.encode(text, add_bos=False)
    assert len(ids) > len(text.split())  # é is two byte pieces
    stream = TextStream(tokenizer)
    pieces = [stream.add(token) for token in ids] + [stream.finish()]
    assert "".join(pieces) == tokenizer.decode(ids).strip() == text.strip()
    assert all("\ufffd" not in piece for piece in pieces)
    stream = TextStream(tokenizer, stop=["circle é", "zzz"])
    pieces = [stream.add(token) for token in ids] + [stream.finish()]
    assert "".join(pieces) == "the red" and stream.stopped
