"""A user's mistakes at every command line: each is one line on stderr naming what is wrong
and exit status 2, no traceback; with the verbosity flag, the traceback.

The commands that need a run take test_train_run's uninterrupted run of its shrunken tiny
config; each command is a process of its own, two at a time.
"""

import json
import os
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import test_train_run

ROOT = Path(__file__).resolve().parents[1]
# test_train_run's module fixtures, set up once for this module: the generated data and an
# uninterrupted run to point the commands at.
data_dir = test_train_run.data_dir
uninterrupted = test_train_run.uninterrupted


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, data_dir):
    """Small files the mistakes point at."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "garbage.png").write_bytes(b"not an image at all")
    (root / "questions.jsonl").write_text('{"question_id": 1, "text": "hi"}\n{oops\n')
    (root / "empty").mkdir()
    other = root / "other_model"  # a HF directory of a model that is not LLaVA / TokenPacker
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    save_file({"bert.embeddings.word_embeddings.weight": np.zeros((4, 2), np.float32)},
              str(other / "model.safetensors"))
    return root


def tiny_config(data_dir) -> str:
    return f"--config={ROOT / 'configs' / 'tiny.py'}:stage=1,data={data_dir}"


# (command, arguments, what the one line says); {inputs}, {run}, {config} are filled in. Each
# kind of mistake once, each command once at least (the dearest are at ~8 s a process, most
# of it imports).
MISTAKES = {
    "train: missing config file": (
        "tokenpacker_jax.train", ["--config=configs/nope.py", "--workdir={inputs}/w1"],
        "configs/nope.py"),
    "train: bad config value": (
        "tokenpacker_jax.train", ["{config}", "--workdir={inputs}/w2",
                                  "--config.data.batch_size=0"],
        "data.batch_size: 0 must be positive"),
    "train: unknown config field": (
        "tokenpacker_jax.train", ["{config}", "--workdir={inputs}/w3", "--config.data.nope=1"],
        "--config.data.nope: the config has no field 'nope'"),
    "generate: no checkpoint in the directory": (
        "tokenpacker_jax.generate", ["--checkpoint={inputs}/empty", "--prompt=hi"],
        "no checkpoint in"),
    "generate: undecodable image": (
        "tokenpacker_jax.generate", ["--checkpoint={run}", "--prompt=hi",
                                     "--image={inputs}/garbage.png"],
        "garbage.png: cannot decode image"),
    "evaluate: missing question file": (
        "tokenpacker_jax.evaluate", ["--checkpoint={run}", "--questions={inputs}/nope.jsonl"],
        "nope.jsonl: not found"),
    "evaluate: unreadable question file": (
        "tokenpacker_jax.evaluate", ["--checkpoint={run}",
                                     "--questions={inputs}/questions.jsonl"],
        "questions.jsonl:2: not valid JSON"),
    "convert: wrong format name": (
        "tokenpacker_jax.convert", ["export", "--checkpoint={run}", "--out={inputs}/x1",
                                    "--format=onnx"],
        "argument --format: invalid choice: 'onnx'"),
    "convert: checkpoint of another model": (
        "tokenpacker_jax.convert", ["import", "--checkpoint={inputs}/other_model",
                                    "--vision={inputs}/other_model", "--out={inputs}/x2"],
        "other_model: checkpoint has no model.mm_projector.* keys"),
    "aot: bad topology": (
        "tokenpacker_jax.aot", ["{config}", "--topology=v9:1x1"], "topology 'v9:1x1'"),
    "quickstart: workdir under a file": (
        "tokenpacker_jax.quickstart", ["--workdir={inputs}/garbage.png/run"],
        "garbage.png/run"),
    "data.synthetic: bad value": (
        "tokenpacker_jax.data.synthetic", ["--out={inputs}/s", "--num=2", "--size=10"],
        "--size 10: images below 24 px"),
    "bench: unknown table": (
        "tokenpacker_jax.bench", ["nonsense"], "unknown table 'nonsense'"),
    "chat: no run directory": (
        "tokenpacker_jax.chat", ["--checkpoint={inputs}/nope"], "nope: not a directory"),
    "serve: prompt lengths that do not fit": (
        "tokenpacker_jax.serve", ["--checkpoint={run}", "--max_length=64", "--buckets=128"],
        "must lie in [1, max_length 64)"),
    "launch/tpu.py: bad accelerator": (
        "launch/tpu.py", ["create", "--name=tp", "--zone=z", "--accelerator-type=v9-8",
                          "--dry-run"], "--accelerator-type 'v9-8'"),
}
# The same mistakes with the flag that shows the traceback.
VERBOSE = {
    "train --verbosity=1": ("tokenpacker_jax.train", [
        "{config}", "--workdir={inputs}/w4", "--config.data.batch_size=0", "--verbosity=1"]),
    "convert --verbose": ("tokenpacker_jax.convert", [
        "export", "--checkpoint={inputs}/empty", "--out={inputs}/x3", "--format=hf",
        "--verbose"]),
}


def _command(module: str, args: list[str], fill: dict[str, str]) -> list[str]:
    head = [str(ROOT / module)] if module.endswith(".py") else ["-m", module]
    return [sys.executable, *head, *(a.format(**fill) for a in args)]


@pytest.fixture(scope="module")
def commands(uninterrupted, data_dir, inputs):
    """Each command of MISTAKES and VERBOSE run once, two at a time: name -> its result."""
    run_copy = shutil.copytree(uninterrupted[0], inputs / "run")
    fill = {"inputs": str(inputs), "run": str(run_copy), "config": tiny_config(data_dir)}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(item):
        name, (module, args, *_) = item
        return name, subprocess.run(_command(module, args, fill), capture_output=True,
                                    text=True, cwd=ROOT, env=env, timeout=300)

    with futures.ThreadPoolExecutor(2) as pool:
        return dict(pool.map(run, [*MISTAKES.items(), *VERBOSE.items()]))


@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_a_mistake_is_one_line_and_a_non_zero_exit(commands, name):
    result = commands[name]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "error: " in lines[0], lines
    assert MISTAKES[name][2] in lines[0], lines


@pytest.mark.parametrize("name", sorted(VERBOSE))
def test_the_verbosity_flag_shows_the_traceback(commands, name):
    result = commands[name]
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr, (
        result.stderr[-3000:])
