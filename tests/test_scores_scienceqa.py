"""ScienceQA scoring: the letter parsed from a response, accuracy and image-question accuracy
as the reference counts them."""

import json

import pytest

from tokenpacker_jax.evaluation import scienceqa

from evaluation_helpers import write_jsonl


def test_scienceqa_parsing_and_img_accuracy(tmp_path):
    assert [scienceqa.parse_letter(t) for t in (
        "B", "B. apostrophe", "The answer is A.", "The answer is A",
        "The answer is A. The answer is B.", "b")] == ["B", "B", "A", "FAILED", "FAILED",
                                                        "FAILED"]
    assert scienceqa.choice_index("E", ["x", "y"]) == -1
    (tmp_path / "problems.json").write_text(json.dumps({
        "4": {"choices": ["dog", "cat"], "answer": 1},
        "5": {"choices": ["cat", "dog"], "answer": 0},
        "6": {"choices": ["a", "b", "c"], "answer": 2}}))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["4", "5", "6"]}))
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": "4", "prompt": "Which?\nA. dog\nB. cat", "text": "B"},
        {"question_id": "5", "prompt": "<image>\nWhich?", "text": "The answer is A."}])
    scores, output, result = scienceqa.score_scienceqa(answers, str(tmp_path))
    # Problem 6 has no answer: "FAILED", wrong, and (its prompt unknown) not counted as an
    # image question, as the reference counts it: IMG accuracy 1 of 1.
    assert (scores["accuracy"], scores["n"]) == (pytest.approx(2 / 3), 3)
    assert (scores["img_accuracy"], scores["img_n"]) == (1.0, 1)
    assert result["results"] == {"4": 1, "5": 0, "6": -1}
    assert result["acc"] == pytest.approx(200 / 3)
    assert [x["question_id"] for x in output["incorrect"]] == ["6"]
    stray = write_jsonl(tmp_path / "stray.jsonl", [{"question_id": "9", "prompt": "?",
                                                    "text": "A"}])
    with pytest.raises(ValueError, match="stray.jsonl:1: question_id '9' is not in"):
        scienceqa.score_scienceqa(stray, str(tmp_path))
