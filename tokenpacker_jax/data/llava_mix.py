"""Conversations whose lengths follow the shape of LLaVA-1.5's instruction mix (mix665k),
for measuring packing and padding (``data.stats``, the packing benchmark): the text is
random words, only the lengths, turn counts and image placement carry over.

The categories and their shares are the mix's own (LLaVA-1.5, arXiv 2310.03744, Table 7:
665K conversations); what a conversation of each category looks like follows the prompts
the mix uses (VQA answers of "a single word or phrase", multiple choice answered by the
option's letter, region tasks with [x1, y1, x2, y2] boxes, several questions about one image
merged into one conversation). The turn counts and word counts are this module's
assumptions, chosen to match those forms (the mix's exact histograms are not published):

| category     | mix665k sources (K)        | share | image | turns | words: question / answer |
|--------------|----------------------------|-------|-------|-------|--------------------------|
| conversation | LLaVA-Instruct conv. (58)  |  8.7% | yes   | 2-6   | 6-15 / ~35               |
| detail       | LLaVA-Instruct detail (23) |  3.5% | yes   | 1     | 8-12 / ~110              |
| reasoning    | LLaVA-Instruct complex (77)| 11.6% | yes   | 1     | 10-25 / ~100             |
| text_only    | ShareGPT (40)              |  6.0% | no    | 1-8   | ~30 / ~180               |
| short_vqa    | VQAv2 83, GQA 72, OKVQA 9, |       |       |       | 5-12 + instruction /     |
|              | OCR-VQA 80                 | 36.7% | yes   | 1-12  | 1-3                      |
| choice       | A-OKVQA (66)               |  9.9% | yes   | 1     | 8-14 + 4 options / 1     |
| caption      | TextCaps (22)              |  3.3% | yes   | 1     | 6 / 8-25                 |
| region       | RefCOCO 48, VG 86          | 20.2% | yes   | 3-15  | 8 + a box / 2-10         |

Images (what HD tiling sees: their sizes, not their content, which is a synthetic scene
scaled up) take the sizes of the sources' photos, also assumed: COCO's 640x480 / 480x640 /
640x427 for LLaVA-Instruct, VQAv2, OKVQA, A-OKVQA and RefCOCO; Visual Genome's 500x375 /
800x600 for GQA and region descriptions; book covers of 333x500 for OCR-VQA (a third of
short_vqa); OpenImages' 1024x768 for TextCaps.

"~N": lognormal with median N, sigma 0.6 (text_only 0.9 for both: ShareGPT's long tail,
some dialogues longer than 2,048 tokens), cut at 8x the median; "a-b": uniform. With a
tokenizer whose vocabulary holds the word pool (``synthetic --tokenizer-vocab 2000``), a
word is about one token; box coordinates take about twenty (digits are split).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

WORDS = tuple("""the a of and to in is that it for on with as at by this from be are was an
or image picture shows there which person people man woman child dog cat car street table
room window building tree sky water left right top bottom near behind front next colour red
blue green white black yellow small large big old new two three several many some other one
sitting standing walking holding wearing looking playing riding carrying eating open closed
bright dark light wooden metal plastic glass stone grass road sign book cup plate bottle
chair bed wall floor door house city field beach mountain river boat bus train bike bird
horse sheep cow ball shirt hat bag phone screen computer kitchen bathroom park scene view
background foreground middle corner side edge part area surface group pair couple crowd
because while when where however also likely possibly suggests appears seems indicates
might could would should can may will reason answer question describe detail explain
describe what how why who does do has have been being very quite rather more most less
first then after before during about above below between around across along into over
under through against without within""".split())
VQA_INSTRUCTION = "Answer the question using a single word or phrase."
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
REGION_PROMPT = "Please provide a short description for this region:"


COCO = ((640, 480), (480, 640), (640, 427))
VISUAL_GENOME = ((500, 375), (800, 600))
BOOK_COVER = ((333, 500),)
OPEN_IMAGES = ((1024, 768),)


@dataclasses.dataclass(frozen=True)
class Category:
    """One kind of conversation; lengths in words (see the module docstring)."""

    name: str
    share: float
    image: bool
    turns: tuple[int, int]  # uniform, inclusive
    question: tuple[int, int]  # uniform words, inclusive
    answer_median: float  # words
    answer_sigma: float  # lognormal; 0: uniform in answer_range
    answer_range: tuple[int, int] = (1, 1)
    question_sigma: float = 0.0  # lognormal question lengths around question[0] instead
    image_sizes: tuple[tuple[int, int], ...] = COCO  # (width, height), drawn uniformly


# Shares: conversations of each category in mix665k (Table 7), over 664K.
CATEGORIES = (
    Category("conversation", 58, True, (2, 6), (6, 15), 35, 0.6),
    Category("detail", 23, True, (1, 1), (8, 12), 110, 0.6),
    Category("reasoning", 77, True, (1, 1), (10, 25), 100, 0.6),
    Category("text_only", 40, False, (1, 8), (30, 30), 180, 0.9, question_sigma=0.9),
    # VQAv2 and OKVQA (92K) COCO, GQA (72K) Visual Genome, OCR-VQA (80K) book covers.
    Category("short_vqa", 244, True, (1, 12), (5, 12), 0, 0, (1, 3),
             image_sizes=COCO * 3 + VISUAL_GENOME * 3 + BOOK_COVER * 4),
    Category("choice", 66, True, (1, 1), (8, 14), 0, 0, (1, 1)),
    Category("caption", 22, True, (1, 1), (6, 6), 0, 0, (8, 25), image_sizes=OPEN_IMAGES),
    # RefCOCO (48K) COCO, Visual Genome (86K).
    Category("region", 134, True, (3, 15), (5, 5), 0, 0, (2, 10),
             image_sizes=COCO + VISUAL_GENOME * 3),
)


def _words(rng: np.random.Generator, count: int) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), max(1, count)))


def _lognormal(rng: np.random.Generator, median: float, sigma: float) -> int:
    return int(np.clip(round(median * np.exp(sigma * rng.standard_normal())), 1, 8 * median))


def _box(rng: np.random.Generator) -> str:
    x1, y1 = rng.uniform(0, 0.7, 2)
    x2, y2 = x1 + rng.uniform(0.05, 0.3), y1 + rng.uniform(0.05, 0.3)
    return "[" + ", ".join(f"{v:.2f}" for v in (x1, y1, x2, y2)) + "]"


def _question(rng: np.random.Generator, category: Category) -> str:
    if category.question_sigma:
        text = _words(rng, _lognormal(rng, category.question[0], category.question_sigma))
    else:
        text = _words(rng, int(rng.integers(category.question[0], category.question[1] + 1)))
    if category.name == "short_vqa":
        return f"{text}?\n{VQA_INSTRUCTION}"
    if category.name == "choice":
        options = "\n".join(f"{letter}. {_words(rng, int(rng.integers(1, 4)))}"
                            for letter in "ABCD")
        return f"{text}?\n{options}\n{CHOICE_INSTRUCTION}"
    if category.name == "region":
        return f"{REGION_PROMPT} {_box(rng)}."
    return text + "?"


def _answer(rng: np.random.Generator, category: Category) -> str:
    if category.name == "choice":
        return "ABCD"[int(rng.integers(4))]
    if category.answer_sigma:
        return _words(rng, _lognormal(rng, category.answer_median, category.answer_sigma)) + "."
    low, high = category.answer_range
    return _words(rng, int(rng.integers(low, high + 1)))


def conversation(rng: np.random.Generator, category: Category,
                 image: str | None) -> dict[str, Any]:
    """One LLaVA-format record of ``category`` (``image``: its path, for image ones)."""
    turns = []
    for turn in range(int(rng.integers(category.turns[0], category.turns[1] + 1))):
        question = _question(rng, category)
        if turn == 0 and category.image:
            question = "<image>\n" + question
        turns += [{"from": "human", "value": question},
                  {"from": "gpt", "value": _answer(rng, category)}]
    record = {"category": category.name, "conversations": turns}
    if category.image:
        record["image"] = image
    return record


def records(num: int, seed: int) -> list[dict[str, Any]]:
    """``num`` conversations, categories drawn with the mix's shares; an image one names
    ``images/mix/{index:06d}.jpg`` and gives its (width, height) under ``image_size``."""
    rng = np.random.default_rng([seed, 665])
    shares = np.asarray([c.share for c in CATEGORIES], float)
    chosen = rng.choice(len(CATEGORIES), size=num, p=shares / shares.sum())
    out = []
    for index, which in enumerate(chosen):
        category = CATEGORIES[int(which)]
        record = conversation(rng, category, f"images/mix/{index:06d}.jpg")
        if category.image:
            size = category.image_sizes[int(rng.integers(len(category.image_sizes)))]
            record["image_size"] = list(size)
        out.append({"id": f"mix-{index:06d}", **record})
    return out
