"""Every scorer of the evaluation suite on small hand-written annotation and answer files,
the expected scores worked out by hand (in the comments); the evaluate CLI's ``score``
command; bad input named by file and line."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tokenpacker_jax.evaluation import gqa, mmbench, mme, mmmu, ocr, pope, scienceqa, suite, vqa

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


# -- TextVQA ---------------------------------------------------------------------------------

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
    assert vqa.vqa_accuracy("coke", ["the coke"] * 10) == 0.0
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [
        {"question_id": "i1", "prompt": "What colour?\nAnswer.", "text": "red"}])
    with pytest.raises(ValueError, match="unknown.jsonl:1: no question 'what colour\\?' "
                                         "about image 'i1'"):
        vqa.score_textvqa(unknown, str(annotations))


# -- POPE by category ------------------------------------------------------------------------

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


# -- MME -------------------------------------------------------------------------------------

def test_score_mme_pairs_per_image(tmp_path):
    release = tmp_path / "MME_Benchmark_release_version"
    (release / "count").mkdir(parents=True)
    for stem in ("0001", "0002"):
        (release / "count" / f"{stem}.txt").write_text(
            "Is there a cat? Please answer yes or no.\tYes\n"
            "Is there a dog? Please answer yes or no.\tNo\n")
    qa = release / "code_reasoning"  # the double-space variant of the suffix
    qa.mkdir()
    (qa / "0003.txt").write_text("Is it python?  Please answer yes or no.\tYes\n"
                                 "Is it C?  Please answer yes or no.\tNo\n")
    short = "\nAnswer the question using a single word or phrase."

    def line(image, question, text):
        return {"question_id": image, "prompt": question + short, "text": text}

    answers = write_jsonl(tmp_path / "answers.jsonl", [
        line("count/0001.png", "Is there a cat?", "Yes"),
        line("count/0001.png", "Is there a dog?", "No"),
        line("count/0002.png", "Is there a cat?", "yes"),
        line("count/0002.png", "Is there a dog?", "Yes, there is."),  # yes in its first 4
        line("code_reasoning/0003.png", "Is it python?", "Nope"),  # "no" in its first 4
        line("code_reasoning/0003.png", "Is it C?", "I think not")])  # neither
    result = mme.score_mme(answers, str(release))
    # count: 3 of 4 questions right, 1 of 2 images both right: 100 x (0.75 + 0.5) = 125.
    assert result["per_task"]["count"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0,
                                           "images": 2}
    assert result["per_task"]["code_reasoning"]["score"] == 0.0
    assert (result["perception"], result["cognition"]) == (125.0, 0.0)
    assert "existence" in result["missing_tasks"]
    assert mme.score_lines(result)[-1] == "mme perception: 125.00 cognition: 0.00"
    assert mme.parse_yes_no("No, it is not") == "no" and mme.parse_yes_no("Yes") == "yes"
    assert mme.parse_yes_no("The answer is yes") == "other"

    alone = write_jsonl(tmp_path / "alone.jsonl", [line("count/0001.png", "Is there a cat?",
                                                        "Yes")])
    with pytest.raises(ValueError, match="alone.jsonl:1: MME asks two questions about "
                                         "count/0001.png; the answer file has 1"):
        mme.score_mme(alone, str(release))
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [line("count/0001.png", "Is it red?",
                                                            "Yes")])
    with pytest.raises(ValueError, match="unknown.jsonl:1: no question 'Is it red\\? Please"):
        mme.score_mme(unknown, str(release))


# -- MMBench ---------------------------------------------------------------------------------

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


# -- ScienceQA -------------------------------------------------------------------------------

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


# -- MMMU ------------------------------------------------------------------------------------

def test_mmmu_multiple_choice_parsing():
    options = {"A": "apple", "B": "leaf"}
    rng = random.Random(0)
    assert mmmu.parse_choice("(B) leaf", ["A", "B"], options, rng) == "B"
    assert mmmu.parse_choice("The answer is B.", ["A", "B"], options, rng) == "B"
    assert mmmu.parse_choice("A and then B", ["A", "B"], options, rng) == "B"  # the last
    assert mmmu.parse_choice("(A) or maybe (B), no: (A)", ["A", "B"], options, rng) == "A"
    # No letter; more than 5 words: the option texts.
    assert mmmu.parse_choice("I think it is the apple, surely", ["A", "B"], options,
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
    assert mmmu.parse_open("The answer is 3.") == [3.0]
    assert set(map(str, mmmu.parse_open("There are 1,234 cats"))) == {
        "there are 1,234 cats", "1234.0", "234.0"}
    assert mmmu.parse_open("x") == [" x", "x "]
    # Shortest tail over the indicators: "5" (after "is "), not "it is 5" (after "so ").
    assert mmmu.parse_open("So it is 5") == [5.0]
    # Per line; only the response's own ends lose their full stops.
    assert mmmu.parse_open("It is red.\nSo the answer is x") == ["red.", " x", "x "]
    lines = [
        {"id": "validation_Math_1", "question_type": "open", "answer": "1234",
         "parsed_pred": mmmu.parse_open("There are 1,234 cats")},  # 1234.0: right
        {"id": "validation_Math_2", "question_type": "open", "answer": "dog",
         "parsed_pred": mmmu.parse_open("A cat")},  # wrong
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


# -- OCRBench, DocVQA ------------------------------------------------------------------------

def test_score_ocrbench():
    records = [
        {"dataset_name": "IIIT5K", "answers": "CENTRE", "type": "Regular Text Recognition",
         "predict": "The word is centre."},  # contained, case aside: right
        {"dataset_name": "HME100k", "answers": ["x ^ 2"], "predict": "x^2",
         "type": "Handwritten Mathematical Expression Recognition"},  # spaces aside: right
        {"dataset_name": "HME100k", "answers": ["X^2"], "predict": "x^2",
         "type": "Handwritten Mathematical Expression Recognition"},  # case kept: wrong
        {"dataset_name": "docVQA", "answers": ["1/2/2003", "2003"], "predict": "in 2003",
         "type": "Doc-oriented VQA"},  # right
        {"dataset_name": "docVQA", "answers": ["abc"], "type": "Doc-oriented VQA"}]  # none
    result = ocr.score_ocrbench(records, "results.json")
    assert [r.get("result") for r in records] == [1, 1, 0, 1, None]
    assert result["per_type"]["Regular Text Recognition"] == 1
    assert result["per_type"]["Handwritten Mathematical Expression Recognition"] == 1
    assert (result["recognition"], result["final"], result["n"]) == (1, 3, 4)
    assert result["per_dataset"]["HME100k"] == {"accuracy": 0.5, "n": 2}
    assert result["per_dataset"]["docVQA"] == {"accuracy": 0.5, "n": 2}
    with pytest.raises(ValueError, match="results.json: record 0: type 'X' is not one of"):
        ocr.score_ocrbench([{"dataset_name": "a", "answers": "b", "type": "X"}],
                           "results.json")


def test_anls():
    assert ocr.edit_distance("kitten", "sitting") == 3
    assert ocr.anls("1/2/2003", ["1/2/2003"]) == 1.0
    assert ocr.anls("1/2/2OO3", ["1/2/2003"]) == 0.75  # 2 edits of 8 characters
    assert ocr.anls("abxy", ["abcd"]) == 0.5  # at the threshold: kept
    assert ocr.anls("axyze", ["abcde"]) == 0.0  # 3 of 5: 0.4, below it
    assert ocr.anls("  Dear  Dr. Lobo ", ["dear dr. lobo"]) == 1.0
    assert ocr.anls("Lobo", ["Dear Dr. Lobo", "Dr. Lobo"]) == 0.5  # the closer answer
    assert ocr.anls("", [""]) == 1.0


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
    result = ocr.score_docvqa(answers, str(questions))
    assert (result["anls"], result["n"], result["unanswered"]) == (
        pytest.approx((1 + 0.875) / 2), 2, 1)
    stray = write_jsonl(tmp_path / "stray.jsonl", [{"questionId": 9, "answer": "x"}])
    with pytest.raises(ValueError, match="stray.jsonl:1: questionId 9 is not in"):
        ocr.score_docvqa(stray, str(questions))
