"""MMMU's responses parsed and judged as MMMU's own ``eval_utils`` does (the reference
runs it).

Parsing a multiple-choice response: ``,.!?;:'`` stripped from its ends, spaces put around
it; the letters written as "(X)", else those standing alone as " X "; else, when it has more
than 5 words, the options whose text (lower case) it contains. One candidate is the answer;
several: the one that appears last; none: a random letter, drawn from the caller's
generator.

Parsing an open response: lower-cased, stripped of spaces and full stops, split into
sentences at newlines (and at ". " before a capital, which lower case leaves none of); in
each, the shortest tail after one of "could be ", "so ", "is ", "thus ", "therefore ",
"final ", "answer ", "result " (in the last sentence also "="), unless it is empty or a
single punctuation mark; no tail at all: the whole response. To those strings the numbers
found in them are added (with thousands commas, in scientific notation, or plain); then
every string that reads as a number becomes that float rounded to 2 places, the others are
lower-cased (a single character padded with a space on either side, as two variants).

Judging: a multiple-choice answer is right when the parsed letter equals the answer (or one
of them, for a list); an open one when a parsed string contains one of the normalised gold
answers (strings), or a parsed number equals a normalised gold number.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

MULTIPLE_CHOICE = "multiple-choice"  # a question's ``question_type``; any other is open
_SENTENCES = re.compile(r"\.\s(?=[A-Z])|\n")
_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ",
               "result ")
_PUNCTUATION = (":", ",", ".", "!", "?", ";", "'")
_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUMBER_PLAIN = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def parse_choice(response: str, choices: Sequence[str], index2ans: Mapping[str, str],
                 rng: random.Random) -> str:
    """The option letter of a multiple-choice response (see the module docstring)."""
    for mark in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(mark)
    response = f" {response} "
    candidates = [c for c in choices if f"({c})" in response]
    bracketed, by_text = bool(candidates), False
    if not candidates:
        candidates = [c for c in choices if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, text in index2ans.items() if text.lower() in response.lower()]
        by_text = bool(candidates)
    if not candidates:
        return rng.choice(list(choices))
    if len(candidates) == 1:
        return candidates[0]
    if by_text:
        positions = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    else:
        positions = [response.rfind(f"({c})" if bracketed else f" {c} ") for c in candidates]
    return candidates[positions.index(max(positions))]


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def normalise(text: str) -> list[Any]:
    """A number as [its float rounded to 2 places]; a string lower-cased, a one-character
    string as [" x", "x "]."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def find_numbers(text: str) -> list[str]:
    return (_NUMBER_WITH_COMMAS.findall(text) + _NUMBER_SCIENTIFIC.findall(text)
            + _NUMBER_PLAIN.findall(text))


def _key_tails(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    sentences = _SENTENCES.split(response)
    tails = []
    for k, sentence in enumerate(sentences):
        indicators = _INDICATORS + (("=",) if k == len(sentences) - 1 else ())
        shortest = None
        for indicator in indicators:
            if indicator in sentence:
                tail = sentence.split(indicator)[-1].strip()
                # An empty tail is falsy: the next indicator's replaces it (as upstream).
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _PUNCTUATION:
            tails.append(shortest)
    return tails or [response]


def parse_open(response: str) -> list[Any]:
    """The normalised candidate answers of an open response (see the module docstring)."""
    tails = _key_tails(response)
    candidates = tails + [number for tail in tails for number in find_numbers(tail)]
    parsed = []
    for candidate in candidates:
        for value in normalise(candidate):
            if value not in parsed:
                parsed.append(value)
    return parsed


def parsed_prediction(line: Mapping[str, Any], rng: random.Random) -> Any:
    if line["question_type"] == MULTIPLE_CHOICE:
        return parse_choice(line["response"], line["all_choices"], line["index2ans"], rng)
    return parse_open(line["response"])


def right(line: Mapping[str, Any]) -> bool:
    gold, parsed = line["answer"], line["parsed_pred"]
    if line["question_type"] == MULTIPLE_CHOICE:
        return parsed in gold if isinstance(gold, list) else parsed == gold
    golds = [n for g in (gold if isinstance(gold, list) else [gold]) for n in normalise(g)]
    for value in parsed:
        if isinstance(value, str):
            if any(isinstance(g, str) and g in value for g in golds):
                return True
        elif value in golds:
            return True
    return False
