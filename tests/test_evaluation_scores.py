"""Every scorer of the evaluation suite on small hand-written annotation and answer files,
the expected scores worked out by hand (in the comments); the evaluate CLI's ``score``
command; bad input named by file and line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenpacker_jax.evaluation import gqa, pope, suite, vqa

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def answers_file(path, texts):
    """An answer file as evaluate writes it: {question_id: text}."""
    return write_jsonl(path, [{"question_id": qid, "prompt": "?", "text": text,
                               "answer_id": str(i), "model_id": "m", "metadata": {}}
                              for i, (qid, text) in enumerate(texts.items())])


# -- VQAv2 -----------------------------------------------------------------------------------

def test_vqa_normalisation():
    # A mark next to a space is deleted, else it becomes a space; a digit-comma-digit
    # anywhere deletes them all; a period goes unless a digit follows.
    assert vqa.vqa_punctuation("yes, it is") == "yes it is"
    assert vqa.vqa_punctuation("red,blue") == "red blue"
    assert vqa.vqa_punctuation("1,000 (approx)") == "1000 approx"
    assert vqa.vqa_punctuation("2.5 m. tall") == "2.5 m tall"
    assert vqa.vqa_digits_articles("The Two  dogs") == "2 dogs"
    assert vqa.vqa_digits_articles("dont know") == "don't know"
    assert vqa.vqa_digits_articles("an apple, none") == "apple, 0"
    # LLaVA's submission processing of a model's answer: lower case, ',' and '?' gone,
    # "'s" split off, then the above.
    assert vqa.evalai_answer("Two.") == "2"
    assert vqa.evalai_answer("It's a man's hat?\n") == "it 's man 's hat"


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
    assert vqa.vqa_accuracy("dog", humans) == pytest.approx(expected)


def test_vqa_accuracy_normalises_only_when_humans_disagree():
    # Official behaviour: unanimous answers are compared verbatim.
    assert vqa.vqa_accuracy("2", ["Two"] * 10) == 0.0
    assert vqa.vqa_accuracy("2", ["Two"] * 9 + ["three"]) == 1.0
    assert vqa.vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0


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
    lines = vqa.accuracy_lines("vqav2", result)
    assert lines[-1] == "vqav2 accuracy: 83.33 (n=3)"


# -- GQA -------------------------------------------------------------------------------------

def test_score_gqa(tmp_path):
    def question(answer, structural, semantic, balanced=True):
        return {"imageId": "n1", "question": "?", "answer": answer, "isBalanced": balanced,
                "types": {"structural": structural, "semantic": semantic,
                          "detailed": "x"}}

    annotations = tmp_path / "testdev_balanced_questions.json"
    annotations.write_text(json.dumps({
        "201": question("yes", "verify", "attr"),
        "202": question("cat", "query", "obj"),
        "203": question("red", "query", "attr"),
        "204": question("dog", "query", "obj", balanced=False),  # not scored
        "205": question("no", "verify", "rel"),  # not answered
    }))
    answers = answers_file(tmp_path / "answers.jsonl",
                           {"201": "Yes.", "202": "The cat", "203": "red..", "204": "cat"})
    result = gqa.score_gqa(answers, str(annotations))
    # "Yes." -> "yes" right; "the cat" wrong (no article removal in GQA); "red" right.
    assert (result["accuracy"], result["n"], result["unanswered"]) == (2 / 3, 3, 1)
    assert result["per_answer_type"] == {"binary": {"accuracy": 1.0, "n": 1},
                                         "open": {"accuracy": 0.5, "n": 2}}
    assert result["per_semantic_type"] == {"attr": {"accuracy": 1.0, "n": 2},
                                           "obj": {"accuracy": 0.0, "n": 1}}
    # jsonl annotations with just question_id and answer (every question balanced)
    simple = write_jsonl(tmp_path / "gqa.jsonl", [{"question_id": "201", "answer": "no"}])
    only = answers_file(tmp_path / "one.jsonl", {"201": "no."})
    assert gqa.score_gqa(only, simple)["accuracy"] == 1.0


# -- POPE ------------------------------------------------------------------------------------

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


# -- bad input -------------------------------------------------------------------------------

def test_bad_input_names_the_file_and_line(tmp_path):
    labels = write_jsonl(tmp_path / "labels.jsonl", [{"question_id": 1, "label": "yes"},
                                                    {"label": "no"}])
    answers = answers_file(tmp_path / "answers.jsonl", {1: "yes"})
    with pytest.raises(ValueError, match=r"labels.jsonl:2: missing fields \['question_id'\]"):
        pope.score_pope(answers, labels)

    vqa_file = tmp_path / "vqa.json"
    vqa_file.write_text(json.dumps({"annotations": [
        {"question_id": 1, "answers": [{"answer": "a"}]}, {"answers": [{"answer": "b"}]}]}))
    with pytest.raises(ValueError, match=r"vqa.json: annotations\[1\]: missing fields"):
        vqa.score_vqav2(answers, str(vqa_file))
    vqa_file.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": []}]}))
    with pytest.raises(ValueError, match=r"vqa.json: annotations\[0\]: answers must be"):
        vqa.score_vqav2(answers, str(vqa_file))

    good_labels = write_jsonl(tmp_path / "good.jsonl", [{"question_id": 1, "label": "yes"}])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question_id": 1, "text": "yes"}\n{"question_id": 2, "text": \n')
    with pytest.raises(ValueError, match="broken.jsonl:2: not valid JSON"):
        pope.score_pope(str(broken), good_labels)
    unknown = answers_file(tmp_path / "unknown.jsonl", {1: "yes", 99: "no"})
    with pytest.raises(ValueError, match="unknown.jsonl:2: question_id 99 is not in .*good"):
        pope.score_pope(unknown, good_labels)
    twice = write_jsonl(tmp_path / "twice.jsonl", [{"question_id": 1, "text": "a"},
                                                   {"question_id": 1, "text": "b"}])
    with pytest.raises(ValueError, match="twice.jsonl:2: question_id 1 was already answered "
                                         "at .*twice.jsonl:1"):
        pope.score_pope(twice, good_labels)
    no_text = write_jsonl(tmp_path / "no_text.jsonl", [{"question_id": 1}])
    with pytest.raises(ValueError, match=r"no_text.jsonl:1: missing fields \['text'\]"):
        pope.score_pope(no_text, good_labels)
    maybe = write_jsonl(tmp_path / "maybe.jsonl", [{"question_id": 1, "label": "maybe"}])
    with pytest.raises(ValueError, match="maybe.jsonl:1: label must be 'yes' or 'no'"):
        pope.score_pope(answers, maybe)
    duplicate = write_jsonl(tmp_path / "dup.jsonl", [{"question_id": 1, "answer": "a"},
                                                     {"question_id": 1, "answer": "b"}])
    with pytest.raises(ValueError, match="dup.jsonl:2: question_id 1 repeats .*dup.jsonl:1"):
        gqa.score_gqa(answers, duplicate)
    with pytest.raises(ValueError, match="--benchmark must be one of"):
        suite.score("nonsense", answers, good_labels)
    with pytest.raises(ValueError, match="vizwiz is scored by its server"):
        suite.score("vizwiz", answers, good_labels)


def test_evaluate_cli_score_command(tmp_path):
    labels = write_jsonl(tmp_path / "labels.jsonl", [{"question_id": 1, "label": "yes"},
                                                    {"question_id": 2, "label": "no"}])
    answers = answers_file(tmp_path / "answers.jsonl", {1: "Yes.", 2: "Yes, it is."})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tokenpacker_jax.evaluate", "score", "--benchmark=pope",
               f"--answers={answers}", f"--annotations={labels}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == (
        "pope accuracy: 50.00 f1: 66.67 precision: 50.00 recall: 100.00 yes: 100.00 (n=2)")
    # Without --annotations the command is refused with a usage error.
    done = subprocess.run(command[:-1], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert done.returncode != 0 and "score --benchmark=pope needs --annotations" in done.stderr


def test_broken_json_annotations_name_the_line(tmp_path):
    answers = answers_file(tmp_path / "answers.jsonl", {1: "yes"})
    pretty = tmp_path / "annotations.json"
    pretty.write_text('{"annotations": [\n  {"question_id": 1,\n   "answers": [}\n]}\n')
    with pytest.raises(ValueError, match="annotations.json:3: not valid JSON"):
        vqa.score_vqav2(answers, str(pretty))
    lines = tmp_path / "labels.jsonl"
    lines.write_text('{"question_id": 1, "label": "yes"}\n\n{"question_id": 2, "label"}\n')
    with pytest.raises(ValueError, match="labels.jsonl:3: not valid JSON"):
        pope.score_pope(answers, str(lines))
