"""Synthetic images with questions that need fine detail, for toy-scale runs and tests.

``python -m tokenpacker_jax.data.synthetic --out DIR --num N --seed S [--size 48] [--jitter PX]``

Each image (``--size`` px square, 48 by default for ``configs/tiny.py``, 336 for the paper's
tower) is a 3 x 3 grid of cells on a lightly noisy grey background. One to four cells hold a
coloured shape (distinct colours and shapes within an image), one more holds a dark digit
drawn from a 5 x 7 bitmap font; each item sits anywhere in its cell, or with ``--jitter PX``
at most PX px off the cell's centre (0: always centred, so that every item falls on the
same pixels of its cell's patches). Questions have small closed answer sets (chance = 1 /
set size):

    colour    "What colour is the {shape}?"            red green blue yellow purple   (1/5)
    shape     "What shape is the {colour} object?"     circle square triangle cross   (1/4)
    position  "Where is the {colour} {shape}?"         the 9 cells, "top left" .. (1/9)
    count     "How many shapes are there?"             one two three four             (1/4)
    digit     "What digit is shown?"                   0 .. 9                         (1/10)

Written to DIR (paths in the JSON are relative to DIR, the image folder):

    images/{split}/{index:05d}.png
    {split}_caption.json     stage 1: ``<image>`` + a caption naming every item, in the
                             order of their colours or of their shapes (``caption``)
    {split}_qa.json          stage 2: one conversation per image, the questions shuffled:
                             count, digit and as many colour / shape / position
                             questions as the image has objects (up to three), each
                             about another object, so that no turn names another's
                             answer and every answer must come from the image
    {split}_questions.jsonl  held-out evaluation: one question of each category per
                             image, one per line, with question_id, image, text,
                             answer, category
    meta.json                answer sets and the generation settings
    tokenizer/               (``--tokenizer-vocab V``) a LLaMA-style sentencepiece
                             tokenizer (byte fallback) trained on this text
    train_llava_mix.json     (``--llava-mix N``) N conversations with the lengths of
                             LLaVA-1.5's instruction mix (``tokenpacker_jax.data.llava_mix``),
                             their images (training scenes at the sizes of the mix's
                             photos) in images/mix/

Splits: ``train`` (``--num``), ``val`` and ``test`` (``--num-eval`` each). Every image is
drawn from its own random stream (seed, split, index), so the same seed gives the same
bytes, and a larger ``--num`` extends a smaller one.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import sentencepiece as spm
from PIL import Image, ImageDraw

from tokenpacker_jax import user_error
from tokenpacker_jax.data import llava_mix as llava_mix_lib
from tokenpacker_jax.data.conversation import VICUNA_SYSTEM
from tokenpacker_jax.user_error import InputError

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230),
           "yellow": (235, 200, 30), "purple": (150, 60, 200)}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left",
             "bottom", "bottom right")
COUNTS = ("one", "two", "three", "four")
DIGITS = tuple(str(d) for d in range(10))
CATEGORIES = ("colour", "shape", "position", "count", "digit")
ATTRIBUTE_CATEGORIES = ("colour", "shape", "position")  # questions about one object
_ATTRIBUTE_QUESTIONS = {"colour": "What colour is the {shape}?",
                        "shape": "What shape is the {colour} object?",
                        "position": "Where is the {colour} {shape}?"}
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "position": POSITIONS,
           "count": COUNTS, "digit": DIGITS}
SPLITS = {"train": 0, "val": 1, "test": 2}
CAPTION_PROMPT = "Describe the image briefly."

# 5 x 7 bitmap digits, rows top to bottom.
_FONT = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}
_DIGIT_COLOUR = (25, 25, 25)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int],
                colour: tuple[int, int, int]) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=colour)
    elif shape == "cross":
        third = (right - left + 1) / 3
        draw.rectangle((left + third, top, right - third, bottom), fill=colour)
        draw.rectangle((left, top + third, right, bottom - third), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _draw_digit(pixels: np.ndarray, digit: str, top: int, left: int, scale: int) -> None:
    bitmap = np.array([[c == "1" for c in row] for row in _FONT[digit]])
    mask = np.kron(bitmap, np.ones((scale, scale), bool))
    region = pixels[top:top + mask.shape[0], left:left + mask.shape[1]]
    region[mask] = _DIGIT_COLOUR


def _place(rng: np.random.Generator, slack: int, jitter: int | None) -> int:
    """An item's offset in its cell, 0..slack: anywhere (``jitter`` None) or at most
    ``jitter`` px off the centred offset."""
    if jitter is None:
        return int(rng.integers(0, slack + 1))
    return int(np.clip(slack // 2 + rng.integers(-jitter, jitter + 1), 0, slack))


def scene(rng: np.random.Generator, size: int, jitter: int | None = None
          ) -> tuple[np.ndarray, dict[str, Any]]:
    """One image (uint8 [size, size, 3]) and what is in it. Each shape and the digit sit
    anywhere in their cells, or with ``jitter`` at most that many px off the cell's centre."""
    cell = size // 3
    count = int(rng.integers(1, 5))
    cells = rng.permutation(9)[:count + 1]
    colours = rng.permutation(len(COLOURS))[:count]
    shapes = rng.permutation(len(SHAPES))[:count]
    digit = DIGITS[int(rng.integers(10))]

    base = rng.integers(220, 246)
    pixels = np.clip(base + rng.integers(-6, 7, (size, size, 1)), 0, 255).repeat(3, axis=2)
    pixels = pixels.astype(np.uint8)
    offset = (size - 3 * cell) // 2  # centres the 3 x 3 grid when size % 3 != 0
    objects = []
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    extent = max(3, round(cell * 0.75))
    for slot, colour_index, shape_index in zip(cells[:count], colours, shapes, strict=True):
        row, col = divmod(int(slot), 3)
        slack = cell - extent
        top = offset + row * cell + _place(rng, slack, jitter)
        left = offset + col * cell + _place(rng, slack, jitter)
        colour_name = list(COLOURS)[int(colour_index)]
        tint = rng.integers(-12, 13, 3)
        colour = tuple(int(v) for v in np.clip(np.array(COLOURS[colour_name]) + tint, 0, 255))
        shape = SHAPES[int(shape_index)]
        _draw_shape(draw, shape, (left, top, left + extent - 1, top + extent - 1), colour)
        objects.append({"shape": shape, "colour": colour_name, "position": POSITIONS[slot]})
    pixels = np.array(image)

    scale = max(1, cell // 8)
    height, width = 7 * scale, 5 * scale
    row, col = divmod(int(cells[count]), 3)
    top = offset + row * cell + _place(rng, max(cell - height, 0), jitter)
    left = offset + col * cell + _place(rng, max(cell - width, 0), jitter)
    _draw_digit(pixels, digit, top, left, scale)
    return pixels, {"objects": objects, "digit": digit,
                    "digit_position": POSITIONS[int(cells[count])]}


CELL_LABELS = ("shape", "colour", "digit")  # the rows of ``cell_labels``; 0 = empty


def cell_labels(info: dict[str, Any]) -> np.ndarray:
    """What each of the 9 cells holds (``scene``'s info) -> int32 [3, 9]: per cell (reading
    order), row 0 the shape (index in SHAPES + 1), row 1 the colour (in COLOURS + 1), row 2
    the digit (+ 1); 0 where the cell holds none."""
    labels = np.zeros((len(CELL_LABELS), len(POSITIONS)), np.int32)
    for item in info["objects"]:
        cell = POSITIONS.index(item["position"])
        labels[0, cell] = SHAPES.index(item["shape"]) + 1
        labels[1, cell] = list(COLOURS).index(item["colour"]) + 1
    labels[2, POSITIONS.index(info["digit_position"])] = DIGITS.index(info["digit"]) + 1
    return labels


def labelled_scenes(split: str, num: int, seed: int, size: int, jitter: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The first ``num`` images of a split, drawn again from their streams (the pixels
    ``generate_split`` writes), with their ``cell_labels``: uint8 [num, size, size, 3] and
    int32 [num, 3, 9]."""
    pixels, labels = [], []
    for index in range(num):
        image, info = scene(np.random.default_rng([seed, SPLITS[split], index]), size, jitter)
        pixels.append(image)
        labels.append(cell_labels(info))
    return np.stack(pixels), np.stack(labels)


def questions(info: dict[str, Any], rng: np.random.Generator) -> list[dict[str, str]]:
    """The five questions about a scene, one per category, with their answers.

    The colour, shape and position questions come first, in a random order, and ask about
    different objects while the scene has enough (the k-th asks about object k mod count of a
    random order of the objects); then count and digit. As colours and shapes are unique
    within a scene, the first ``min(3, count)`` therefore never name one another's answers
    (``conversation_questions`` relies on it).
    """
    objects = info["objects"]
    attributes = rng.permutation(len(ATTRIBUTE_CATEGORIES))
    order = rng.permutation(len(objects))
    asked = []
    for rank, index in enumerate(attributes):
        target = objects[int(order[rank % len(objects)])]
        category = ATTRIBUTE_CATEGORIES[int(index)]
        asked.append({"category": category, "text": _ATTRIBUTE_QUESTIONS[category].format(**target),
                      "answer": target[category]})
    return asked + [
        {"category": "count", "text": "How many shapes are there?",
         "answer": COUNTS[len(objects) - 1]},
        {"category": "digit", "text": "What digit is shown?", "answer": info["digit"]},
    ]


def conversation_questions(info: dict[str, Any],
                           asked: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The questions of ``asked`` (from ``questions``) that one training conversation holds:
    no question in it may name another's answer, or the model learns to copy the answer from
    an earlier turn instead of reading the image (the held-out questions come one at a time).
    Scenes with fewer than three objects therefore drop attribute questions."""
    kept = min(len(ATTRIBUTE_CATEGORIES), len(info["objects"]))
    return list(asked[:kept]) + list(asked[len(ATTRIBUTE_CATEGORIES):])


def in_random_order(items: Sequence[Any], rng: np.random.Generator) -> list[Any]:
    """``items`` in an order drawn from ``rng`` (one permutation)."""
    return [items[int(i)] for i in rng.permutation(len(items))]


POSITION_FORMS = ("Where is the {colour} {shape}?", "Where is the {colour} object?",
                  "Where is the {shape}?")  # the first is the held-out form


def lookup_questions(info: dict[str, Any], rng: np.random.Generator
                     ) -> list[list[dict[str, str]]]:
    """Two more conversations' questions about a scene, each asking one attribute of every
    object in a random order: the cell of each object (named by its colour and shape, by its
    colour alone or by its shape alone, at random per question), then the colour of each
    shape or the shape of each colour (one of the two at random).

    The questions of one conversation name only attributes that none of them answers.
    ``questions`` asks each category of at most one object per image; measured on the main
    job, the lookup by shape and the cell of a named object then formed in some seeds and
    not in others, and with these conversations in all three measured (BENCHMARKS.md, "The
    main job").
    """
    objects = info["objects"]
    positions = [{"category": "position",
                  "text": POSITION_FORMS[int(rng.integers(len(POSITION_FORMS)))].format(**o),
                  "answer": o["position"]}
                 for o in in_random_order(objects, rng)]
    category = ("colour", "shape")[int(rng.integers(2))]
    attributes = [{"category": category,
                   "text": _ATTRIBUTE_QUESTIONS[category].format(**o), "answer": o[category]}
                  for o in in_random_order(objects, rng)]
    return [positions, attributes]


def conversation(image: str, sample_id: str, asked: Sequence[dict[str, str]]
                 ) -> dict[str, Any]:
    """A LLaVA record asking ``asked`` in order, the image before the first question."""
    turns = []
    for turn, question in enumerate(asked):
        prefix = "<image>\n" if turn == 0 else ""
        turns += [{"from": "human", "value": prefix + question["text"]},
                  {"from": "gpt", "value": question["answer"]}]
    return {"id": sample_id, "image": image, "conversations": turns}


def caption(info: dict[str, Any], rng: np.random.Generator) -> str:
    """Every object, then the digit, in one of two forms chosen at random: colour first in
    the colours' order ("a red circle at the top, a blue cross at the left ...") or shape
    first in the shapes' order ("a circle in red at the top, a cross in blue at the left
    ...").

    The order follows the attributes, not the grid, so that no word can be read off its
    place in the list: each form has the model find an object by the word it has just
    written (its colour, or its shape) and read that object's other attributes and its cell.
    Both directions of that lookup are what the questions ask (a shape by its colour, a
    colour by its shape, a cell by both); captions in reading order trained only the first,
    and held-out colour questions stayed near the colour of a random object of the image.
    """
    if rng.integers(2):
        objects = sorted(info["objects"], key=lambda o: list(COLOURS).index(o["colour"]))
        items = [f"a {o['colour']} {o['shape']} at the {o['position']}" for o in objects]
    else:
        objects = sorted(info["objects"], key=lambda o: SHAPES.index(o["shape"]))
        items = [f"a {o['shape']} in {o['colour']} at the {o['position']}" for o in objects]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"{listed}; the digit {info['digit']} at the {info['digit_position']}."


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def generate_split(out: str, split: str, num: int, seed: int, size: int,
                   jitter: int | None = None) -> dict[str, list]:
    """Writes one split's images; returns its caption / qa / lookup / question records."""
    os.makedirs(os.path.join(out, "images", split), exist_ok=True)
    captions, conversations, lookups, evaluation = [], [], [], []
    for index in range(num):
        rng = np.random.default_rng([seed, SPLITS[split], index])
        pixels, info = scene(rng, size, jitter)
        image = f"images/{split}/{index:05d}.png"
        with open(os.path.join(out, image), "wb") as file:
            file.write(_png(pixels))
        sample_id = f"{split}-{index:05d}"
        asked = questions(info, rng)
        kept = conversation_questions(info, asked)
        conversations.append(conversation(
            image, sample_id, [kept[int(number)] for number in rng.permutation(len(kept))]))
        captions.append(conversation(image, sample_id, [
            {"text": CAPTION_PROMPT, "answer": caption(info, rng)}]))
        lookups += [conversation(image, sample_id, asked)
                    for asked in lookup_questions(info, rng)]
        for question in sorted(asked, key=lambda q: CATEGORIES.index(q["category"])):
            evaluation.append({"question_id": f"{sample_id}-{question['category']}",
                               "image": image, "text": question["text"],
                               "answer": question["answer"],
                               "category": question["category"]})
    return {"caption": captions, "qa": conversations, "lookup": lookups,
            "questions": evaluation}


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=1, ensure_ascii=False)
        file.write("\n")


def train_tokenizer(texts: Sequence[str], out_dir: str, vocab_size: int) -> None:
    """A LLaMA-style sentencepiece BPE tokenizer (byte fallback, ``<unk>`` 0, ``<s>`` 1,
    ``</s>`` 2, digits split) trained on ``texts``, saved for ``load_tokenizer``."""
    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()  # no file names enter the model, so its bytes depend on texts only
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
            eos_id=2, pad_id=-1, normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True,
            allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2)
    except RuntimeError as error:  # sentencepiece reports a size that cannot fit the text
        if "Vocabulary size" not in str(error):
            raise
        reason = ". ".join(str(error).split("] ")[-1].split(". ")[:2]).rstrip(".")
        raise InputError(f"--tokenizer-vocab {vocab_size}: {reason} (sentencepiece)") from error
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as file:
        file.write(model.getvalue())
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True,
        "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>"})
    _write_json(os.path.join(out_dir, "config.json"), {"model_type": "llama"})


def generate(out: str, num: int, seed: int, *, num_eval: int | None = None, size: int = 48,
             jitter: int | None = None, tokenizer_vocab: int = 0,
             llava_mix: int = 0) -> dict[str, Any]:
    """Writes the dataset (see the module docstring); returns meta.json's content."""
    if size < 24:
        raise InputError(f"--size {size}: images below 24 px cannot hold the scenes")
    if jitter is not None and jitter < 0:
        raise InputError(f"--jitter {jitter}: must be >= 0 (or left out: anywhere in the cell)")
    num_eval = max(20, num // 10) if num_eval is None else num_eval
    os.makedirs(out, exist_ok=True)
    texts = []
    for split, count in (("train", num), ("val", num_eval), ("test", num_eval)):
        records = generate_split(out, split, count, seed, size, jitter)
        _write_json(os.path.join(out, f"{split}_caption.json"), records["caption"])
        _write_json(os.path.join(out, f"{split}_qa.json"), records["qa"])
        _write_json(os.path.join(out, f"{split}_lookup.json"), records["lookup"])
        with open(os.path.join(out, f"{split}_questions.jsonl"), "w", encoding="utf-8") as file:
            for question in records["questions"]:
                file.write(json.dumps(question, ensure_ascii=False) + "\n")
        if split == "train":
            # The lookup conversations ask the qa's question forms again: no new text.
            texts += [t["value"] for r in records["caption"] + records["qa"]
                      for t in r["conversations"]]
    if llava_mix:
        mix = llava_mix_lib.records(llava_mix, seed)
        os.makedirs(os.path.join(out, "images", "mix"), exist_ok=True)
        for index, record in enumerate(mix):
            if "image" in record:  # a training scene, scaled to the source's photo size
                scene_path = os.path.join(out, f"images/train/{index % num:05d}.png")
                with Image.open(scene_path) as image:
                    image.convert("RGB").resize(tuple(record["image_size"])).save(
                        os.path.join(out, record["image"]), quality=90)
        _write_json(os.path.join(out, "train_llava_mix.json"), mix)
        texts += [t["value"] for r in mix for t in r["conversations"]]
    meta = {"seed": seed, "size": size, "jitter": jitter, "llava_mix": llava_mix,
            "num": {"train": num, "val": num_eval, "test": num_eval},
            "answers": {k: list(v) for k, v in ANSWERS.items()},
            "chance": {k: 1 / len(v) for k, v in ANSWERS.items()}}
    _write_json(os.path.join(out, "meta.json"), meta)
    if tokenizer_vocab:
        template_text = [VICUNA_SYSTEM + " USER: ASSISTANT:"] * 50
        train_tokenizer(texts + template_text, os.path.join(out, "tokenizer"),
                        tokenizer_vocab)
    return meta


def main(argv: Sequence[str] | None = None) -> None:
    parser = user_error.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num", type=int, required=True, help="training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-eval", type=int, default=None,
                        help="images in val and in test (default max(20, num / 10))")
    parser.add_argument("--size", type=int, default=48, help="image side in pixels")
    parser.add_argument("--jitter", type=int, default=None,
                        help="items at most this many px off their cell's centre (default: "
                             "anywhere in the cell)")
    parser.add_argument("--tokenizer-vocab", type=int, default=0,
                        help="also train a sentencepiece tokenizer of this size (0: none)")
    parser.add_argument("--llava-mix", type=int, default=0,
                        help="also write this many conversations with the lengths of "
                             "LLaVA-1.5's mix (train_llava_mix.json; 0: none)")
    args = parser.parse_args(argv)
    meta = generate(args.out, args.num, args.seed, num_eval=args.num_eval, size=args.size,
                    jitter=args.jitter, tokenizer_vocab=args.tokenizer_vocab,
                    llava_mix=args.llava_mix)
    print(f"wrote {meta['num']} images of {args.size} px to {args.out}")


if __name__ == "__main__":
    user_error.run_argparse(main, "tokenpacker_jax.data.synthetic")
