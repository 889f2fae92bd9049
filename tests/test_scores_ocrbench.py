"""OCRBench scoring: an answer contained in the prediction (formulas with spaces removed and
case kept), right answers per type, the final score."""


import pytest

from tokenpacker_jax.evaluation import ocrbench


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
    result = ocrbench.score_ocrbench(records, "results.json")
    assert [r.get("result") for r in records] == [1, 1, 0, 1, None]
    assert result["per_type"]["Regular Text Recognition"] == 1
    assert result["per_type"]["Handwritten Mathematical Expression Recognition"] == 1
    assert (result["recognition"], result["final"], result["n"]) == (1, 3, 4)
    assert result["per_dataset"]["HME100k"] == {"accuracy": 0.5, "n": 2}
    assert result["per_dataset"]["docVQA"] == {"accuracy": 0.5, "n": 2}
    with pytest.raises(ValueError, match="results.json: record 0: type 'X' is not one of"):
        ocrbench.score_ocrbench([{"dataset_name": "a", "answers": "b", "type": "X"}],
                           "results.json")
