"""DocVQA scoring: ANLS (normalised Levenshtein similarity, 0 below 0.5) of the submission's
answers, trailing full stops removed."""

import json

import pytest

from tokenpacker_jax.evaluation import docvqa

from evaluation_helpers import write_jsonl


def test_anls():
    assert docvqa.edit_distance("kitten", "sitting") == 3
    assert docvqa.anls("1/2/2003", ["1/2/2003"]) == 1.0
    assert docvqa.anls("1/2/2OO3", ["1/2/2003"]) == 0.75  # 2 edits of 8 characters
    assert docvqa.anls("abxy", ["abcd"]) == 0.5  # at the threshold: kept
    assert docvqa.anls("axyze", ["abcde"]) == 0.0  # 3 of 5: 0.4, below it
    assert docvqa.anls("  Dear  Dr. Lobo ", ["dear dr. lobo"]) == 1.0
    assert docvqa.anls("Lobo", ["Dear Dr. Lobo", "Dr. Lobo"]) == 0.5  # the closer answer
    assert docvqa.anls("", [""]) == 1.0


def test_score_docvqa(tmp_path):
    questions = tmp_path / "val_v1.0.json"
    questions.write_text(json.dumps({"data": [
        {"questionId": 1, "question": "?", "image": "documents/a.png",
         "answers": ["Denver Broncos"]},
        {"questionId": 2, "question": "?", "image": "documents/b.png",
         "answers": ["12/15/88"]},
        {"questionId": 3, "question": "?", "image": "documents/c.png", "answers": ["x"]}]}))
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"questionId": 1, "answer": "Denver Broncos."},  # the full stop goes: 1
        {"questionId": 2, "answer": "12/15/89"}])  # 1 edit of 8: 0.875
    result = docvqa.score_docvqa(answers, str(questions))
    assert (result["anls"], result["n"], result["unanswered"]) == (
        pytest.approx((1 + 0.875) / 2), 2, 1)
    stray = write_jsonl(tmp_path / "stray.jsonl", [{"questionId": 9, "answer": "x"}])
    with pytest.raises(ValueError, match="stray.jsonl:1: questionId 9 is not in"):
        docvqa.score_docvqa(stray, str(questions))
