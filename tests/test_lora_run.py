"""LoRA stage-2 runs of the tiny config (``configs/tiny.py:stage=2,lora=true``), started from
a stage-1 run: the loss falls, only the adapters and the projector change (the LLM's base
and the tower stay bit-identical), a run killed with SIGKILL resumes to the same parameters
bit for bit, the ``hf`` export loads in PyTorch with PEFT and gives our logits, and
``merge-lora`` writes a run without adapters that gives the same logits and the same
answers through evaluation's answerer (generate's generator). A QLoRA (NF4) run
keeps its quantised base and exports the same way."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import traverse_util
from PIL import Image

from tokenpacker_jax import assembly, checkpoint, conversion, run_export, sharding, train
from tokenpacker_jax import train_state as state_lib
from tokenpacker_jax.data import batch as batch_lib
from tokenpacker_jax.evaluation.runner import Answerer
from tokenpacker_jax.models import lora
from tokenpacker_jax.models.decoder import Decoder
from tokenpacker_jax.optim import split_trainable

from test_train_run import data_dir, small_config  # noqa: F401 (data_dir: a fixture)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def lora_config(data, stage1, variant="lora=true", **overrides):
    """The tiny LoRA stage 2 from ``stage1``, its loss computed 48 positions at a time."""
    return small_config(data, stage=2, variant=variant,
                        **{"train.init_from": str(stage1), "train.num_steps": STEPS,
                           "train.loss_chunk": 48, "optim.warmup_ratio": 0.0, **overrides})


@pytest.fixture(scope="module")
def stage1(data_dir, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("stage1")
    train.run(small_config(data_dir, stage=1, **{"train.num_steps": 2}), str(workdir))
    return workdir


@pytest.fixture(scope="module")
def lora_run(data_dir, stage1, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("lora")
    train.run(lora_config(data_dir, stage1), str(workdir))
    return workdir


def flat_params(workdir):
    return traverse_util.flatten_dict(jax.tree.map(np.asarray,
                                                   assembly.load_trained(str(workdir)).params))


def text_batch(vocab, seed=0):
    ids = np.random.default_rng(seed).integers(3, vocab, (2, 24)).astype(np.int32)
    return ids, np.ones_like(ids)


def test_only_adapters_and_projector_train(data_dir, stage1, lora_run):  # noqa: F811
    losses = [json.loads(line)["train/loss"]
              for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
    before, after = flat_params(stage1), flat_params(lora_run)
    adapters = [path for path in after if lora.is_adapter(path)]
    assert adapters and all(path[0] == "decoder" for path in adapters)
    assert all(np.any(after[path] != 0) for path in adapters if path[-1] == "lora_b")
    assert set(after) - set(adapters) == set(before)
    for path, value in before.items():
        if path[0] == "projector":
            continue
        np.testing.assert_array_equal(after[path], value, err_msg="/".join(path))
    assert any(np.any(after[path] != value) for path, value in before.items()
               if path[0] == "projector")

    # The optimizer tracks exactly the adapters and the projector.
    config = lora_config(data_dir, stage1)
    model = assembly.build_model(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    abstract, _ = state_lib.param_shardings(model, mesh, config.sharding.rules)
    trained, _ = split_trainable(abstract, tuple(config.train.trainable))
    paths = traverse_util.flatten_dict(trained)
    assert {p for p in paths if p[0] == "decoder"} == set(adapters)
    assert {p[0] for p in paths} == {"projector", "decoder"}


def test_sigkill_then_rerun_equals_uninterrupted(data_dir, stage1, lora_run,  # noqa: F811
                                                  tmp_path):
    """Killed after its step-4 checkpoint and rerun: the same parameters, bit for bit
    (LoRA dropout draws from the step, so the resumed steps drop what the first run's
    would have)."""
    workdir = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
        import jax
        jax.config.update("jax_default_matmul_precision", "highest")
        from test_lora_run import lora_config
        from tokenpacker_jax import train
        def hook(step, batch):
            if step == 5:
                os.kill(os.getpid(), signal.SIGKILL)
        train.run(lora_config({str(data_dir)!r}, {str(stage1)!r}), {str(workdir)!r},
                  on_step=hook)
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=dict(os.environ), cwd=ROOT, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert checkpoint.latest_step(workdir) == 4
    # The same command again (here in this process): it resumes from step 4.
    train.run(lora_config(data_dir, stage1), str(workdir))
    expected, got = flat_params(lora_run), flat_params(workdir)
    assert set(got) == set(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path], value, err_msg="/".join(path))


def peft_logits(out, ids, mask):
    base = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    model = peft.PeftModel.from_pretrained(base, out / run_export.ADAPTER_DIR).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def our_decoder_logits(workdir, ids, mask):
    trained = assembly.load_trained(str(workdir))
    decoder = Decoder(trained.model.config.decoder)
    return np.asarray(decoder.apply({"params": trained.params["decoder"]}, ids, mask))


def test_hf_export_loads_in_peft_and_gives_our_logits(lora_run, tmp_path):
    out = Path(conversion.main(["export", "--checkpoint", str(lora_run), "--out",
                         str(tmp_path / "hf"), "--format", "hf"]))
    config = json.loads((out / run_export.ADAPTER_DIR / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16.0, 0.05)
    ids, mask = text_batch(json.loads((out / "config.json").read_text())["vocab_size"])
    expected = peft_logits(out, ids, mask)
    got = our_decoder_logits(lora_run, ids, mask)
    assert expected.std() > 0.1
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_merge_lora_writes_a_run_with_the_same_logits(lora_run, tmp_path):
    merged = Path(conversion.main(["merge-lora", "--checkpoint", str(lora_run), "--out",
                            str(tmp_path / "merged")]))
    before, after = assembly.load_trained(str(lora_run)), assembly.load_trained(str(merged))
    assert after.config.model.lora.rank == 0 and after.step == 0
    assert not lora.has_adapters(after.params)
    assert after.config.convert.merged_step == STEPS
    # The whole model, an image spliced in: same logits.
    inputs = batch_lib.example_inputs(batch_lib.Dims.of_model(before.model.config, 24), 2)
    rng = np.random.default_rng(1)
    inputs["input_ids"] = rng.integers(3, 300, (2, 24)).astype(np.int32)
    inputs["image_mask"] = np.zeros((2, 24), bool)
    inputs["image_mask"][:, 1:10] = True
    inputs["pixel_values"] = rng.normal(size=inputs["pixel_values"].shape).astype(np.float32)
    unmerged = np.asarray(before.model.apply({"params": before.params}, **inputs))
    folded = np.asarray(after.model.apply({"params": after.params}, **inputs))
    np.testing.assert_allclose(folded, unmerged, atol=1e-5, rtol=0)
    # generate and evaluate read it as any run (evaluation's answerer drives generate's
    # Generator): the same greedy answers as the run with its adapters apart.
    image = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    questions = [("What is in the image?", image), ("Describe it.", None)]
    answers = []
    for trained in (before, after):
        answerer = Answerer(trained, batch_size=2, max_new_tokens=6, bucket=32)
        answers.append(answerer.generate(answerer.prompts(questions)))
    assert answers[1] == answers[0]
    # A normal run directory: exports as any other (no adapter directory).
    exported = Path(conversion.main(["export", "--checkpoint", str(merged), "--out",
                              str(tmp_path / "hf"), "--format", "hf"]))
    assert (exported / "config.json").is_file() and not (exported / run_export.ADAPTER_DIR).exists()


def test_qlora_run_keeps_its_quantised_base(data_dir, stage1, tmp_path):  # noqa: F811
    workdir = tmp_path / "qlora"
    config = lora_config(data_dir, stage1, variant="lora=true,quantize=nf4",
                         **{"train.num_steps": 2, "model.lora.block_size": 16})
    summary = train.run(config, str(workdir))
    assert np.isfinite(summary["train/loss"])
    base, after = flat_params(stage1), flat_params(workdir)
    lora_config_ = assembly.load_trained(str(workdir)).model.config.decoder.lora
    kernels = [path for path in after if path[-1] == lora.CODES]
    assert len(kernels) == 7
    for path in kernels:
        kernel = base[path[:-1] + ("kernel",)]
        codes, scales = lora.quantize(kernel, kernel.ndim - (after[path[:-1] + ("lora_a",)].ndim
                                                             - 1), lora_config_)
        np.testing.assert_array_equal(after[path], codes)
        np.testing.assert_array_equal(after[path[:-1] + (lora.SCALES,)], scales)
    out = Path(conversion.main(["export", "--checkpoint", str(workdir), "--out",
                         str(tmp_path / "hf"), "--format", "hf"]))
    ids, mask = text_batch(400)
    np.testing.assert_allclose(our_decoder_logits(workdir, ids, mask),
                               peft_logits(out, ids, mask), atol=1e-5, rtol=0)
