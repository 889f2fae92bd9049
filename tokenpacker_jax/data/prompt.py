"""Generation prompts: a question (about an image) -> what the model prefills, ending where
the answer begins; prompts left-padded into one batch (the decoder's KV-cache convention).

    Prompt       ids int32 [L] (the pad id at visual positions), image_mask bool [L],
                 pixel_values float32 [N, S, S, 3], tile_mask bool [N]
    left_pad     prompts -> data.batch.MODEL_INPUTS: [B, T] (T = length) and [B, N, S, S, 3]

The question is the user turn of the builder's conversation template; with an image, the
turn is what training makes of a turn holding ``<image>`` (``conversation.place_image``), and
the image becomes positions exactly as in training (``ExampleBuilder.image_tiles``,
``splice_image``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.data.conversation import IMAGE_PLACEHOLDER, ImageSlot, Turn, place_image
from tokenpacker_jax.data.example import ExampleBuilder, splice_image


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
    With an image, ``<image>`` goes where training puts it (``place_image``), also when the
    question names it itself (once at most).

    Raises ValueError: ``<image>`` in the question without an image, or more than once.
    """
    count = question.count(IMAGE_PLACEHOLDER)
    if image is None and count:
        raise ValueError(f"{IMAGE_PLACEHOLDER} in the question but no image given: "
                         f"{question!r:.80}")
    if count > 1:
        raise ValueError(f"{IMAGE_PLACEHOLDER} appears {count} times in the question; one "
                         f"image per prompt: {question!r:.80}")
    text = place_image(question) if image is not None else question
    template = builder.conversation.template
    segments = template.segments([Turn("human", text), Turn("gpt", "")])
    first_answer = next(i for i, s in enumerate(segments) if getattr(s, "supervised", False))
    segments = segments[:first_answer]
    tokens = builder.conversation.tokenize_segments(segments)
    pixels, tile_mask = builder.no_image()
    span_ids = span_visual = None
    if image is not None:
        if not any(isinstance(s, ImageSlot) for s in segments):
            raise ValueError(f"template {template.name!r} put no image slot in the prompt")
        pixels, tile_mask, span_ids, span_visual = builder.image_tiles(image)
    ids, _, visual, _ = splice_image(tokens.ids, tokens.supervised, span_ids, span_visual)
    return Prompt(ids.astype(np.int32), visual, pixels, tile_mask)


def left_pad(prompts: Sequence[Prompt], pad_id: int, length: int | None = None
             ) -> dict[str, np.ndarray]:
    """A batch of prompts (the model's inputs), left-padded to ``length`` (default: the
    longest)."""
    inputs = {}
    inputs["input_ids"], inputs["attention_mask"] = batch_lib.pad_rows(
        [p.ids for p in prompts], pad_id, length)
    inputs["image_mask"], _ = batch_lib.pad_rows([p.image_mask for p in prompts], False,
                                                 length, dtype=bool)
    inputs["pixel_values"] = np.stack([p.pixel_values for p in prompts])
    return batch_lib.select(inputs, batch_lib.MODEL_INPUTS)
