"""Generation prompts: a question (about an image) -> what the model prefills, ending where
the answer begins; prompts left-padded into one batch (the decoder's KV-cache convention).

    Prompt       ids int32 [L] (the pad id at visual positions), image_mask bool [L],
                 pixel_values float32 [N, S, S, 3], tile_mask bool [N]
    build_prompt         one question (about an image)
    conversation_prompt  a whole conversation: earlier turns, then the question
    left_pad     prompts -> data.batch.PREFILL_INPUTS: [B, T] (T = length) and [B, N, S, S, 3]

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
from tokenpacker_jax.data.conversation import (
    ASSISTANT,
    IMAGE_PLACEHOLDER,
    USER,
    ConversationTokenizer,
    ImageSlot,
    Turn,
    get_template,
    parse_turns,
    place_image,
)
from tokenpacker_jax.data.errors import DataError
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
    segments = builder.conversation.template.segments([Turn("human", text), Turn("gpt", "")])
    first_answer = next(i for i, s in enumerate(segments) if getattr(s, "supervised", False))
    return _prompt(builder, builder.conversation, segments[:first_answer], image)


def conversation_prompt(builder: ExampleBuilder, turns: Sequence[Turn], image: Any = None,
                        system: str | None = None) -> Prompt:
    """The generation prompt of a whole conversation: ``turns`` alternate user / assistant
    and end with the user's question; the image (a PIL image, if given) goes where
    ``<image>`` stands in a user turn, placed as training places it (``parse_turns``; one
    image per conversation). The template renders the history with an empty last answer
    and the prompt stops where that answer would begin, so earlier answers carry their end
    markers as in training. ``system`` replaces the template's system prompt.

    Raises ValueError: turns out of order or not ending with the user, ``<image>`` without
    an image (or an image without ``<image>``), more turns than the template holds.
    """
    conversation = builder.conversation
    if system is not None and system != conversation.template.system:
        conversation = ConversationTokenizer(
            get_template(conversation.template.name, system), conversation.tokenizer)
    if not turns or turns[-1].role != USER:
        raise ValueError("a conversation to answer ends with a user turn")
    # parse_turns checks finished conversations: a stand-in answer, dropped again.
    records = [{"from": turn.role, "value": turn.text} for turn in turns]
    try:
        checked = parse_turns(records + [{"from": ASSISTANT, "value": "-"}],
                              has_image=image is not None)
        segments = conversation.template.segments(checked[:-1] + [Turn(ASSISTANT, "")])
    except DataError as err:
        raise ValueError(f"template {conversation.template.name!r}: {err}") from err
    return _prompt(builder, conversation, segments[:_last_answer_start(segments)], image)


def _last_answer_start(segments: Sequence[Any]) -> int:
    """Index of the first segment of the last run of supervised segments (the answer to
    give)."""
    start = None
    for i, segment in enumerate(segments):
        if getattr(segment, "supervised", False) and not (
                i and getattr(segments[i - 1], "supervised", False)):
            start = i
    if start is None:
        raise ValueError("the template marks no answer")
    return start


def _prompt(builder: ExampleBuilder, conversation: ConversationTokenizer,
            segments: Sequence[Any], image: Any | None) -> Prompt:
    """Prompt segments (and the image) -> ids with the image's positions spliced in."""
    try:
        tokens = conversation.tokenize_segments(segments)
    except DataError as err:
        raise ValueError(str(err)) from err
    pixels, tile_mask = builder.no_image()
    span_ids = span_visual = None
    if image is not None:
        if not any(isinstance(s, ImageSlot) for s in segments):
            raise ValueError(f"template {conversation.template.name!r} put no image slot in "
                             f"the prompt")
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
    return batch_lib.select(inputs, batch_lib.PREFILL_INPUTS)
