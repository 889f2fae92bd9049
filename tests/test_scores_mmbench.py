"""MMBench scoring: the option read from a response as its evaluator reads it, circular
accuracy over a question's rotated variants and rounds."""


import pytest

from tokenpacker_jax.evaluation import mmbench

from evaluation_helpers import write_jsonl


def test_mmbench_reads_the_option_as_its_evaluator_does():
    letters = ["A", "B", "C"]
    assert mmbench.infer_option("A", letters) == "A"
    assert mmbench.infer_option("B. cat", letters) == "B"
    assert mmbench.infer_option("(C)", letters) == "C"
    assert mmbench.infer_option("A cat is sitting here", letters) is None  # 'A' the article
    assert mmbench.infer_option("A or B", letters) is None
    assert mmbench.infer_option("Z", letters) == "Z"
    assert mmbench.infer_option("I can't process this file.", letters) == "Z"
    assert mmbench.infer_text("It is a green one", {"A": "Red", "B": "Green"}) == "B"
    assert mmbench.infer_text("red or green", {"A": "Red", "B": "Green"}) is None
    assert mmbench.is_empty("nan") and mmbench.is_empty("NA") and mmbench.is_empty("None")
    assert mmbench.is_empty("") and not mmbench.is_empty("0")


def test_score_mmbench_circular(tmp_path):
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [(1, "Pet?", "nan", "cat", "dog", "nan", "nan", "A", "animals"),
            (1000001, "Pet?", "nan", "dog", "cat", "nan", "nan", "B", "animals"),
            (2, "Colour?", "nan", "red", "blue", "green", "nan", "C", "colours"),
            (1000002, "Colour?", "nan", "blue", "green", "red", "nan", "B", "colours"),
            (2000002, "Colour?", "nan", "green", "red", "blue", "nan", "A", "colours"),
            (3, "Yes?", "nan", "yes", "no", "nan", "nan", "B", "other")]
    tsv = tmp_path / "mmbench_dev_20230712.tsv"
    tsv.write_text("\t".join(columns) + "\n" + "".join(
        "\t".join(map(str, row)) + "\tAAAA\n" for row in rows))
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 1, "round_id": 0, "text": "A"},
        {"question_id": 1000001, "round_id": 0, "text": "B. cat"},
        {"question_id": 2, "round_id": 0, "text": "C"},
        {"question_id": 1000002, "round_id": 0, "text": "The answer is green"},  # text: B
        {"question_id": 2000002, "round_id": 0, "text": "red"}])  # B, the answer is A
    result = mmbench.score_mmbench(answers, str(tsv))
    # Question 1: both rows right. Question 2: its variants disagree (2 of 3 right): wrong.
    # Question 3 has no answer. Lines: 4 of 5 right.
    assert (result["circular"], result["n"], result["unanswered"]) == (0.5, 2, 1)
    assert (result["vanilla"], result["lines"]) == (0.8, 5)
    assert result["per_category"] == {"animals": {"accuracy": 1.0, "n": 1},
                                      "colours": {"accuracy": 0.0, "n": 1}}
    assert mmbench.score_lines(result)[-1] == "mmbench circular accuracy: 50.00 (n=2)"
    # A second round of question 1 (options rotated: A dog, B cat): "B" is right.
    rounds = write_jsonl(tmp_path / "rounds.jsonl", [
        {"question_id": 1, "round_id": 0, "text": "A"},
        {"question_id": 1, "round_id": 1, "text": "B"},
        {"question_id": 1000001, "round_id": 0, "text": "B"},
        {"question_id": 1000001, "round_id": 1, "text": "B"}])  # wrong: A (cat) is right
    assert mmbench.score_mmbench(rounds, str(tsv))["circular"] == 0.0
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"question_id": 9, "text": "A"}])
    with pytest.raises(ValueError, match="unknown.jsonl:1: question_id 9 is not in"):
        mmbench.score_mmbench(unknown, str(tsv))
