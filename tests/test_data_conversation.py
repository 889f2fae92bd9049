"""Conversation templates: ids and supervision against the reference's procedure (Vicuna /
plain) and, for every template, supervised tokens = the answers plus their end marker."""

import numpy as np
import pytest
from PIL import Image

from tokenpacker_jax.data import errors
from tokenpacker_jax.data.conversation import (
    IMAGE_TOKEN_ID,
    VICUNA_SYSTEM,
    ConversationTokenizer,
    Text,
    get_template,
    parse_turns,
)
from tokenpacker_jax.data.errors import DataError
from tokenpacker_jax.data.example import ExampleBuilder, ImageSettings
from tokenpacker_jax.data.prompt import build_prompt
from tokenpacker_jax.data.text_tokenizer import text_tokenizer
from tokenpacker_jax.tokenizer import load_tokenizer

from data_helpers import gemma_like, llama3_like, tokenizer_image_token, vicuna_like

IGNORE = -100

CONVERSATIONS = [
    [{"from": "human", "value": "<image>\nWhat colour is the circle?"},
     {"from": "gpt", "value": "red"}],
    # Placeholder after the text (moved to the front), two rounds, a digit answer.
    [{"from": "human", "value": "What is in this picture? <image>"},
     {"from": "gpt", "value": "A blue square in the top left, and a star."},
     {"from": "human", "value": "How many objects are there?"},
     {"from": "gpt", "value": "3"}],
    # Text only, odd spacing and punctuation, three rounds.
    [{"from": "human", "value": "describe  the chat"},
     {"from": "gpt", "value": "a chat, between: polite answers!"},
     {"from": "human", "value": "and 12?"},
     {"from": "gpt", "value": "  spaced   answer "},
     {"from": "human", "value": "what's this"},
     {"from": "gpt", "value": "it's a (green) triangle\nover two lines"}],
    # Non-ASCII text goes through byte fallback.
    [{"from": "human", "value": "<image>\nNommez la forme ?"},
     {"from": "gpt", "value": "un carré vert — 4 côtés"}],
]


def move_image_to_front(conversation):
    """The reference's ``preprocess_multimodal``: ``<image>`` + newline in front of the rest."""
    turns = [dict(turn) for turn in conversation]
    for turn in turns:
        if "<image>" in turn["value"]:
            turn["value"] = ("<image>\n" + turn["value"].replace("<image>", "").strip()).strip()
    return turns


def reference_v1(conversation, tokenizer):
    """(ids, labels) by the reference's procedure (LLaVA train.py ``preprocess_v1``), written
    out plainly: tokenise the whole prompt, then mask round by round with offsets."""
    has_image = any("<image>" in turn["value"] for turn in conversation)
    turns = move_image_to_front(conversation) if has_image else conversation
    prompt = VICUNA_SYSTEM + " "
    for number, turn in enumerate(turns):
        role = "USER" if number % 2 == 0 else "ASSISTANT"
        prompt += f"{role}: {turn['value']}" + (" " if number % 2 == 0 else "</s>")

    def tokenize(text):
        return tokenizer_image_token(text, tokenizer) if has_image \
            else tokenizer(text).input_ids

    ids = tokenize(prompt)
    labels = list(ids)
    total, cur = len(ids), 1
    labels[0] = IGNORE
    for number, round_text in enumerate(prompt.split("</s>")):
        if round_text == "":
            break
        parts = round_text.split(" ASSISTANT: ")
        if len(parts) != 2:
            break
        parts[0] += " ASSISTANT: "
        round_len = len(tokenize(round_text))
        instruction_len = len(tokenize(parts[0])) - 2
        if number != 0 and not tokenizer.legacy:
            round_len -= 1
            instruction_len -= 1
        labels[cur:cur + instruction_len] = [IGNORE] * len(labels[cur:cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE] * len(labels[cur:])
    assert cur == total, f"the reference itself mismatches ({cur} vs {total})"
    return ids, labels


def reference_plain(conversation, tokenizer):
    """(ids, labels) by the reference's ``preprocess_plain``: the caption after the image."""
    prompt = "<image>" + conversation[1]["value"] + "\n"
    ids = tokenizer_image_token(prompt, tokenizer)
    masked = len(tokenizer_image_token("<image>", tokenizer))
    return ids, [IGNORE] * masked + ids[masked:]


def ours(template, conversation, tokenizer):
    """(ids, labels) by ``ConversationTokenizer``, for comparison with the reference's."""
    has_image = any("<image>" in turn["value"] for turn in conversation)
    result = ConversationTokenizer(template, tokenizer)(
        parse_turns(conversation, has_image=has_image))
    labels = [i if s else IGNORE for i, s in zip(result.ids, result.supervised, strict=True)]
    return result.ids, labels


@pytest.fixture(scope="module", params=[False, True], ids=["legacy=False", "legacy=True"])
def vicuna(request, tmp_path_factory):
    return vicuna_like(str(tmp_path_factory.mktemp("vicuna")), legacy=request.param)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return llama3_like(str(tmp_path_factory.mktemp("llama3")))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return gemma_like(str(tmp_path_factory.mktemp("gemma")))


def test_tiny_vicuna_tokenizer_splits_user_like_vicuna(vicuna):
    # What makes the reference's legacy=False arithmetic line up on the real vocabulary.
    assert vicuna.convert_ids_to_tokens(vicuna.encode(" USER", add_special_tokens=False)) \
        == ["▁", "USER"]
    after_eos = vicuna.convert_ids_to_tokens(vicuna.encode("</s>USER", add_special_tokens=False))
    assert after_eos == (["</s>", "▁", "USER"] if vicuna.legacy else ["</s>", "USER"])


@pytest.mark.parametrize("number", range(len(CONVERSATIONS)))
def test_vicuna_v1_equals_reference(vicuna, number):
    conversation = CONVERSATIONS[number]
    ref_ids, ref_labels = reference_v1(conversation, vicuna)
    ids, labels = ours("vicuna_v1", conversation, vicuna)
    assert ids == ref_ids
    assert labels == ref_labels
    assert sum(label != IGNORE for label in labels) > 0


@pytest.mark.parametrize("number", [0, 1, 3])
def test_plain_equals_reference(vicuna, number):
    conversation = CONVERSATIONS[number][:2]
    ref_ids, ref_labels = reference_plain(conversation, vicuna)
    ids, labels = ours("plain", conversation, vicuna)
    assert ids == ref_ids
    assert labels == ref_labels


def supervised_runs(ids, supervised):
    runs, current = [], []
    for token, flag in zip(ids, supervised, strict=True):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("template", ["vicuna_v1", "llama3", "gemma", "plain"])
@pytest.mark.parametrize("number", range(len(CONVERSATIONS)))
def test_supervised_tokens_are_the_answers_and_end_markers(template, number, vicuna, llama3,
                                                           gemma):
    tokenizer = {"vicuna_v1": vicuna, "plain": vicuna, "llama3": llama3,
                 "gemma": gemma}[template]
    conversation = CONVERSATIONS[number]
    if template == "plain":
        conversation = conversation[:2]
        if "<image>" not in conversation[0]["value"]:
            conversation = [{"from": "human", "value": "<image>"}, conversation[1]]
    has_image = any("<image>" in turn["value"] for turn in conversation)
    result = ConversationTokenizer(template, tokenizer)(
        parse_turns(conversation, has_image=has_image))
    answers = [turn["value"] for turn in conversation[1::2]]
    end = get_template(template).end_marker
    runs = [decode(tokenizer, run) for run in supervised_runs(result.ids, result.supervised)]
    if template == "vicuna_v1":
        # The space before an answer is in its first token (the reference supervises it
        # too); the LLaMA decoder drops one leading space of the decoded text.
        assert runs == [a + end for a in answers]
    elif template == "plain":
        assert runs == [answers[0] + end]
    else:
        assert runs == [a.strip() + end for a in answers]
    # Nothing else: every supervised id lies in one of those runs, and the prompt decodes
    # to the template text around them.
    assert sum(result.supervised) == sum(len(r) for r in supervised_runs(result.ids,
                                                                         result.supervised))
    assert result.ids.count(IMAGE_TOKEN_ID) == int(has_image)
    assert not any(s for i, s in zip(result.ids, result.supervised, strict=True)
                   if i == IMAGE_TOKEN_ID)


def test_llama3_and_gemma_prompts(llama3, gemma):
    conversation = CONVERSATIONS[1]
    turns = parse_turns(conversation, has_image=True)
    result = ConversationTokenizer("llama3", llama3)(turns)
    text = decode(llama3, [i for i in result.ids if i != IMAGE_TOKEN_ID])
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n\nWhat is in this "
        "picture?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA blue square in "
        "the top left, and a star.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHow "
        "many objects are there?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "3<|eot_id|>")
    assert result.ids[0] == llama3.bos_token_id
    result = ConversationTokenizer(get_template("gemma", system="Be brief."), gemma)(turns)
    text = decode(gemma, [i for i in result.ids if i != IMAGE_TOKEN_ID])
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\n\nWhat is in this picture?<end_of_turn>\n"
        "<start_of_turn>model\nA blue square in the top left, and a star.<end_of_turn>\n"
        "<start_of_turn>user\nHow many objects are there?<end_of_turn>\n<start_of_turn>model\n"
        "3<end_of_turn>\n")


def test_ids_equal_whole_prompt_tokenisation(llama3, gemma):
    # Text-only: our segment-by-segment ids are the tokenizer's ids of the whole prompt.
    conversation = CONVERSATIONS[2]
    turns = parse_turns(conversation, has_image=False)
    for name, tokenizer in (("llama3", llama3), ("gemma", gemma)):
        result = ConversationTokenizer(name, tokenizer)(turns)
        text = decode(tokenizer, result.ids)
        assert tokenizer.encode(text, add_special_tokens=False) == result.ids


def test_project_tokenizer_is_accepted(tmp_path):
    vicuna_like(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    tokenizer = load_tokenizer(tmp_path)
    adapted = text_tokenizer(tokenizer)
    assert (adapted.bos_id, adapted.eos_id, adapted.pad_id) == (1, 2, 0)
    result = ConversationTokenizer("vicuna_v1", tokenizer)(
        parse_turns(CONVERSATIONS[0], has_image=True))
    assert result.ids[0] == 1 and result.ids[-1] == 2 and result.supervised[-1]


def test_boundary_inside_a_token_is_an_error():
    class WholeText:  # one id per distinct text: no segment boundary is a token boundary
        bos_id, eos_id, pad_id = 1, 2, 0

        def encode(self, text):
            return [2] if text == "</s>" else [3 + len(text)]

    conversation = ConversationTokenizer("vicuna_v1", WholeText())
    with pytest.raises(DataError) as info:
        conversation(parse_turns(CONVERSATIONS[2], has_image=False))
    assert info.value.reason == errors.TOKENIZATION
    # A lone text segment needs no boundary.
    assert conversation.tokenize_segments([Text("abc")]).ids == [6]


@pytest.mark.parametrize("conversation, has_image, reason, words", [
    ([], False, errors.EMPTY_CONVERSATION, "empty"),
    (None, False, errors.EMPTY_CONVERSATION, "empty"),
    ([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"}], False,
     errors.ROLE_ORDER, "turn 0"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], False,
     errors.ROLE_ORDER, "turn 1"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
      {"from": "human", "value": "c"}], False, errors.ROLE_ORDER, "last turn"),
    ([{"from": "robot", "value": "a"}, {"from": "gpt", "value": "b"}], False,
     errors.ROLE_ORDER, "robot"),
    ([{"from": "human", "value": "<image>\na"}, {"from": "gpt", "value": "b"}], False,
     errors.PLACEHOLDER_WITHOUT_IMAGE, "no image"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], True,
     errors.IMAGE_WITHOUT_PLACEHOLDER, "no <image>"),
    ([{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "b"}], True,
     errors.BAD_RECORD, "2 times"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image>"}], True,
     errors.BAD_RECORD, "answer"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}], False,
     errors.BAD_RECORD, "empty"),
    ([{"from": "human"}, {"from": "gpt", "value": "b"}], False, errors.BAD_RECORD, "'value'"),
])
def test_parse_turns_rejects(conversation, has_image, reason, words):
    with pytest.raises(DataError) as info:
        parse_turns(conversation, has_image=has_image)
    assert info.value.reason == reason
    assert words in str(info.value)


# The reference's rule for the turn holding the image, in words: take the marker out, strip
# what is left, and put the marker in front of it followed by a newline; when nothing is
# left, the turn is the marker alone, with no newline after it.
PLACEMENTS = [
    # only the marker, bare or with whitespace around it
    ("<image>", "<image>"),
    ("  <image>  ", "<image>"),
    ("<image>\n", "<image>"),
    ("\n<image>\n\n", "<image>"),
    ("\t<image> \n", "<image>"),
    # the marker before, after and inside the text
    ("<image>\nWhat is it?", "<image>\nWhat is it?"),
    ("<image>What is it?", "<image>\nWhat is it?"),
    ("<image>  What is it?\n", "<image>\nWhat is it?"),
    ("What is it?<image>", "<image>\nWhat is it?"),
    (" What is it?\n<image> ", "<image>\nWhat is it?"),
    ("What <image>is it?", "<image>\nWhat is it?"),
    ("What is <image> it?", "<image>\nWhat is  it?"),
]


@pytest.mark.parametrize("value, expected", PLACEMENTS)
def test_image_turn_follows_the_reference_rule(value, expected):
    turns = parse_turns([{"from": "human", "value": value}, {"from": "gpt", "value": "A dog."}],
                        has_image=True)
    assert turns[0].text == expected
    assert turns[1].text == "A dog."


def image_conversations(value):
    """The turn ``value`` alone, in the first of two rounds, and in the second round."""
    answer = {"from": "gpt", "value": "A dog."}
    return [
        [{"from": "human", "value": value}, answer],
        [{"from": "human", "value": value}, answer,
         {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "3"}],
        [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "3"},
         {"from": "human", "value": value}, answer],
    ]


@pytest.mark.parametrize("value", [value for value, _ in PLACEMENTS])
def test_image_placements_equal_reference_ids_and_supervision(vicuna, value):
    for conversation in image_conversations(value):
        ref_ids, ref_labels = reference_v1(conversation, vicuna)
        ids, labels = ours("vicuna_v1", conversation, vicuna)
        assert ids == ref_ids, conversation
        assert labels == ref_labels, conversation
    ids, labels = ours("plain", image_conversations(value)[0], vicuna)
    assert (ids, labels) == reference_plain(image_conversations(value)[0], vicuna)


def after_the_image(ids, supervised):
    """The prompt ids between the image slot and the first supervised id."""
    slot = ids.index(IMAGE_TOKEN_ID)
    return ids[slot + 1:supervised.index(True)]


@pytest.mark.parametrize("value", ["<image>", "  <image>\n"])
def test_image_only_turn_has_nothing_between_image_and_assistant(vicuna, value):
    result = ConversationTokenizer("vicuna_v1", vicuna)(
        parse_turns([{"from": "human", "value": value}, {"from": "gpt", "value": "A dog."}],
                    has_image=True))
    # what the reference's tokenizer_image_token makes of the text after the image
    assert after_the_image(result.ids, result.supervised) == \
        vicuna(" ASSISTANT:").input_ids[1:]
    assert decode(vicuna, after_the_image(result.ids, result.supervised)).strip() == \
        "ASSISTANT:"


def test_generation_prompt_follows_the_same_rule(vicuna):
    """``<image>`` + newline + question, as the reference's evaluation scripts build the
    turn, then the training rule: each prompt is the prompt of the training example with
    that turn, and an empty question puts nothing between the image and " ASSISTANT:"."""
    builder = ExampleBuilder(ConversationTokenizer("vicuna_v1", vicuna),
                             ImageSettings(mode="square", size=28), tokens_per_tile=4,
                             max_length=256)
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    for question, turn in [("What is it?", "<image>\nWhat is it?"), ("", "<image>"),
                           ("   ", "<image>"), ("\n", "<image>"),
                           (" What is it?\n", "<image>\nWhat is it?"),
                           ("What is <image> it?", "<image>\nWhat is  it?")]:
        prompt = build_prompt(builder, question, image)
        slot = int(np.flatnonzero(prompt.image_mask)[0])
        assert prompt.image_mask.sum() == 4 and prompt.image_mask[slot:slot + 4].all()
        ids = prompt.ids[:slot].tolist() + [IMAGE_TOKEN_ID] + prompt.ids[slot + 4:].tolist()
        assert ids == tokenizer_image_token(f"{VICUNA_SYSTEM} USER: {turn} ASSISTANT:",
                                            vicuna), question
        value = question if "<image>" in question else "<image>\n" + question
        training, supervised = ours("vicuna_v1", [{"from": "human", "value": value},
                                                  {"from": "gpt", "value": "A dog."}], vicuna)
        assert training[:len(ids)] == ids and supervised[len(ids)] != IGNORE, question
        if not question.strip():
            assert ids[slot + 1:] == vicuna(" ASSISTANT:").input_ids[1:]
    with pytest.raises(ValueError, match="2 times"):
        build_prompt(builder, "<image> and <image>", image)
    with pytest.raises(ValueError, match="no image"):
        build_prompt(builder, "<image>\nWhat is it?", None)


def test_missing_special_token_is_reported_once(vicuna):
    with pytest.raises(ValueError, match="<start_of_turn>.* one special token"):
        ConversationTokenizer("gemma", vicuna)
