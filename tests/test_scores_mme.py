"""MME scoring: the two questions per image, accuracy and accuracy+ per task, perception
and cognition totals; the expected scores worked out by hand in the comments."""


import pytest

from tokenpacker_jax.evaluation import mme

from evaluation_helpers import write_jsonl


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
