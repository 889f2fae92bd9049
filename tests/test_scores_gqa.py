"""GQA scoring: exact match after LLaVA's conversion, over the balanced questions, per type;
the expected scores worked out by hand in the comments."""

import json

from tokenpacker_jax.evaluation import gqa

from evaluation_helpers import answers_file, write_jsonl


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
