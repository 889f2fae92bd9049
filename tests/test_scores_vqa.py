"""VQAv2 and TextVQA scoring: the official VQA normalisation and leave-one-out accuracy,
EvalAI's answer processing, TextVQA's question recovered from the prompt; scores worked out
by hand in the comments."""

import json

import pytest

from tokenpacker_jax.evaluation import vqa, vqa_answers
from tokenpacker_jax.evaluation.benchmark import accuracy_lines

from evaluation_helpers import answers_file, write_jsonl


def test_vqa_normalisation():
    # A mark next to a space is deleted, else it becomes a space; a digit-comma-digit
    # anywhere deletes them all; a period goes unless a digit follows.
    assert vqa_answers.vqa_punctuation("yes, it is") == "yes it is"
    assert vqa_answers.vqa_punctuation("red,blue") == "red blue"
    assert vqa_answers.vqa_punctuation("1,000 (approx)") == "1000 approx"
    assert vqa_answers.vqa_punctuation("2.5 m. tall") == "2.5 m tall"
    assert vqa_answers.vqa_digits_articles("The Two  dogs") == "2 dogs"
    assert vqa_answers.vqa_digits_articles("dont know") == "don't know"
    assert vqa_answers.vqa_digits_articles("an apple, none") == "apple, 0"
    # LLaVA's submission processing of a model's answer: lower case, ',' and '?' gone,
    # "'s" split off, then the above.
    assert vqa_answers.evalai_answer("Two.") == "2"
    assert vqa_answers.evalai_answer("It's a man's hat?\n") == "it 's man 's hat"


@pytest.mark.parametrize("matching, expected", [
    # Leave-one-out over the 10 humans, min(1, matches / 3) each, averaged:
    (0, 0.0),
    (1, (1 * 0 + 9 * 1 / 3) / 10),  # 0.3: out goes the match (0), or another (1/3)
    (2, (2 * 1 / 3 + 8 * 2 / 3) / 10),  # 0.6
    (3, (3 * 2 / 3 + 7 * 1) / 10),  # 0.9
    (4, 1.0),  # any 9 of them hold at least 3 matches
])
def test_vqa_accuracy_leave_one_out(matching, expected):
    humans = ["dog"] * matching + ["cat"] * (10 - matching)
    assert vqa_answers.vqa_accuracy("dog", humans) == pytest.approx(expected)


def test_vqa_accuracy_normalises_only_when_humans_disagree():
    # Official behaviour: unanimous answers are compared verbatim.
    assert vqa_answers.vqa_accuracy("2", ["Two"] * 10) == 0.0
    assert vqa_answers.vqa_accuracy("2", ["Two"] * 9 + ["three"]) == 1.0
    assert vqa_answers.vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0


def test_score_vqav2(tmp_path):
    def question(qid, humans, answer_type):
        return {"question_id": qid, "image_id": 1, "question_type": "what",
                "answer_type": answer_type, "multiple_choice_answer": humans[0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(humans)]}

    annotations = tmp_path / "v2_mscoco_val2014_annotations.json"
    annotations.write_text(json.dumps({"info": {}, "annotations": [
        question(1, ["two"] * 2 + ["three"] * 8, "number"),
        question(2, ["yes"] * 10, "yes/no"),
        question(3, ["dont know"] * 3 + ["cat"] * 7, "other"),
        question(4, ["red"] * 10, "other"),  # not answered
    ]}, indent=1))
    answers = answers_file(tmp_path / "answers.jsonl",
                           {1: "Two.", 2: "Yes", 3: "Don't know"})
    result = vqa.score_vqav2(answers, str(annotations))
    # "Two." -> "2": 2 of 10 humans -> 0.6; "Yes" -> "yes": all 10 -> 1; "Don't know"
    # matches the 3 normalised "dont know" -> 0.9.
    assert result["accuracy"] == pytest.approx((0.6 + 1.0 + 0.9) / 3)
    assert (result["n"], result["unanswered"]) == (3, 1)
    assert result["per_answer_type"]["number"] == {"accuracy": pytest.approx(0.6), "n": 1}
    assert result["per_answer_type"]["other"] == {"accuracy": pytest.approx(0.9), "n": 1}
    assert result["per_question_type"]["what"]["n"] == 3
    lines = accuracy_lines("vqav2", result)
    assert lines[-1] == "vqav2 accuracy: 83.33 (n=3)"

def test_textvqa_question_from_prompt():
    where = "a.jsonl:1"
    assert vqa.textvqa_question("What Brand?\nAnswer briefly.", where) == "what brand?"
    assert vqa.textvqa_question("What Brand?\nReference OCR token: A, B\nAnswer.",
                                where) == "what brand?"
    assert vqa.textvqa_question("Reference OCR token: A\nWhat Brand?\nAnswer.",
                                where) == "what brand?"
    assert vqa.textvqa_question("OCR tokens: a b Question: What Brand? Short answer:",
                                where) == "what brand?"
    with pytest.raises(ValueError, match="a.jsonl:1: cannot find the question"):
        vqa.textvqa_question("one\ntwo\nthree\nfour", where)


def test_score_textvqa_processes_humans_and_prediction_as_evalai(tmp_path):
    annotations = tmp_path / "TextVQA_0.5.1_val.json"
    annotations.write_text(json.dumps({"data": [
        {"image_id": "i1", "question": "What brand?", "answers": ["coca-cola"] * 2
         + ["coke"] * 8},
        {"image_id": "i2", "question": "What drink?", "answers": ["the coke"] * 10},
        {"image_id": "i3", "question": "What else?", "answers": ["x"] * 10}]}))
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        # "Coca Cola." -> "coca cola" = "coca-cola" processed ('-' between words: a space):
        # 2 of 10 humans; leaving out one of them 1/3 (2 ways), another 2/3 (8): 0.6.
        {"question_id": "i1", "prompt": "What brand?\nAnswer.", "text": "Coca Cola."},
        # The humans' "the coke" loses its article too: 1.0 (VQAv2's official evaluation
        # compares unanimous answers verbatim: 0 there).
        {"question_id": "i2", "prompt": "What drink?\nReference OCR token: X\nAnswer.",
         "text": "Coke"}])
    result = vqa.score_textvqa(answers, str(annotations))
    assert (result["accuracy"], result["n"], result["unanswered"]) == (
        pytest.approx((0.6 + 1.0) / 2), 2, 1)
    assert vqa_answers.vqa_accuracy("coke", ["the coke"] * 10) == 0.0
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [
        {"question_id": "i1", "prompt": "What colour?\nAnswer.", "text": "red"}])
    with pytest.raises(ValueError, match="unknown.jsonl:1: no question 'what colour\\?' "
                                         "about image 'i1'"):
        vqa.score_textvqa(unknown, str(annotations))
