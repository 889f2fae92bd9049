"""Bad benchmark question files and layouts: ``questions`` names the file and the line (or
the file that is missing) for a missing image, a broken JSON line, missing fields, a split
without its file and a table without the benchmark's columns."""

from pathlib import Path

import pytest

from tokenpacker_jax.evaluation import files, suite
from tokenpacker_jax.evaluation.benchmark import Layout

from evaluation_helpers import write_image, write_jsonl


def test_errors_name_the_file_and_line(tmp_path):
    data = tmp_path / "gqa"
    path = write_jsonl(data / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": "1", "image": "n1.jpg", "text": "?"},
        {"question_id": "2", "image": "missing.jpg", "text": "?"}])
    write_image(data / "data/images/n1.jpg")
    layout = Layout(data=str(data), split="testdev_balanced")
    with pytest.raises(FileNotFoundError, match=f"{path}:2: image .*missing.jpg not found"):
        suite.benchmark("gqa").questions(layout)
    Path(path).write_text('{"question_id": "1", "image": "n1.jpg", "text": "?"}\n{"question\n')
    with pytest.raises(ValueError, match=f"{path}:2: not valid JSON"):
        suite.benchmark("gqa").questions(layout)
    Path(path).write_text('{"question_id": "1", "image": "n1.jpg"}\n')
    with pytest.raises(ValueError, match=rf"{path}:1: missing fields \['text'\]"):
        suite.benchmark("gqa").questions(layout)
    with pytest.raises(files.LayoutError, match="llava_vqav2_mscoco_test-dev2015.jsonl: not "
                                                "found"):
        suite.benchmark("vqav2").questions(Layout(data=str(data), split="test-dev2015"))
    with pytest.raises(files.LayoutError, match="Accounting: no validation"):
        suite.benchmark("mmmu").questions(Layout(data=str(data), split="validation"))
    tsv = data / "mmbench_dev_20230712.tsv"
    tsv.write_text("index\tquestion\n1\tq\n")
    with pytest.raises(files.LayoutError, match="mmbench_dev_20230712.tsv:1: expected "
                                                "MMBench's columns"):
        suite.benchmark("mmbench").questions(Layout(data=str(data), split="dev_20230712"))
