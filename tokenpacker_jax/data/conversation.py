"""Conversation templates and their token ids with the supervision mask (docs/reference.md §5-§6).

A LLaVA record's ``conversations`` (``from`` = human/gpt, ``value`` = text) become turns
(``parse_turns``), a template renders the turns as a list of segments (text, special
tokens, the image slot, each supervised or not), and ``tokenize_segments`` turns segments
into ids. Supervision is a property of the segment, so the mask is right by construction.

Templates (``TEMPLATES``):

- ``plain`` (stage 1): ``<s>`` ``<image>`` caption ``\\n``; the caption and its newline are
  supervised. The user's text is dropped, as in the reference.
- ``vicuna_v1`` (stage 2): ``<s>`` system ``" "`` then per round
  ``USER: {q} ASSISTANT: {a}</s>``; answers (with the space in front of them) and ``</s>``
  are supervised.
- ``llama3``: ``<|begin_of_text|>`` then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n``
  ``{text}<|eot_id|>`` per turn (optional system turn first); answers and ``<|eot_id|>``
  are supervised.
- ``gemma``: ``<bos>`` then ``<start_of_turn>user\\n{q}<end_of_turn>\\n``
  ``<start_of_turn>model\\n{a}<end_of_turn>\\n``; answers and ``<end_of_turn>`` are
  supervised (the newline after it belongs to the next turn's prompt). A system prompt goes
  in front of the first user text, as Gemma's own chat template does.

The turn holding ``<image>`` is rewritten by the reference's rule (``place_image``): the
marker leaves its place, the rest of the turn is stripped, and the turn becomes ``<image>``,
newline, rest; with nothing else in the turn it is just ``<image>`` (no newline). The image
slot stands where ``<image>`` now is, at the start of the turn.

Token ids equal what the reference gets from tokenising the whole prompt, split at the
image as its ``tokenizer_image_token`` does: text between hard boundaries (sequence start,
image, special token) is tokenised in one piece; a segment boundary inside such a stretch
is taken where the ids of the text before it end, and it is checked that those ids are a
prefix of the ids of the longer text, so the boundary is a token boundary (otherwise the
record fails with reason ``tokenization``). Text right after a special token is tokenised
with that token's string in front, so tokenizers that add a leading space only at the start
of the text (LLaMA ``legacy=False``) behave as they do on the whole prompt.

The tokenizer needs little: ``encode(text)`` without BOS/EOS added (special-token strings
in the text map to their ids), ``bos_id``, ``eos_id``, ``pad_id``; ``data.text_tokenizer``
adapts ours and transformers' tokenizers to that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tokenpacker_jax.data import errors
from tokenpacker_jax.data.errors import DataError
from tokenpacker_jax.data.text_tokenizer import text_tokenizer

IMAGE_PLACEHOLDER = "<image>"
# Marks the image slot in token ids until the pipeline expands it into visual positions
# (the reference's IMAGE_TOKEN_INDEX).
IMAGE_TOKEN_ID = -200
USER, ASSISTANT = "user", "assistant"
_ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str  # USER or ASSISTANT
    text: str


def parse_turns(conversations: Any, *, has_image: bool) -> list[Turn]:
    """A LLaVA ``conversations`` list -> turns, checked and with the image placeholder moved.

    Raises DataError: empty conversation, a malformed turn, roles not alternating
    user/assistant starting with the user and ending with the assistant, ``<image>``
    without an image (or in an answer, or more than once), an image without ``<image>``.
    """
    if conversations is None or (isinstance(conversations, list) and not conversations):
        raise DataError(errors.EMPTY_CONVERSATION, "the conversation is empty")
    if not isinstance(conversations, list):
        raise DataError(errors.BAD_RECORD, f"'conversations' must be a list, got "
                                           f"{type(conversations).__name__}")
    turns = []
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) \
                or not isinstance(turn.get("from"), str):
            raise DataError(errors.BAD_RECORD, f"turn {index} needs string fields 'from' and "
                                               f"'value', got {turn!r:.80}")
        role = _ROLES.get(turn["from"].lower())
        if role is None:
            raise DataError(errors.ROLE_ORDER, f"turn {index} is from {turn['from']!r}; "
                                               f"known: {sorted(_ROLES)}")
        expected = USER if index % 2 == 0 else ASSISTANT
        if role != expected:
            raise DataError(errors.ROLE_ORDER, f"turn {index} is from {turn['from']!r}, "
                                               f"expected the {expected}")
        if not turn["value"].strip():
            raise DataError(errors.BAD_RECORD, f"turn {index} ({turn['from']}) is empty")
        turns.append(Turn(role, turn["value"]))
    if turns[-1].role != ASSISTANT:
        raise DataError(errors.ROLE_ORDER, f"the last turn ({len(turns) - 1}) is from the user; "
                                           f"a conversation ends with an answer")

    placements = [(i, t.text.count(IMAGE_PLACEHOLDER)) for i, t in enumerate(turns)]
    total = sum(count for _, count in placements)
    if not has_image:
        if total:
            raise DataError(errors.PLACEHOLDER_WITHOUT_IMAGE,
                            f"{IMAGE_PLACEHOLDER} in the text but the record has no image")
        return turns
    if total == 0:
        raise DataError(errors.IMAGE_WITHOUT_PLACEHOLDER,
                        f"the record has an image but no {IMAGE_PLACEHOLDER} in its text")
    if total > 1:
        raise DataError(errors.BAD_RECORD, f"{IMAGE_PLACEHOLDER} appears {total} times; one "
                                           f"image per sample")
    index = next(i for i, count in placements if count)
    if turns[index].role != USER:
        raise DataError(errors.BAD_RECORD, f"{IMAGE_PLACEHOLDER} in an answer (turn {index})")
    turns[index] = Turn(USER, place_image(turns[index].text))
    return turns


def place_image(text: str) -> str:
    """The text of the turn holding the image, as the reference's ``preprocess_multimodal``
    rewrites it: every ``<image>`` is taken out, the rest is stripped of surrounding
    whitespace, and the turn becomes ``<image>`` + newline + rest, stripped once more, so a
    turn with nothing besides the marker (and whitespace) is exactly ``<image>``.

    "<image>" / "  <image>\\n" -> "<image>";  "What? <image>" / "<image>What?" ->
    "<image>\\nWhat?";  "Is <image> red?" -> "<image>\\nIs  red?".
    """
    rest = text.replace(IMAGE_PLACEHOLDER, "").strip()
    return f"{IMAGE_PLACEHOLDER}\n{rest}" if rest else IMAGE_PLACEHOLDER


@dataclasses.dataclass(frozen=True)
class Text:
    text: str
    supervised: bool = False


@dataclasses.dataclass(frozen=True)
class Special:
    """One special token, given by its string (e.g. ``</s>``)."""

    text: str
    supervised: bool = False


@dataclasses.dataclass(frozen=True)
class Bos:
    """The tokenizer's BOS id (nothing if it has none)."""


@dataclasses.dataclass(frozen=True)
class ImageSlot:
    """Where the image's visual positions go."""


Segment = Text | Special | Bos | ImageSlot


def _user_text(text: str, supervised: bool = False) -> list[Segment]:
    """User text with the image slot where ``<image>`` is."""
    if IMAGE_PLACEHOLDER not in text:
        return [Text(text, supervised)]
    before, after = text.split(IMAGE_PLACEHOLDER, 1)
    return [Text(before, supervised), ImageSlot(), Text(after, supervised)]


def _pairs(turns: Sequence[Turn]) -> list[tuple[str, str]]:
    return [(turns[i].text, turns[i + 1].text) for i in range(0, len(turns), 2)]


@dataclasses.dataclass(frozen=True)
class Template:
    """A chat format: ``segments(turns)`` and the special tokens it uses."""

    name: str
    system: str = ""
    specials: tuple[str, ...] = ()
    end_marker: str = ""  # what closes a supervised answer (for tests and docs)

    def segments(self, turns: Sequence[Turn]) -> list[Segment]:
        render = getattr(self, f"_render_{self.name}")
        return render(turns)

    def _render_plain(self, turns):
        if len(turns) != 2:
            raise DataError(errors.BAD_RECORD, f"the plain template takes one question and "
                                               f"one answer, got {len(turns)} turns")
        segments: list[Segment] = [Bos()]
        if IMAGE_PLACEHOLDER in turns[0].text:
            segments.append(ImageSlot())
        segments.append(Text(turns[1].text + "\n", supervised=True))
        return segments

    def _render_vicuna_v1(self, turns):
        segments: list[Segment] = [Bos()]
        prefix = self.system + " "
        for question, answer in _pairs(turns):
            segments += _user_text(f"{prefix}USER: {question} ASSISTANT:")
            segments += [Text(" " + answer, supervised=True), Special("</s>", supervised=True)]
            prefix = ""
        return segments

    def _render_llama3(self, turns):
        segments: list[Segment] = [Bos()]

        def header(role):
            return [Special("<|start_header_id|>"), Text(role), Special("<|end_header_id|>")]

        if self.system:
            segments += header("system") + [Text("\n\n" + self.system.strip()),
                                            Special("<|eot_id|>")]
        for question, answer in _pairs(turns):
            segments += header("user") + _user_text("\n\n" + question.strip())
            segments += [Special("<|eot_id|>")] + header("assistant") + [Text("\n\n")]
            segments += [Text(answer.strip(), supervised=True),
                         Special("<|eot_id|>", supervised=True)]
        return segments

    def _render_gemma(self, turns):
        segments: list[Segment] = [Bos()]
        system = self.system.strip() + "\n\n" if self.system.strip() else ""
        for question, answer in _pairs(turns):
            segments += [Special("<start_of_turn>")]
            segments += _user_text("user\n" + system + question.strip())
            segments += [Special("<end_of_turn>"), Text("\n"), Special("<start_of_turn>"),
                         Text("model\n"), Text(answer.strip(), supervised=True),
                         Special("<end_of_turn>", supervised=True), Text("\n")]
            system = ""
        return segments


TEMPLATES = {
    "plain": Template("plain", end_marker="\n"),
    "vicuna_v1": Template("vicuna_v1", system=VICUNA_SYSTEM, specials=("</s>",),
                          end_marker="</s>"),
    "llama3": Template("llama3", specials=("<|start_header_id|>", "<|end_header_id|>",
                                           "<|eot_id|>"), end_marker="<|eot_id|>"),
    "gemma": Template("gemma", specials=("<start_of_turn>", "<end_of_turn>"),
                      end_marker="<end_of_turn>"),
}


def get_template(name: str, system: str | None = None) -> Template:
    """A template by name; ``system`` replaces its default system prompt ("" for none)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}")
    template = TEMPLATES[name]
    if system is not None:
        template = dataclasses.replace(template, system=system)
    return template


@dataclasses.dataclass(frozen=True)
class TokenizedConversation:
    """ids: token ids with ``IMAGE_TOKEN_ID`` at the image slot; supervised: per id."""

    ids: list[int]
    supervised: list[bool]


class ConversationTokenizer:
    """Turns -> ids and supervision for one template and tokenizer.

    Checks once that every special token of the template is a single id of the tokenizer.
    """

    def __init__(self, template: Template | str, tokenizer: Any):
        self.template = get_template(template) if isinstance(template, str) else template
        self.tokenizer = text_tokenizer(tokenizer)
        self.special_ids = {}
        for text in self.template.specials:
            ids = self.tokenizer.encode(text)
            if len(ids) != 1:
                raise ValueError(f"template {self.template.name!r} needs {text!r} to be one "
                                 f"special token of the tokenizer; it encodes to {ids}")
            self.special_ids[text] = ids[0]

    def __call__(self, turns: Sequence[Turn]) -> TokenizedConversation:
        return self.tokenize_segments(self.template.segments(turns))

    def tokenize_segments(self, segments: Sequence[Segment]) -> TokenizedConversation:
        encode = self.tokenizer.encode
        ids: list[int] = []
        supervised: list[bool] = []
        # The text since the last hard boundary and its ids (the ids of a longer text must
        # start with these for the segment boundary to be a token boundary).
        context, context_ids = "", []
        for segment in segments:
            if isinstance(segment, Bos):
                if self.tokenizer.bos_id is not None:
                    ids.append(self.tokenizer.bos_id)
                    supervised.append(False)
                context, context_ids = "", []
            elif isinstance(segment, ImageSlot):
                ids.append(IMAGE_TOKEN_ID)
                supervised.append(False)
                context, context_ids = "", []
            elif isinstance(segment, Special):
                token = self.special_ids[segment.text]
                ids.append(token)
                supervised.append(segment.supervised)
                context, context_ids = segment.text, [token]
            elif segment.text:
                full = encode(context + segment.text)
                if full[:len(context_ids)] != context_ids:
                    raise DataError(errors.TOKENIZATION,
                                    f"{self.template.name}: the text before "
                                    f"{segment.text[:30]!r} does not end on a token boundary")
                new = full[len(context_ids):]
                ids.extend(new)
                supervised.extend([segment.supervised] * len(new))
                context, context_ids = context + segment.text, full
        return TokenizedConversation(ids, supervised)
