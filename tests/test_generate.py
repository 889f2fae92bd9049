"""Generation with the KV cache against full forward passes; prompts; answer scoring."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenpacker_jax import configuration
from tokenpacker_jax.configs import tiny
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.data import synthetic
from tokenpacker_jax.data.example import example_builder, tokens_per_tile
from tokenpacker_jax.data.image import load_image
from tokenpacker_jax.data.prompt import build_prompt, left_pad
from tokenpacker_jax.evaluation import question_file
from tokenpacker_jax.generate import Generator, SamplingConfig
from tokenpacker_jax.models import mllm
from tokenpacker_jax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = tmp_path_factory.mktemp("gen_data")
    synthetic.generate(str(data), 4, seed=1, num_eval=4, size=48, tokenizer_vocab=400)
    config = tiny.get_config(f"stage=2,data={data}")
    config.data.system_prompt = None  # vicuna_v1's own, as the reference has it (tiny drops it)
    tokenizer = load_tokenizer(config.model.tokenizer)
    model_config = configuration.mllm_config(config)
    model_config = dataclasses.replace(
        model_config, vision=dataclasses.replace(model_config.vision, num_layers=2),
        multi_layers=(1, 2, 1, 2),
        decoder=dataclasses.replace(model_config.decoder, num_layers=1,
                                    vocab_size=tokenizer.vocab_size))
    model = mllm.MultimodalLM(model_config)
    params = model.init(jax.random.key(3), **batch_lib.example_inputs(
        batch_lib.Dims.of_model(model_config, 64)))["params"]
    # Larger weights than the init, so that greedy choices are well separated.
    params = jax.tree.map(lambda p: p * 4.0 if p.ndim >= 2 else p, params)
    builder = example_builder(config.data, tokenizer, tokens_per_tile(model_config))
    return data, model, params, tokenizer, builder


def test_prompt_ends_where_the_answer_begins(setup):
    data, _, _, tokenizer, builder = setup
    prompt = build_prompt(builder, "What digit is shown?",
                          load_image(data / "images/test/00000.png"))
    assert prompt.image_mask.sum() == 9 and prompt.tile_mask.tolist() == [True]
    text = tokenizer.decode(prompt.ids[~prompt.image_mask].tolist(),
                            skip_special_tokens=False)
    # (the text after the image is tokenised on its own, as the reference does, so it
    # starts with sentencepiece's word-boundary space)
    assert text.endswith("USER:  \nWhat digit is shown? ASSISTANT:"), text
    assert text.startswith("<s> A chat between")


@pytest.mark.parametrize("unstack_layers", [False, True])
def test_cached_greedy_decoding_equals_full_forward_passes(setup, unstack_layers):
    """Decoding over the scanned layer stack and over per-layer weights (the CPU default)
    both equal full forward passes of the scanned model."""
    data, model, params, tokenizer, builder = setup
    questions = [("What digit is shown?", load_image(data / "images/test/00001.png")),
                 ("Where is the red circle? Answer briefly.",
                  load_image(data / "images/test/00002.png"))]
    prompts = [build_prompt(builder, q, image) for q, image in questions]
    assert len(prompts[0].ids) != len(prompts[1].ids)  # left padding is exercised
    batch = left_pad(prompts, tokenizer.pad_id)
    steps = 6
    generator = Generator(model, params, stop_ids=[], pad_id=tokenizer.pad_id,
                          sampling=SamplingConfig(max_new_tokens=steps),
                          unstack_layers=unstack_layers)
    assert generator.model.config.decoder.scan_layers is not unstack_layers
    cached = generator(batch)["tokens"]

    # Reference: no cache; append the argmax and run the whole sequence again (one fixed
    # shape: the not-yet-generated positions are right padding, which causal attention
    # never lets earlier positions see).
    length = batch["input_ids"].shape[1]
    ids = np.concatenate([batch["input_ids"], np.zeros((2, steps), np.int32)], axis=1)
    image_mask = np.concatenate([batch["image_mask"], np.zeros((2, steps), bool)], axis=1)
    attention = np.concatenate([batch["attention_mask"], np.zeros((2, steps), np.int32)],
                               axis=1)
    forward = jax.jit(lambda i, m, a: model.apply({"params": params}, i, m,
                                                  batch["pixel_values"], a))
    expected = []
    for k in range(steps):
        logits = forward(ids, image_mask, attention)
        token = np.asarray(jnp.argmax(logits[:, length - 1 + k], axis=-1), np.int32)
        expected.append(token)
        ids[:, length + k] = token
        attention[:, length + k] = 1
    np.testing.assert_array_equal(cached, np.stack(expected, axis=1))
    assert len(set(cached[0].tolist())) > 1  # not a degenerate repeat


def test_sampling_respects_top_k(setup):
    data, model, params, tokenizer, builder = setup
    prompt = build_prompt(builder, "What digit is shown?",
                          load_image(data / "images/test/00000.png"))
    batch = left_pad([prompt], tokenizer.pad_id)
    greedy = Generator(model, params, [], tokenizer.pad_id,
                       SamplingConfig(max_new_tokens=1))(batch)["tokens"]
    top1 = Generator(model, params, [], tokenizer.pad_id,
                     SamplingConfig(max_new_tokens=1, temperature=1.0, top_k=1))
    for seed in range(3):
        np.testing.assert_array_equal(top1(batch, seed=seed)["tokens"], greedy)


def test_scoring_and_question_file_errors(tmp_path):
    records = [{"text": "Red.", "answer": "red", "category": "colour"},
               {"text": "blue", "answer": "green", "category": "colour"},
               {"text": " 7 ", "answer": "7", "category": "digit"},
               {"text": "no answer field"}]
    scores = question_file.exact_match(records)
    assert scores["all"] == {"accuracy": 2 / 3, "n": 3}
    assert scores["colour"] == {"accuracy": 0.5, "n": 2}
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "text": "a"}\n{not json}\n')
    with pytest.raises(ValueError, match="q.jsonl:2"):
        question_file.read_questions(str(bad))
