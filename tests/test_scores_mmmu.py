"""MMMU scoring: multiple-choice and open responses parsed as MMMU's eval_utils does, random
letters drawn in order from one generator, accuracy per subject."""

import random

from tokenpacker_jax.evaluation import mmmu, mmmu_answers


def test_mmmu_multiple_choice_parsing():
    options = {"A": "apple", "B": "leaf"}
    rng = random.Random(0)
    assert mmmu_answers.parse_choice("(B) leaf", ["A", "B"], options, rng) == "B"
    assert mmmu_answers.parse_choice("The answer is B.", ["A", "B"], options, rng) == "B"
    assert mmmu_answers.parse_choice("A and then B", ["A", "B"], options, rng) == "B"  # the last
    assert mmmu_answers.parse_choice("(A) or maybe (B), no: (A)", ["A", "B"], options, rng) == "A"
    # No letter; more than 5 words: the option texts.
    assert mmmu_answers.parse_choice("I think it is the apple, surely", ["A", "B"], options,
                             rng) == "A"
    # Naming no option: letters drawn in order from one generator seeded 42.
    draws = random.Random(42)
    expected = [draws.choice(["A", "B"]) for _ in range(3)]
    lines = [{"id": f"validation_Art_{k}", "question_type": "multiple-choice",
              "answer": "A", "response": "no idea", "index2ans": options,
              "all_choices": ["A", "B"]} for k in range(3)]
    assert [x["parsed_pred"] for x in mmmu.with_parsed(lines)] == expected
    # A parsed_pred already in the answer file (the reference's) is kept.
    kept = mmmu.with_parsed([{**lines[0], "parsed_pred": "B"}])
    assert kept[0]["parsed_pred"] == "B"


def test_mmmu_open_parsing_and_score():
    # The tail after "is " (the shortest), and the numbers in it; numbers become floats.
    assert mmmu_answers.parse_open("The answer is 3.") == [3.0]
    assert set(map(str, mmmu_answers.parse_open("There are 1,234 cats"))) == {
        "there are 1,234 cats", "1234.0", "234.0"}
    assert mmmu_answers.parse_open("x") == [" x", "x "]
    # Shortest tail over the indicators: "5" (after "is "), not "it is 5" (after "so ").
    assert mmmu_answers.parse_open("So it is 5") == [5.0]
    # Per line; only the response's own ends lose their full stops.
    assert mmmu_answers.parse_open("It is red.\nSo the answer is x") == ["red.", " x", "x "]
    lines = [
        {"id": "validation_Math_1", "question_type": "open", "answer": "1234",
         "parsed_pred": mmmu_answers.parse_open("There are 1,234 cats")},  # 1234.0: right
        {"id": "validation_Math_2", "question_type": "open", "answer": "dog",
         "parsed_pred": mmmu_answers.parse_open("A cat")},  # wrong
        {"id": "validation_Art_1", "question_type": "multiple-choice", "answer": "A",
         "parsed_pred": "A"},
        {"id": "validation_Art_2", "question_type": "multiple-choice", "answer": ["A", "B"],
         "parsed_pred": "B"}]
    scores, judged = mmmu.score_mmmu(lines)
    assert (scores["accuracy"], scores["n"]) == (0.75, 4)
    assert scores["per_subject"] == {"Art": {"accuracy": 1.0, "n": 2},
                                     "Math": {"accuracy": 0.5, "n": 2}}
    assert judged["validation_Math_2"] == "Wrong"
    assert judged["metric_dict"] == {"acc": 0.75, "num_example": 4}
