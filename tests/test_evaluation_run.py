"""``evaluate run`` on every benchmark of the suite, with a tiny checkpoint of the main job's
model (configs/tiny.py, random weights) and a tiny copy of each benchmark's published files
(same layout and fields, a few questions, small images).

Each test checks the user messages built against the reference's prompt format, written out
here from the reference's scripts (``model_vqa_loader``, ``model_vqa``, ``model_vqa_science``,
``model_vqa_mmbench``, ``eval_docvqa``, ``eval_ocr_bench``, MMMU's ``llava1.5.yaml``), the
whole tokenised prompt of one question per benchmark against the reference's own recipe (the
vicuna_v1 conversation as one string, split at ``<image>``, each piece tokenised by the
transformers tokenizer), and the files written. Then answering sharded over 8 devices and
over 2 hosts against one device, and a killed run resumed. Every test answers with the same
model, compiled once for the module (``answerer``).
Bad question files: test_questions_bad_input.py.
"""

import base64
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import openpyxl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tokenpacker_jax import assembly, checkpoint, evaluate, sharding
from tokenpacker_jax import train_state as state_lib
from tokenpacker_jax.configs import tiny
from tokenpacker_jax.data.conversation import IMAGE_TOKEN_ID, VICUNA_SYSTEM
from tokenpacker_jax.data.synthetic import train_tokenizer
from tokenpacker_jax.evaluation import files, suite
from tokenpacker_jax.evaluation.benchmark import Layout
from tokenpacker_jax.evaluation.mmmu import SUBJECTS
from tokenpacker_jax.evaluation.runner import PARTS, Answerer, answer_all
from tokenpacker_jax.evaluation.vqa import evalai_answer

from evaluation_helpers import write_image, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
BATCH, NEW_TOKENS, BUCKET = 8, 4, 256  # one compiled program for every benchmark
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
MODEL = "tiny-run"


def png_bytes(seed):
    """An encoded PNG, as MMBench (base64) and MMMU (parquet) carry their images."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_json(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Path(path).write_text(json.dumps(value))
    return str(path)


def random_params(abstract):
    """Random weights straight from the parameter shapes (no compiled init): norm scales 1,
    biases 0, the rest normal with std 2 / sqrt(fan-in), larger than an init so that greedy
    choices are well separated."""
    rng = np.random.default_rng(5)

    def draw(path, leaf):
        name = str(path[-1].key)
        if name == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else leaf.shape[0]
        return (rng.standard_normal(leaf.shape) * 2 / np.sqrt(fan_in)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run directory of configs/tiny.py (smaller still) with random weights, saved as
    training saves it; its tokenizer is trained here on the words the benchmarks use."""
    root = tmp_path_factory.mktemp("tiny_run")
    hint = "When the provided information is insufficient, respond with 'Unanswerable'."
    train_tokenizer([
        f"{VICUNA_SYSTEM} USER: ASSISTANT: {SHORT} {LETTER} {hint} Reference OCR token: What "
        "colour is the cat? Is there a dog in the image? What is this? What shape is it? "
        "Which is a cat? Context: A pet. Which is red? (A) apple (B) leaf How many cats? what "
        "is written in the image? What is the date? Which colour? red blue green"] * 50,
        str(root / "tokenizer"), 512)
    config = tiny.get_config("stage=2")
    config.model.tokenizer = str(root / "tokenizer")
    config.model.vision.num_layers = 2
    config.model.features.multi_layers = (1, 2, 1, 2)
    config.model.decoder.num_layers = 1
    config.data.system_prompt = None  # vicuna_v1's own, as the reference's conversation
    model = assembly.build_model(config)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    abstract, _ = state_lib.param_shardings(model, mesh, config.sharding.rules)
    state = state_lib.TrainState(step=np.zeros((), np.int32), params=random_params(abstract),
                                 opt_state={})
    manager = checkpoint.make_manager(checkpoint.run_directory(root / MODEL), keep=1,
                                      asynchronous=False)
    checkpoint.save(manager, 0, state, None, config.to_json(), force=True)
    manager.wait_until_finished()
    manager.close()
    return root / MODEL


@pytest.fixture(scope="module")
def trained(workdir):
    return assembly.load_trained(str(workdir))


@pytest.fixture(scope="module")
def answerer(trained):
    return Answerer(trained, batch_size=BATCH, max_new_tokens=NEW_TOKENS, bucket=BUCKET)


def run(name, data, answerer, out, **layout):
    layout = Layout(data=str(data), out=str(out), model_id=MODEL, **layout)
    summary = suite.run(name, layout, lambda: answerer, log=lambda line: None)
    questions = suite.benchmark(name).questions(
        dataclasses.replace(layout, split=layout.split or suite.benchmark(name).split))
    return questions, summary


def reference_ids(tokenizer, message):
    """The reference's prompt ids: the vicuna_v1 conversation as one string, split at
    ``<image>``, each piece tokenised (the first with BOS), the image one id between."""
    prompt = f"{VICUNA_SYSTEM} USER: {message} ASSISTANT:"
    pieces = prompt.split("<image>")
    ids = tokenizer.hf(pieces[0]).input_ids
    for piece in pieces[1:]:
        ids += [IMAGE_TOKEN_ID] + tokenizer.hf(piece).input_ids[1:]
    return ids


def assert_reference_prompt(answerer, question, message):
    assert question.message == message
    prompt = answerer.prompts([(question.text, question.load_image())])[0]
    ids = [IMAGE_TOKEN_ID if visual else int(i)
           for i, visual in zip(prompt.ids, prompt.image_mask, strict=True)]
    collapsed = [i for k, i in enumerate(ids)
                 if not (i == IMAGE_TOKEN_ID and k and ids[k - 1] == IMAGE_TOKEN_ID)]
    assert collapsed == reference_ids(answerer.tokenizer, message)


def llava_lines(out, questions):
    """The answer file as ``model_vqa_loader`` writes it, in question order."""
    lines = [r for _, r in files.read_jsonl(str(out / "answers.jsonl"))]
    assert [line["question_id"] for line in lines] == [q.question_id for q in questions]
    for line, question in zip(lines, questions, strict=True):
        assert set(line) == {"question_id", "prompt", "text", "answer_id", "model_id",
                             "metadata"}
        assert line["prompt"] == question.extra["prompt"] and line["model_id"] == MODEL
        assert isinstance(line["text"], str) and line["metadata"] == {}
    return lines


def test_vqav2_writes_the_test_dev_submission(tmp_path, answerer):
    data = tmp_path / "vqav2"
    questions = [{"question_id": 1001, "image": "COCO_test2015_000000000001.jpg",
                  "text": f"What colour is the cat?\n{SHORT}", "category": "default"},
                 {"question_id": 1002, "image": "COCO_test2015_000000000002.jpg",
                  "text": f"Is there a dog?\n{SHORT}", "category": "default"}]
    write_jsonl(data / "llava_vqav2_mscoco_test-dev2015.jsonl", questions)
    write_jsonl(data / "llava_vqav2_mscoco_test2015.jsonl", questions + [
        {"question_id": 1003, "image": "COCO_test2015_000000000003.jpg", "text": "?"}])
    for k in (1, 2):
        write_image(data / f"test2015/COCO_test2015_00000000000{k}.jpg", seed=k)
    asked, summary = run("vqav2", data, answerer, tmp_path / "out")
    assert_reference_prompt(answerer, asked[0], f"<image>\nWhat colour is the cat?\n{SHORT}")
    lines = llava_lines(tmp_path / "out", asked)
    upload = json.loads((tmp_path / "out/submission.json").read_text())
    # Every test2015 question, in that file's order; the unanswered one with "".
    assert [u["question_id"] for u in upload] == [1001, 1002, 1003]
    assert upload[2]["answer"] == ""
    assert [u["answer"] for u in upload[:2]] == [vqa_processed(line["text"]) for line in lines]
    assert "3 questions in the submission" in summary[-1]


def vqa_processed(text):
    return evalai_answer(text)


def test_gqa_scores_testdev_balanced(tmp_path, answerer):
    data = tmp_path / "gqa"
    write_jsonl(data / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": "201", "image": "n1.jpg", "text": f"Is it a cat?\n{SHORT}",
         "category": "default"},
        {"question_id": "202", "image": "n2.jpg", "text": f"What shape is it?\n{SHORT}",
         "category": "default"}])
    write_json(data / "data/testdev_balanced_questions.json", {
        "201": {"imageId": "n1", "question": "Is it a cat?", "answer": "yes",
                "isBalanced": True, "types": {"structural": "verify", "semantic": "obj"}},
        "202": {"imageId": "n2", "question": "What shape is it?", "answer": "circle",
                "isBalanced": True, "types": {"structural": "query", "semantic": "attr"}}})
    write_image(data / "data/images/n1.jpg", seed=1)
    write_image(data / "data/images/n2.jpg", seed=2)
    asked, summary = run("gqa", data, answerer, tmp_path / "out")
    assert_reference_prompt(answerer, asked[1], f"<image>\nWhat shape is it?\n{SHORT}")
    lines = llava_lines(tmp_path / "out", asked)
    predictions = json.loads((tmp_path / "out/testdev_balanced_predictions.json").read_text())
    assert predictions == [{"questionId": line["question_id"],
                            "prediction": line["text"].rstrip(".").lower()} for line in lines]
    expected = [float(line["text"].rstrip(".").lower() == truth)
                for line, truth in zip(lines, ("yes", "circle"), strict=True)]
    assert summary[-1] == f"gqa accuracy: {100 * sum(expected) / 2:.2f} (n=2)"


def test_vizwiz_writes_the_submission(tmp_path, answerer):
    data = tmp_path / "vizwiz"
    hint = "When the provided information is insufficient, respond with 'Unanswerable'."
    write_jsonl(data / "llava_test.jsonl", [
        {"question_id": k, "image": f"VizWiz_test_0000000{k}.jpg",
         "text": f"What is this?\n{hint}\n{SHORT}", "category": "default"} for k in (0, 1)])
    for k in (0, 1):
        write_image(data / f"test/VizWiz_test_0000000{k}.jpg", seed=k)
    asked, _ = run("vizwiz", data, answerer, tmp_path / "out")
    assert_reference_prompt(answerer, asked[0], f"<image>\nWhat is this?\n{hint}\n{SHORT}")
    lines = llava_lines(tmp_path / "out", asked)
    upload = json.loads((tmp_path / "out/submission.json").read_text())
    assert upload == [{"image": f"VizWiz_test_0000000{k}.jpg",
                       "answer": vqa_processed(lines[k]["text"])} for k in (0, 1)]


def test_textvqa_scores_with_the_ocr_token_variant(tmp_path, answerer):
    data = tmp_path / "textvqa"
    write_jsonl(data / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": "003a", "image": "003a.jpg",
         "text": f"What is the brand?\nReference OCR token: DAKOTA, DIGITAL\n{SHORT}",
         "category": "default"}])
    write_json(data / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"image_id": "003a", "question": "what is the brand?", "question_id": 34602,
         "answers": ["dakota"] * 10}]})
    write_image(data / "train_images/003a.jpg")
    asked, summary = run("textvqa", data, answerer, tmp_path / "out")
    assert_reference_prompt(answerer, asked[0], "<image>\nWhat is the brand?\nReference OCR "
                                                f"token: DAKOTA, DIGITAL\n{SHORT}")
    lines = llava_lines(tmp_path / "out", asked)
    right = float(vqa_processed(lines[0]["text"]) == "dakota")
    assert summary[-1] == f"textvqa accuracy: {100 * right:.2f} (n=1)"


def test_pope_scores_three_categories(tmp_path, answerer):
    data = tmp_path / "pope"
    categories = ("adversarial", "popular", "random")
    write_jsonl(data / "llava_pope_test.jsonl", [
        {"question_id": i + 1, "image": f"COCO_val2014_00000000000{i}.jpg",
         "text": f"Is there a cat in the image?\n{SHORT}", "category": c}
        for i, c in enumerate(categories)])
    for i, c in enumerate(categories):
        write_jsonl(data / f"coco/coco_pope_{c}.json", [
            {"question_id": 1, "image": f"COCO_val2014_00000000000{i}.jpg",
             "text": "Is there a cat in the image?", "label": "yes" if i else "no"}])
    write_image(data / "val2014/COCO_val2014_000000000000.jpg")
    write_image(data / "val2014/COCO_val2014_000000000001.jpg", seed=1)
    write_image(data / "val2014/000000000002.jpg", seed=2)  # the name TokenPacker's loader opens
    asked, summary = run("pope", data, answerer, tmp_path / "out")
    assert asked[2].image.endswith("val2014/000000000002.jpg")
    assert_reference_prompt(answerer, asked[0], f"<image>\nIs there a cat in the image?\n"
                                                f"{SHORT}")
    lines = llava_lines(tmp_path / "out", asked)
    scores = json.loads((tmp_path / "out/scores.json").read_text())
    assert list(scores["per_category"]) == list(categories)
    labelled = zip(categories, ("no", "yes", "yes"), strict=True)
    for line, (name, label) in zip(lines, labelled, strict=True):
        said_yes = not {"No", "not", "no"} & set(line["text"].split(".")[0]
                                                 .replace(",", "").split(" "))
        assert scores["per_category"][name]["accuracy"] == float(said_yes == (label == "yes"))
    assert summary[-1].startswith("pope (mean of 3 categories) accuracy: ")


def test_mme_writes_the_official_tool_files_and_scores(tmp_path, answerer):
    data = tmp_path / "MME"
    release = data / "MME_Benchmark_release_version"
    questions = []
    for image_id, task, folder in (("0001.png", "count", ""), ("14777.jpg", "artwork",
                                                               "images/")):
        stem = image_id.split(".")[0]
        qa_dir = release / task / ("questions_answers_YN" if folder else "")
        os.makedirs(qa_dir, exist_ok=True)
        (qa_dir / f"{stem}.txt").write_text(
            "Is there a cat? Please answer yes or no.\tYes\n"
            "Is there a dog? Please answer yes or no.\tNo\n")
        write_image(release / task / folder / image_id)
        questions += [{"question_id": f"{task}/{folder}{image_id}",
                       "image": f"{task}/{folder}{image_id}", "text": f"Is there a {a}?\n{SHORT}",
                       "category": task} for a in ("cat", "dog")]
    write_jsonl(data / "llava_mme.jsonl", questions)
    asked, summary = run("mme", data, answerer, tmp_path / "out")
    assert_reference_prompt(answerer, asked[2], f"<image>\nIs there a cat?\n{SHORT}")
    lines = llava_lines(tmp_path / "out", asked)
    count = (tmp_path / "out/mme_results/count.txt").read_text().splitlines()
    assert count == [f"0001.txt\tIs there a {a}? Please answer yes or no.\t{t}\t{line['text']}"
                     for a, t, line in zip(("cat", "dog"), ("Yes", "No"), lines[:2], strict=True)]
    scores = json.loads((tmp_path / "out/scores.json").read_text())
    assert set(scores["per_task"]) == {"count", "artwork"}
    assert summary[-1].startswith("mme perception: ")


MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                   "image", "source", "l2-category", "comment", "split"]


def mmbench_tsv(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = ["\t".join(MMBENCH_COLUMNS)]
    for row in rows:
        lines.append("\t".join(str(row.get(c, "")) for c in MMBENCH_COLUMNS))
    Path(path).write_text("\n".join(lines) + "\n")


def test_mmbench_messages_upload_and_circular_score(tmp_path, answerer):
    data = tmp_path / "mmbench"
    picture = base64.b64encode(png_bytes(3)).decode()
    mmbench_tsv(data / "mmbench_dev_20230712.tsv", [
        {"index": 241, "question": "What is it?", "hint": "A pet.", "A": "cat", "B": "dog",
         "C": "nan", "D": "nan", "answer": "A", "category": "animals", "image": picture,
         "source": "x", "l2-category": "y", "comment": "nan", "split": "dev"},
        {"index": 1000241, "question": "What is it?", "hint": "A pet.", "A": "dog",
         "B": "cat", "C": "nan", "D": "nan", "answer": "B", "category": "animals",
         "image": picture, "source": "x", "l2-category": "y", "comment": "nan",
         "split": "dev"},
        {"index": 7, "question": "Which colour?", "hint": "nan", "A": "red", "B": "blue",
         "C": "green", "D": "", "answer": "C", "category": "colours", "image": picture,
         "source": "x", "l2-category": "y", "comment": "", "split": "dev"}])
    asked, summary = run("mmbench", data, answerer, tmp_path / "out")
    assert_reference_prompt(answerer, asked[0],
                            f"<image>\nA pet.\nWhat is it?\nA. cat\nB. dog\n{LETTER}")
    assert asked[2].message == f"<image>\nWhich colour?\nA. red\nB. blue\nC. green\n{LETTER}"
    lines = [r for _, r in files.read_jsonl(str(tmp_path / "out/answers.jsonl"))]
    assert [(line["question_id"], line["round_id"]) for line in lines] == [
        (241, 0), (1000241, 0), (7, 0)]
    assert lines[0]["prompt"] == "A pet.\nWhat is it?\nA. cat\nB. dog"
    assert lines[2]["options"] == ["red", "blue", "green"]
    assert lines[2]["option_char"] == ["A", "B", "C"]
    assert set(lines[0]) == {"question_id", "round_id", "prompt", "text", "options",
                             "option_char", "answer_id", "model_id", "metadata"}
    sheet = openpyxl.load_workbook(tmp_path / f"out/{MODEL}.xlsx")["Sheet1"]
    rows = list(sheet.iter_rows(values_only=True))
    assert rows[0] == ("index", "question", "A", "B", "C", "D", "prediction", "answer",
                       "split")
    assert rows[1] == (241, "What is it?", "cat", "dog", None, None, lines[0]["text"] or None,
                       "A", "dev")
    assert summary[-1].startswith("mmbench circular accuracy: ") and "(n=2)" in summary[-1]

    # --all_rounds: each row once per rotation of its options, the letters staying put.
    rounds, _ = run("mmbench", data, answerer, tmp_path / "rounds", all_rounds=True)
    assert [q.extra["round_id"] for q in rounds] == [0, 1, 0, 1, 0, 1, 2]
    assert rounds[1].message == f"<image>\nA pet.\nWhat is it?\nA. dog\nB. cat\n{LETTER}"
    assert rounds[1].extra["option_char"] == ["B", "A"]


def test_scienceqa_img_asks_image_and_text_questions(tmp_path, answerer):
    data = tmp_path / "scienceqa"
    write_json(data / "llava_test_CQM-A.json", [
        {"id": "4", "conversations": [
            {"from": "human", "value": "Which is a cat?\nA. dog\nB. cat"},
            {"from": "gpt", "value": "B"}]},
        {"id": "5", "image": "5/image.png", "conversations": [
            {"from": "human", "value": "<image>\nContext: A pet.\nWhich is it?\nA. cat\nB. dog"},
            {"from": "gpt", "value": "A"}]}])
    write_json(data / "problems.json", {
        "4": {"question": "Which is a cat?", "choices": ["dog", "cat"], "answer": 1,
              "image": None, "split": "test"},
        "5": {"question": "Which is it?", "choices": ["cat", "dog"], "answer": 0,
              "image": "image.png", "split": "test"}})
    write_json(data / "pid_splits.json", {"test": ["4", "5"], "train": []})
    write_image(data / "images/test/5/image.png")
    asked, summary = run("scienceqa", data, answerer, tmp_path / "out")
    assert asked[0].image is None
    assert_reference_prompt(answerer, asked[0], f"Which is a cat?\nA. dog\nB. cat\n{LETTER}")
    assert_reference_prompt(answerer, asked[1],
                            f"<image>\nContext: A pet.\nWhich is it?\nA. cat\nB. dog\n{LETTER}")
    lines = llava_lines(tmp_path / "out", asked)
    assert lines[1]["prompt"].startswith("<image>\nContext: A pet.")
    result = json.loads((tmp_path / "out/result.json").read_text())
    assert result["count"] == 2 and set(result["results"]) == {"4", "5"}
    output = json.loads((tmp_path / "out/output.json").read_text())
    assert len(output["correct"]) + len(output["incorrect"]) == 2
    assert summary[-1].startswith("scienceqa img accuracy: ") and "(n=1)" in summary[-1]


def mmmu_table(rows):
    schema = pa.schema([("id", pa.string()), ("question", pa.string()),
                        ("options", pa.string()), ("explanation", pa.string()),
                        ("image_1", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("img_type", pa.string()), ("answer", pa.string()),
                        ("topic_difficulty", pa.string()), ("question_type", pa.string()),
                        ("subfield", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def test_mmmu_prompts_parsing_and_score(tmp_path, answerer):
    data = tmp_path / "MMMU"
    picture = {"bytes": png_bytes(4), "path": "x.png"}
    common = {"explanation": "", "img_type": "['Photos']", "topic_difficulty": "Easy",
              "subfield": "s"}
    rows = {
        "Accounting": [
            {**common, "id": "validation_Accounting_1", "question": "<image 1> Which is red?",
             "options": "['apple', 'leaf']", "image_1": picture, "answer": "A",
             "question_type": "multiple-choice"},
            {**common, "id": "validation_Accounting_2", "question": "How many cats?",
             "options": "[]", "image_1": picture, "answer": "3", "question_type": "open"}],
        "Art": [{**common, "id": "validation_Art_1", "question": "Which image?",
                 "options": "[\"<img='a.png'>\", \"<img='b.png'>\"]", "image_1": picture,
                 "answer": "B", "question_type": "multiple-choice"}]}
    for subject in SUBJECTS:
        os.makedirs(data / subject, exist_ok=True)
        pq.write_table(mmmu_table(rows.get(subject, [])),
                       data / subject / "validation-00000-of-00001.parquet")
    asked, summary = run("mmmu", data, answerer, tmp_path / "out")
    assert [q.question_id for q in asked] == ["validation_Accounting_1",
                                              "validation_Accounting_2", "validation_Art_1"]
    assert_reference_prompt(answerer, asked[0], "<image>\n<image 1> Which is red?\n(A) apple\n"
                                                f"(B) leaf\n\n{LETTER}")
    assert_reference_prompt(answerer, asked[1], f"<image>\nHow many cats?\n{SHORT}")
    assert not asked[2].ask  # two images in the options: not asked
    lines = [r for _, r in files.read_jsonl(str(tmp_path / "out/answers.jsonl"))]
    assert set(lines[0]) == {"id", "question_type", "answer", "response", "parsed_pred",
                             "index2ans"}
    assert set(lines[1]) == {"id", "question_type", "answer", "response", "parsed_pred"}
    assert lines[0]["parsed_pred"] in ("A", "B") and lines[2]["response"] in ("A", "B")
    assert lines[2]["parsed_pred"] == lines[2]["response"]
    assert isinstance(lines[1]["parsed_pred"], list)
    judged = json.loads((tmp_path / "out/val.json").read_text())
    assert judged["metric_dict"]["num_example"] == 3
    assert set(judged) - {"metric_dict"} == {line["id"] for line in lines}
    assert summary[-1] == (f"mmmu accuracy: {100 * judged['metric_dict']['acc']:.2f} (n=3)")


def test_mmvet_writes_the_grader_file(tmp_path, answerer):
    data = tmp_path / "mm-vet"
    write_jsonl(data / "llava-mm-vet.jsonl", [{"image": "v1_0.png", "text": "What is x?",
                                         "category": "conv", "question_id": 0}])
    write_image(data / "images/v1_0.png")
    asked, _ = run("mmvet", data, answerer, tmp_path / "out")
    assert_reference_prompt(answerer, asked[0], "<image>\nWhat is x?")
    lines = llava_lines(tmp_path / "out", asked)
    assert json.loads((tmp_path / f"out/{MODEL}.json").read_text()) == {
        "v1_0": lines[0]["text"]}


def test_ocrbench_results_file(tmp_path, answerer):
    data = tmp_path / "ocrbench"
    records = [{"dataset_name": "IIIT5K", "id": 2843, "image_path": "IIIT5K/test/918_1.png",
                "question": "what is written in the image?", "answers": "CENTRE",
                "type": "Regular Text Recognition"},
               {"dataset_name": "HME100k", "id": 5, "image_path": "HME100k/5.jpg",
                "question": "write the formula", "answers": ["x ^ 2"],
                "type": "Handwritten Mathematical Expression Recognition"}]
    write_json(data / "OCRBench/OCRBench.json", records)
    write_image(data / "OCRBench_Images/IIIT5K/test/918_1.png")
    write_image(data / "OCRBench_Images/HME100k/5.jpg", seed=1)
    asked, summary = run("ocrbench", data, answerer, tmp_path / "out")
    assert_reference_prompt(answerer, asked[0],
                            f"<image>\nwhat is written in the image?\n{SHORT}")
    results = json.loads((tmp_path / f"out/{MODEL}.json").read_text())
    assert [{k: r[k] for k in records[0]} for r in results] == records
    assert all(set(r) == set(records[0]) | {"predict", "result"} for r in results)
    assert results[0]["result"] == int("centre" in results[0]["predict"].lower())
    assert summary[-1].startswith("ocrbench final score: ")


def test_docvqa_submission_and_anls(tmp_path, answerer):
    data = tmp_path / "docvqa"
    write_json(data / "data/val_v1.0.json", {"dataset_name": "docvqa", "data": [
        {"questionId": 49153, "question": "What is the date?", "image": "documents/abc.png",
         "docId": 1, "answers": ["1/2/2003"]}]})
    write_image(data / "images/abc.png")
    asked, summary = run("docvqa", data, answerer, tmp_path / "out", split="val")
    assert_reference_prompt(answerer, asked[0], f"<image>\nWhat is the date?\n{SHORT}")
    lines = [r for _, r in files.read_jsonl(str(tmp_path / "out/answers.jsonl"))]
    assert set(lines[0]) == {"questionId", "answer"}
    assert json.loads((tmp_path / "out/submit.json").read_text()) == [
        {"questionId": 49153, "answer": lines[0]["answer"].rstrip(".")}]
    assert summary[-1].startswith("docvqa anls: ") and summary[-1].endswith("(n=1)")


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Ten GQA questions: one full batch of 8 and a part."""
    data = tmp_path_factory.mktemp("many")
    write_jsonl(data / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": str(300 + k), "image": f"n{k % 4}.jpg",
         "text": f"{('Is there a cat?', 'What colour is it?', 'Is it a dog?')[k % 3]}\n{SHORT}"}
        for k in range(10)])
    for k in range(4):
        write_image(data / f"data/images/n{k}.jpg", seed=10 + k)
    layout = Layout(data=str(data), split="testdev_balanced")
    return suite.benchmark("gqa").questions(layout)


def texts(lines):
    return [line["text"] for line in lines]


@pytest.fixture(scope="module")
def one_device(many, answerer, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_device")
    return answer_all(lambda: answerer, many, suite.benchmark("gqa").answer_line, str(out),
                      model_id=MODEL, log=lambda line: None)


def test_cli_run_on_eight_devices_answers_as_one_device(many, one_device, workdir,
                                                       capsys):
    """``evaluate run`` (its flags parsed) over the 8 devices, then ``evaluate score`` (a
    process of its own) on the answer file it wrote."""
    data = Path(many[0].where.split(":")[0]).parent
    annotations = write_json(data / "data/testdev_balanced_questions.json", {
        q.question_id: {"answer": "yes"} for q in many})
    out = Path(str(workdir)).parent / "cli"
    evaluate.run_command(SimpleNamespace(
        benchmark="gqa", checkpoint=str(workdir), data=str(data), out=str(out), split="",
        image_folder="", all_rounds=False, batch_size=BATCH, max_new_tokens=NEW_TOKENS,
        bucket=BUCKET, limit=0))
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"gqa: 10 questions from {data}"
    assert "answered 10 questions in" in printed[1] and "over 8 devices" in printed[1]
    assert printed[-1].startswith("gqa accuracy: ") and printed[-1].endswith("(n=10)")
    lines = [r for _, r in files.read_jsonl(str(out / "answers.jsonl"))]
    assert len(set(texts(one_device))) > 1  # not a degenerate answer
    assert texts(lines) == texts(one_device)
    assert [x["question_id"] for x in lines] == [q.question_id for q in many]
    assert {x["model_id"] for x in lines} == {MODEL}

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tokenpacker_jax.evaluate", "score", "--benchmark=gqa",
         f"--answers={out / 'answers.jsonl'}", f"--annotations={annotations}"],
        capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == printed[-1]


def test_two_hosts_answer_as_one(many, one_device, answerer, tmp_path):
    """Host 1 answers questions 5-9 into its part file; host 0 answers 0-4 and merges both
    in question order."""
    line = suite.benchmark("gqa").answer_line
    out = str(tmp_path / "hosts")
    assert answer_all(lambda: answerer, many, line, out, model_id=MODEL, process_index=1,
                      process_count=2, log=lambda text: None) is None
    part = Path(out, PARTS, "00001-of-00002.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in part] == [5, 6, 7, 8, 9]
    merged = answer_all(lambda: answerer, many, line, out, model_id=MODEL, process_index=0,
                        process_count=2, log=lambda text: None)
    assert texts(merged) == texts(one_device)
    assert json.loads(Path(out, PARTS, "00000-of-00002.jsonl").read_text().splitlines()[-1])[
        "index"] == 4


class Killed(Exception):
    pass


class Counting:
    """An Answerer that counts what it is asked and can be killed after N batches."""

    def __init__(self, answerer, kill_after=None):
        self.answerer, self.kill_after, self.asked = answerer, kill_after, []

    def __getattr__(self, name):
        return getattr(self.answerer, name)

    def generate(self, prompts):
        if self.kill_after is not None and len(self.asked) == self.kill_after:
            raise Killed
        self.asked.append(len(prompts))
        return self.answerer.generate(prompts)


def test_a_killed_run_resumes_with_the_rest(many, one_device, answerer, tmp_path):
    line = suite.benchmark("gqa").answer_line
    out = str(tmp_path / "killed")
    first = Counting(answerer, kill_after=1)
    with pytest.raises(Killed):
        answer_all(lambda: first, many, line, out, model_id=MODEL, log=lambda text: None)
    part = Path(out, PARTS, "00000-of-00001.jsonl")
    written = [json.loads(x) for x in part.read_text().splitlines()]
    assert [x["index"] for x in written] == list(range(8))
    # A kill while writing the next line leaves it cut short: it is dropped.
    with part.open("a") as file:
        file.write('{"index": 8, "question_id": "308", "answer": {"question_')
    second = Counting(answerer)
    logged = []
    lines = answer_all(lambda: second, many, line, out, model_id=MODEL, log=logged.append)
    assert second.asked == [2]  # only questions 8 and 9
    assert "8 of its 10 questions were answered before; answering 2" in logged[0]
    assert "answered 2 questions in" in logged[1] and "questions/s" in logged[1]
    assert texts(lines) == texts(one_device)
    assert [x["answer_id"] for x in lines[:8]] == [x["answer"]["answer_id"] for x in written]
    # Everything answered: a third run loads no model.
    assert answer_all(lambda: pytest.fail("no model needed"), many, line, out,
                      model_id=MODEL, log=lambda text: None) == lines
    # Part files written for other questions are refused.
    other = [dataclasses.replace(q, question_id="x") for q in many]
    with pytest.raises(ValueError, match="00000-of-00001.jsonl:1: question 0 is '300' here "
                                         "but 'x'"):
        answer_all(lambda: answerer, other, line, out, model_id=MODEL, log=lambda text: None)
