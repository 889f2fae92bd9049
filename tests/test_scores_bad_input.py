"""Bad annotation and answer files are named by file and line (or record) in the scorers'
errors; unknown benchmarks and server-scored ones are refused by ``suite.score``."""

import json

import pytest

from tokenpacker_jax.evaluation import gqa, pope, suite, vqa

from evaluation_helpers import answers_file, write_jsonl


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
