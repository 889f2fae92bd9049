"""POPE scoring: the reference's yes/no parsing, accuracy, precision, recall, F1 and yes
ratio, overall and per category (answers paired with labels by position); the expected
scores worked out by hand in the comments."""


import pytest

from tokenpacker_jax.evaluation import pope

from evaluation_helpers import answers_file, write_jsonl


def test_pope_parsing_follows_the_reference():
    says = {"Yes, there is a dog.": True, "No.": False, "There is not a cat.": False,
            "I see no cat": False, "Nope": True, "Yes. But no cat.": True, "NO": True,
            "no, none": False, "": True}
    assert {text: pope.pope_says_yes(text) for text in says} == says


def test_score_pope(tmp_path):
    labels = write_jsonl(tmp_path / "labels.jsonl", [
        {"question_id": 1, "label": "yes", "category": "adversarial"},
        {"question_id": 2, "label": "no", "category": "adversarial"},
        {"question_id": 3, "label": "no", "category": "adversarial"},
        {"question_id": 4, "label": "yes", "category": "random"},
        {"question_id": 5, "label": "yes", "category": "random"},
        {"question_id": 6, "label": "no", "category": "random"},
    ])
    answers = answers_file(tmp_path / "answers.jsonl", {
        1: "Yes, there is a dog.",  # TP
        2: "Yes.",  # FP
        3: "No, there is not.",  # TN
        4: "There is no dog in the image.",  # FN
        5: "Nope",  # TP: no "no" word
        6: "Yes. But no cat.",  # FP: only the first sentence counts
    })
    result = pope.score_pope(answers, labels)
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (2, 2, 1, 1)
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert result["precision"] == pytest.approx(2 / 4)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))  # 4/7
    assert result["yes_ratio"] == pytest.approx(4 / 6)
    adversarial, random = result["per_category"]["adversarial"], result["per_category"]["random"]
    assert (adversarial["accuracy"], adversarial["precision"], adversarial["recall"],
            adversarial["f1"]) == pytest.approx((2 / 3, 1 / 2, 1.0, 2 / 3))
    assert (random["accuracy"], random["precision"], random["recall"],
            random["f1"]) == pytest.approx((1 / 3, 1 / 2, 1 / 2, 1 / 2))
    assert pope.score_lines(result)[-1] == (
        "pope accuracy: 50.00 f1: 57.14 precision: 50.00 recall: 66.67 yes: 66.67 (n=6)")
    # No yes prediction at all: precision's denominator is 0, reported as 0.
    none_yes = answers_file(tmp_path / "no.jsonl", {1: "No.", 2: "no"})
    assert pope.score_pope(none_yes, labels)["precision"] == 0.0

def test_score_pope_pairs_answers_and_labels_by_position_per_category(tmp_path):
    questions = write_jsonl(tmp_path / "llava_pope_test.jsonl", [
        {"question_id": q, "image": "x.jpg", "text": "?", "category": c}
        for q, c in ((1, "adversarial"), (2, "random"), (3, "adversarial"), (4, "random"),
                     (5, "adversarial"))])
    labels = tmp_path / "coco"
    labels.mkdir()
    write_jsonl(labels / "coco_pope_adversarial.json",
                [{"question_id": i, "label": x} for i, x in enumerate(("yes", "no", "no"))])
    write_jsonl(labels / "coco_pope_random.json",
                [{"question_id": i, "label": x} for i, x in enumerate(("yes", "yes"))])
    answers = answers_file(tmp_path / "answers.jsonl", {
        1: "Yes", 2: "No", 3: "Yes, there is.", 4: "Yes.", 5: "No"})
    result = pope.score_pope_by_category(answers, str(labels), questions)
    # adversarial: yes/yes (TP), no/yes (FP), no/no (TN): accuracy 2/3, precision 1/2,
    # recall 1, F1 2/3. random: yes/no (FN), yes/yes (TP): accuracy 1/2, precision 1,
    # recall 1/2, F1 2/3.
    adversarial, random_ = result["per_category"]["adversarial"], result["per_category"]["random"]
    assert (adversarial["tp"], adversarial["fp"], adversarial["tn"], adversarial["fn"]) == (
        1, 1, 1, 0)
    assert (random_["accuracy"], random_["precision"], random_["recall"], random_["f1"]) == (
        pytest.approx((0.5, 1.0, 0.5, 2 / 3)))
    assert result["mean"]["accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert result["mean"]["f1"] == pytest.approx(2 / 3)
    assert pope.score_lines(result)[-1].startswith("pope (mean of 2 categories) accuracy: "
                                                   "58.33 f1: 66.67")
    too_many = answers_file(tmp_path / "many.jsonl", {2: "No", 4: "No", 6: "No"})
    with pytest.raises(ValueError, match="many.jsonl:3: question_id 6 is not in"):
        pope.score_pope_by_category(too_many, str(labels), questions)
