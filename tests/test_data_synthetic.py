"""The synthetic dataset: same seed same bytes, small closed answer sets, and answers that the
pixels bear out (colour and position of the asked object, count, the digit's bitmap)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from tokenpacker_jax.data import synthetic
from tokenpacker_jax.user_error import InputError


def tree(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as file:
                files[os.path.relpath(path, root)] = file.read()
    return files


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("a")
    synthetic.main(["--out", str(out), "--num", "40", "--seed", "5", "--num-eval", "10",
                    "--tokenizer-vocab", "400"])
    return out


def test_same_seed_same_bytes(generated, tmp_path_factory):
    again = tmp_path_factory.mktemp("b")
    synthetic.main(["--out", str(again), "--num", "40", "--seed", "5", "--num-eval", "10",
                    "--tokenizer-vocab", "400"])
    first, second = tree(generated), tree(again)
    assert len(first) == 40 + 2 * 10 + 4 * 3 + 1 + 3  # images, 4 files per split, meta, tok
    assert first == second
    other = tmp_path_factory.mktemp("c")
    synthetic.main(["--out", str(other), "--num", "40", "--seed", "6", "--num-eval", "10"])
    third = tree(other)
    assert third["images/train/00000.png"] != first["images/train/00000.png"]
    assert third["train_qa.json"] != first["train_qa.json"]


def test_answer_sets_are_small_and_closed(generated):
    meta = json.loads((generated / "meta.json").read_text())
    assert max(meta["chance"].values()) <= 0.25
    questions = [json.loads(line) for line in
                 (generated / "test_questions.jsonl").read_text().splitlines()]
    assert len(questions) == 10 * len(synthetic.CATEGORIES)
    for question in questions:
        assert question["answer"] in meta["answers"][question["category"]]
    by_image = {}
    for question in questions:
        by_image.setdefault(question["image"], []).append(question["category"])
    assert all(sorted(c) == sorted(synthetic.CATEGORIES) for c in by_image.values())
    conversations = json.loads((generated / "train_qa.json").read_text())
    for record in conversations:
        turns = record["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and 6 <= len(turns) <= 10
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    captions = json.loads((generated / "train_caption.json").read_text())
    assert captions[0]["conversations"][1]["value"].endswith(".")


def cell_pixels(pixels, position, size):
    cell = size // 3
    offset = (size - 3 * cell) // 2
    row, col = divmod(synthetic.POSITIONS.index(position), 3)
    return pixels[offset + row * cell:offset + (row + 1) * cell,
                  offset + col * cell:offset + (col + 1) * cell]


def colour_mask(pixels, name):
    target = np.array(synthetic.COLOURS[name])
    return (np.abs(pixels.astype(int) - target).max(axis=-1) <= 14)


def check_object(pixels, size, colour, shape=None, position=None):
    """The object of ``colour`` is drawn (only in ``position``'s cell if given) and fills its
    box as ``shape`` would if given."""
    everywhere = colour_mask(pixels, colour).sum()
    assert everywhere >= (size // 3) ** 2 * 0.25
    if position is not None:
        assert colour_mask(cell_pixels(pixels, position, size), colour).sum() == everywhere
    fill = everywhere / round(size // 3 * 0.75) ** 2
    if shape == "square":
        assert fill > 0.95
    elif shape == "circle":
        assert 0.7 < fill < 0.9
    elif shape is not None:
        assert fill < 0.7


@pytest.mark.parametrize("size", [48, 336])
def test_answers_match_the_pixels(size, tmp_path):
    out = tmp_path / str(size)
    count = 30 if size == 48 else 4
    synthetic.generate(str(out), count, seed=11, num_eval=1, size=size)
    records = json.loads((out / "train_qa.json").read_text())
    for record in records:
        pixels = np.asarray(Image.open(out / record["image"]).convert("RGB"))
        assert pixels.shape == (size, size, 3)
        answers = {}
        turns = record["conversations"]
        for question, answer in zip(turns[::2], turns[1::2], strict=True):
            answers[question["value"].replace("<image>\n", "")] = answer["value"]
        count_answer = answers.pop("How many shapes are there?")
        digit = answers.pop("What digit is shown?")
        # As many colours as the count says, and as many attribute questions (up to three).
        present = [name for name in synthetic.COLOURS
                   if colour_mask(pixels, name).sum() >= (size // 3) ** 2 * 0.2]
        assert synthetic.COUNTS[len(present) - 1] == count_answer
        assert len(answers) == min(3, len(present))
        for question, answer in answers.items():
            words = question.rstrip("?").split()
            if question.startswith("What colour"):  # What colour is the {shape}?
                check_object(pixels, size, answer, shape=words[-1])
            elif question.startswith("What shape"):  # What shape is the {colour} object?
                check_object(pixels, size, words[-2], shape=answer)
            else:  # Where is the {colour} {shape}?
                check_object(pixels, size, words[-2], shape=words[-1], position=answer)
        # The dark pixels are exactly the digit's bitmap, scaled.
        dark = (pixels.max(axis=-1) < 60)
        rows, cols = np.nonzero(dark)
        glyph = dark[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        scale = max(1, size // 3 // 8)
        bitmap = np.array([[c == "1" for c in row] for row in synthetic._FONT[digit]])
        trimmed = bitmap[:, bitmap.any(axis=0)][bitmap.any(axis=1)]
        np.testing.assert_array_equal(glyph, np.kron(trimmed, np.ones((scale, scale), bool)))


def question_pairs(record):
    turns = record["conversations"]
    assert turns[0]["value"].startswith("<image>\n"), record["id"]
    return [(q["value"].removeprefix("<image>\n"), a["value"])
            for q, a in zip(turns[::2], turns[1::2], strict=True)]


@pytest.mark.parametrize("kind", ["qa", "lookup"])
def test_no_question_names_another_turns_answer(generated, kind):
    """A conversation's answers must come from the image, not from its other turns: no
    question names the colour or shape that another question answers."""
    conversations = json.loads((generated / f"train_{kind}.json").read_text())
    names = set(synthetic.COLOURS) | set(synthetic.SHAPES)
    attribute_questions = 0
    for record in conversations:
        pairs = question_pairs(record)
        for i, (_, answer) in enumerate(pairs):
            for j, (question, _) in enumerate(pairs):
                named = set(question.rstrip("?").split()) & names
                assert i == j or answer not in named, (record["id"], pairs)
        attribute_questions += len(pairs) - (2 if kind == "qa" else 0)
    # Scenes hold 1-4 objects: 1-3 attribute questions each in qa, 1-4 in lookup, and every
    # kind of scene occurs.
    most = 3 if kind == "qa" else 4
    assert len(conversations) < attribute_questions < most * len(conversations)


def test_lookup_conversations_ask_one_attribute_of_every_object(generated):
    """Each image has two lookup conversations: the cell of every object, then the colour
    or the shape of every object; each question names one object of the scene and its
    answer is that object's; over the images every form of question occurs."""
    conversations = json.loads((generated / "train_lookup.json").read_text())
    assert len(conversations) == 2 * 40
    forms = {"position": "Where is the ", "colour": "What colour is the ",
             "shape": "What shape is the "}
    colours, shapes = set(synthetic.COLOURS), set(synthetic.SHAPES)
    seen = set()
    for index in range(40):
        _, info = synthetic.scene(np.random.default_rng([5, synthetic.SPLITS["train"], index]),
                                  48, None)
        objects = info["objects"]
        cells, attributes = (question_pairs(r) for r in conversations[2 * index:2 * index + 2])
        for pairs, categories in ((cells, {"position"}), (attributes, {"colour", "shape"})):
            asked = {c for c in categories if all(q.startswith(forms[c]) for q, _ in pairs)}
            assert len(asked) == 1, pairs
            category = asked.pop()
            named = []
            for question, answer in pairs:
                words = set(question.rstrip("?").split())
                matches = [o for o in objects
                           if words & {o["colour"], o["shape"]}
                           and not words & (colours - {o["colour"]})
                           and not words & (shapes - {o["shape"]})]
                assert len(matches) == 1, (question, objects)
                assert answer == matches[0][category], (question, answer, objects)
                named.append(objects.index(matches[0]))
                seen.add((category, bool(words & colours), bool(words & shapes)))
            assert sorted(named) == list(range(len(objects)))
    # The cell by colour and shape (the held-out form), by colour, by shape; the colour of
    # a shape; the shape of a colour.
    assert seen == {("position", True, True), ("position", True, False),
                    ("position", False, True), ("colour", False, True), ("shape", True, False)}



def item_offsets(pixels, info, size):
    """Each shape's and the digit's (row, col) offset inside its cell."""
    cell = size // 3
    offsets = []
    masks = [(colour_mask(pixels, o["colour"]), o["position"]) for o in info["objects"]]
    masks.append((pixels.max(axis=-1) < 60, info["digit_position"]))
    for mask, position in masks:
        row, col = divmod(synthetic.POSITIONS.index(position), 3)
        rows, cols = np.nonzero(mask)
        offsets.append([rows.min() - row * cell, cols.min() - col * cell])
    # The digit's glyph may start after blank rows / columns of its bitmap.
    bitmap = np.array([[c == "1" for c in row] for row in synthetic._FONT[info["digit"]]])
    scale = max(1, cell // 8)
    offsets[-1][0] -= bitmap.any(axis=1).argmax() * scale
    offsets[-1][1] -= bitmap.any(axis=0).argmax() * scale
    return [tuple(int(v) for v in offset) for offset in offsets]


def test_jitter_bounds_how_far_items_sit_off_their_cells_centre():
    size = 48  # 16 px cells: shapes of 12 px (slack 4), digits of 10 x 14 px (slack 6 x 2)
    seen = {None: set(), 0: set(), 1: set()}
    for jitter, offsets_seen in seen.items():
        for seed in range(25):
            pixels, info = synthetic.scene(np.random.default_rng(seed), size, jitter)
            offsets = item_offsets(pixels, info, size)
            offsets_seen.update(offsets)
            if jitter is not None:
                centres = [(2, 2)] * len(info["objects"]) + [(1, 3)]
                for (row, col), centre in zip(offsets, centres, strict=True):
                    assert abs(row - centre[0]) <= jitter and abs(col - centre[1]) <= jitter
    assert seen[0] == {(2, 2), (1, 3)}
    assert len(seen[1]) > 2 and len(seen[None]) > len(seen[1])
    with pytest.raises(ValueError, match="--jitter -1"):
        synthetic.generate("/nonexistent", 1, 0, jitter=-1)


def test_captions_follow_the_attributes_not_the_grid(generated):
    """Each caption names every object once, with its colour, shape and cell, either colour
    first in the colours' order or shape first in the shapes' order (both forms occur), so
    that no word follows from the object's place in the grid."""
    captions = json.loads((generated / "train_caption.json").read_text())
    forms = set()
    for record in captions:
        index = int(record["image"].rsplit("/", 1)[1].split(".")[0])
        rng = np.random.default_rng([5, synthetic.SPLITS["train"], index])
        _, info = synthetic.scene(rng, 48, None)
        text = record["conversations"][1]["value"]
        listed, digit = text.rstrip(".").split("; ")
        assert digit == f"the digit {info['digit']} at the {info['digit_position']}"
        items = listed.replace(" and ", ", ").split(", ")
        colour_first = [f"a {o['colour']} {o['shape']} at the {o['position']}"
                        for o in sorted(info["objects"],
                                        key=lambda o: list(synthetic.COLOURS).index(o["colour"]))]
        shape_first = [f"a {o['shape']} in {o['colour']} at the {o['position']}"
                       for o in sorted(info["objects"],
                                       key=lambda o: synthetic.SHAPES.index(o["shape"]))]
        assert items in (colour_first, shape_first), (record["id"], text)
        forms.add("colour" if items == colour_first else "shape")
    assert forms == {"colour", "shape"}


def test_a_vocabulary_too_small_for_the_text_is_the_users_mistake(tmp_path):
    with pytest.raises(InputError, match="--tokenizer-vocab 50: Vocabulary size is smaller"):
        synthetic.generate(str(tmp_path), 2, 0, num_eval=1, tokenizer_vocab=50)
