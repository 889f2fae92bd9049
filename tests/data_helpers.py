"""Tiny tokenizers of the three families, trained in the test, and small data helpers.

- ``vicuna_like``: a LLaMA sentencepiece BPE (byte fallback, identity normalisation,
  split digits, ``<unk>`` 0 / ``<s>`` 1 / ``</s>`` 2) wrapped as transformers
  ``LlamaTokenizer`` from the ``.model`` file. Its corpus makes "USER" a piece that never
  starts a word, so " USER" is "▁" + "USER" (two tokens) and "USER" after ``</s>`` is one,
  as with the real Vicuna vocabulary; the reference's ``legacy=False`` round arithmetic
  relies on exactly that.
- ``llama3_like``: byte-level BPE with LLaMA-3's split pattern and header/eot specials.
- ``gemma_like``: sentencepiece without a dummy prefix, ``<pad>`` 0 / ``<eos>`` 1 /
  ``<bos>`` 2, ``<start_of_turn>`` / ``<end_of_turn>`` as user-defined pieces, wrapped as
  transformers ``GemmaTokenizer``.
- ``reference_slice``: the reference's TokenPacker-HD tiles and global view, transcribed
  into torch (the oracle of the HD tests).
- ``tokenizer_image_token``: the reference's prompt tokenisation around ``<image>``.
- ``synthetic_dir`` / ``synthetic_tokenizer``: module fixtures, a generated set of 200
  samples (20 for evaluation) of 48 px and the tokenizer trained with it (the pipeline's
  and the example builder's tests bind them under their own names).
"""

from __future__ import annotations

import json
import os
import random

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

from tokenpacker_jax.configs import tiny
from tokenpacker_jax.data import synthetic
from tokenpacker_jax.tokenizer import load_tokenizer

IMAGE_TOKEN_INDEX = -200  # the reference's id of the image slot

# CLIP's normalisation (the reference's HD code hard-codes these numbers).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Visual tokens per tile that the data tests (no model) give the example builder and the
# pipeline: a 48 px tower in patches of 4, packed 2x (12 x 12 -> 6 x 6). Not the tiny config's
# model, whose patches of 8 give 9.
TOKENS_PER_TILE = 36

WORDS = ("a chat between curious user and an artificial intelligence assistant the gives "
         "helpful detailed polite answers to questions what is colour shape red green blue "
         "yellow purple circle square triangle cross in top left right bottom centre image "
         "how many objects shapes are there digit describe this picture briefly where of "
         "one two three four shown ASSISTANT 0 1 2 3 4 5 6 7 8 9").split()


def corpus(seed: int = 0, lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            + rng.choice([".", "?", ",", ":", "!", "", "'s"]) for _ in range(lines)]


def _write_config(directory: str, config: dict) -> None:
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as file:
        json.dump(config, file)


def vicuna_like(directory: str, *, legacy: bool = False):
    os.makedirs(directory, exist_ok=True)
    texts = corpus() + ["kUSER qUSER zUSER"] * 300
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=os.path.join(directory, "tokenizer"),
        vocab_size=600, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        num_threads=1, minloglevel=2)
    _write_config(directory, {"tokenizer_class": "LlamaTokenizer", "legacy": legacy,
                              "add_bos_token": True, "add_eos_token": False,
                              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert isinstance(tokenizer, LlamaTokenizer)
    return tokenizer


def llama3_like(directory: str):
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    tokenizer.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>").save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def gemma_like(directory: str):
    os.makedirs(directory, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=os.path.join(directory, "tokenizer"),
        vocab_size=600, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], num_threads=1,
        minloglevel=2)
    _write_config(directory, {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>",
                              "eos_token": "<eos>", "pad_token": "<pad>",
                              "unk_token": "<unk>"})
    return AutoTokenizer.from_pretrained(directory)


def data_config(**overrides):
    """``configs/tiny.py``'s data section with overrides (dotted keys allowed), with the
    templates' own system prompts (the reference's; tiny drops vicuna_v1's)."""
    config = tiny.get_config().data
    config.system_prompt = None
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(str(out), 200, seed=7, num_eval=20, size=48, tokenizer_vocab=512)
    return out


@pytest.fixture(scope="module")
def synthetic_tokenizer(synthetic_dir):
    return load_tokenizer(synthetic_dir / "tokenizer")


def reference_fit(height, width, box_height, box_width):
    """The reference's resized size of an image fit into a box (its slice code, verbatim
    in meaning): the tighter side fills the box, the other is rounded and capped."""
    h_ratio, w_ratio = box_height / height, box_width / width
    if h_ratio <= w_ratio:
        return box_height, min(box_width, round(width * h_ratio))
    return min(box_height, round(height * w_ratio)), box_width


def reference_slice(pixels, grid, view, *, tile, mean=CLIP_MEAN, std=CLIP_STD):
    """The reference's TokenPacker-HD pixels (``image_aspect_ratio = slice``, the same code
    in its training dataset and its evaluation loader), transcribed into torch, for a grid
    given as (rows, cols): uint8 [H, W, 3] -> (float32 [r*c + 1, tile, tile, 3], (h', w')).

    ToTensor and Normalize at full size; bilinear ``F.interpolate`` (half-pixel centres, no
    antialiasing) to fit the r*tile x c*tile box, top-left on a zero canvas; tiles
    row-major; then the global view: the canvas (``"reference_canvas"``, the reference's)
    or the image (``"fit_image"``) interpolated to h' x w', the image's fit into one tile,
    top-left on a zero tile.
    """
    mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(std, dtype=torch.float32)[:, None, None]
    image = ((torch.from_numpy(pixels).permute(2, 0, 1).float().div(255) - mean) / std)[None]
    height, width = image.shape[-2:]
    rows, cols = grid
    size = reference_fit(height, width, rows * tile, cols * tile)
    canvas = torch.zeros(1, 3, rows * tile, cols * tile)
    canvas[:, :, :size[0], :size[1]] = F.interpolate(image, size=size, mode="bilinear")
    tiles = [canvas[:, :, tile * i:tile * (i + 1), tile * j:tile * (j + 1)]
             for i in range(rows) for j in range(cols)]
    size = reference_fit(height, width, tile, tile)
    glob = torch.zeros(1, 3, tile, tile)
    source = canvas if view == "reference_canvas" else image
    glob[:, :, :size[0], :size[1]] = F.interpolate(source, size=size, mode="bilinear")
    return torch.cat(tiles + [glob]).permute(0, 2, 3, 1).numpy(), size


def tokenizer_image_token(prompt, tokenizer):
    """The reference's prompt tokenisation (LLaVA's ``tokenizer_image_token``): each chunk
    around ``<image>`` on its own, BOS from the first only, ``IMAGE_TOKEN_INDEX`` where the
    image goes."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for number, chunk in enumerate(chunks):
        if number:
            ids.extend(([IMAGE_TOKEN_INDEX] * (offset + 1))[offset:])
        ids.extend(chunk[offset:])
    return ids
