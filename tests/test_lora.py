"""LoRA and QLoRA decoders against PEFT's LoRA on the same transformers model.

For a tiny random LLaMA and Gemma 2, our decoder with random adapters (non-zero B) is
exported with ``convert.adapters`` (base model + PEFT adapter directory), loaded back with
``peft.PeftModel.from_pretrained`` and compared logit for logit; merging the adapters into
the base must not change the logits; the quantised bases (int8, NF4) are checked against an
independent NumPy formulation of the block-wise quantisers, and their logits against the
float base's within the tolerances measured here (BENCHMARKS.md "LoRA and QLoRA").
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file

from tokenpacker_jax.bench import qlora
from tokenpacker_jax.convert import adapters, hf
from tokenpacker_jax.models import layers, lora
from tokenpacker_jax.models.decoder import Decoder

from test_decoder import hf_config, padded_batch, torch_logits

RANK, ALPHA, BLOCK = 4, 8.0, 16


def randomise(model, seed):
    """Matrices of std 1/sqrt(fan_in) and norms near their neutral value (1 for LLaMA's
    x * w, 0 for Gemma's x * (1 + w)), so that logits spread over about one unit and float32
    rounding stays near 1e-6."""
    gen = torch.Generator().manual_seed(seed)
    neutral = 0.0 if model.config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(neutral + 0.1 * noise if "norm" in name
                        else noise / math.sqrt(param.shape[-1]))


def with_adapters(module, params, quantize="none", adapters_from=None, seed=0):
    """(LoRA decoder, its params): ``params`` as base, A from the init, B random (so the
    adapters change the output); ``adapters_from``: take A and B from these params."""
    config = lora.LoraConfig(rank=RANK, alpha=ALPHA, quantize=quantize, block_size=BLOCK)
    decoder = Decoder(dataclasses.replace(module.config, lora=config))
    ids = jnp.zeros((1, 4), jnp.int32)
    target = nn.meta.unbox(jax.eval_shape(decoder.init, jax.random.key(0), ids)["params"])
    flat = traverse_util.flatten_dict(nn.meta.unbox(decoder.init(jax.random.key(1), ids)
                                                    ["params"]))
    flat.update(traverse_util.flatten_dict(lora.adapt(params, target, config)))
    rng = np.random.default_rng(seed)
    source = traverse_util.flatten_dict(adapters_from) if adapters_from is not None else {}
    for path in flat:
        if path in source and lora.is_adapter(path):
            flat[path] = source[path]
        elif path[-1] == "lora_b":
            flat[path] = jnp.asarray(rng.normal(0, 0.3, flat[path].shape), jnp.float32)
    return decoder, traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module", params=("llama3_gqa", "gemma2"))
def tiny(request, tmp_path_factory):
    """(family, torch model, our plain decoder, its params, LoRA decoder, its params,
    the export directory holding base/ and adapter/)."""
    family = request.param
    torch_model = transformers.AutoModelForCausalLM.from_config(
        hf_config(family), attn_implementation="eager").eval()
    randomise(torch_model, seed=1)
    path = tmp_path_factory.mktemp(family)
    torch_model.save_pretrained(path / "hf")
    module, params = hf.load_decoder(path / "hf")
    decoder, lora_params = with_adapters(module, params)
    hf.save_decoder(module, adapters.base_params(lora_params, decoder.config), path / "base")
    adapters.save_peft_adapter(decoder.config, lora_params, path / "adapter",
                               base_model=str(path / "base"))
    return family, torch_model, module, params, decoder, lora_params, path


def test_lora_logits_equal_peft(tiny):
    _, _, _, _, decoder, lora_params, path = tiny
    base = transformers.AutoModelForCausalLM.from_pretrained(
        path / "base", attn_implementation="eager").eval()
    model = peft.PeftModel.from_pretrained(base, path / "adapter").eval()
    assert model.peft_config["default"].r == RANK
    ids, mask = padded_batch()
    valid = mask.astype(bool)
    expected = torch_logits(model, ids, mask)
    got = np.asarray(jax.jit(decoder.apply)({"params": lora_params}, ids, mask))
    assert expected[valid].std() > 0.5, "logits too flat for a meaningful comparison"
    # The adapters matter: without them the logits are far from PEFT's.
    with model.disable_adapter():
        plain = torch_logits(model, ids, mask)
    assert np.abs(plain[valid] - expected[valid]).max() > 0.5
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-5, rtol=0)


def test_peft_names_every_adapter(tiny):
    """The file holds PEFT's keys and shapes for all seven projections of every layer, and
    PEFT's own state dict of the loaded model equals it."""
    _, _, module, _, _, _, path = tiny
    config = module.config
    tensors = load_file(path / "adapter" / adapters.WEIGHTS_FILE)
    layer0 = "base_model.model.model.layers.0."
    q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    assert tensors[layer0 + "self_attn.q_proj.lora_A.weight"].shape == (RANK, config.width)
    assert tensors[layer0 + "self_attn.q_proj.lora_B.weight"].shape == (q_out, RANK)
    assert tensors[layer0 + "self_attn.v_proj.lora_B.weight"].shape == (kv_out, RANK)
    assert tensors[layer0 + "self_attn.o_proj.lora_A.weight"].shape == (RANK, q_out)
    assert tensors[layer0 + "mlp.down_proj.lora_A.weight"].shape == (RANK, config.mlp_dim)
    assert len(tensors) == config.num_layers * 7 * 2
    base = transformers.AutoModelForCausalLM.from_pretrained(path / "base")
    model = peft.PeftModel.from_pretrained(base, path / "adapter")
    theirs = peft.get_peft_model_state_dict(model)
    assert set(theirs) == set(tensors)
    for key, value in theirs.items():
        np.testing.assert_array_equal(value.numpy(), tensors[key])


def test_merged_logits_equal_unmerged(tiny):
    _, _, module, _, decoder, lora_params, _ = tiny
    ids, mask = padded_batch()
    valid = mask.astype(bool)
    merged = lora.merge(lora_params, decoder.config.lora)
    assert not lora.has_adapters(merged)
    unmerged = np.asarray(jax.jit(decoder.apply)({"params": lora_params}, ids, mask))
    folded = np.asarray(jax.jit(module.apply)({"params": merged}, ids, mask))
    np.testing.assert_allclose(folded[valid], unmerged[valid], atol=1e-5, rtol=0)


# RMS logit difference / std of the float base's logits, QLoRA vs LoRA with the same
# adapters, measured on these fixtures (llama3_gqa, gemma2): int8 0.011 / 0.012, NF4
# 0.20 / 0.24 (the largest single logit: int8 0.06 / 0.11, NF4 0.99 / 1.49 std). Random
# tiny models at blocks of 16 are a hard case; BENCHMARKS.md "LoRA and QLoRA" has larger ones.
QUANTISED_TOLERANCE = {"int8": 0.03, "nf4": 0.5}


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_quantised_base_stays_close_to_float_base(tiny, quantize):
    """QLoRA logits vs LoRA logits (same base weights, same adapters), and PEFT on the
    dequantised base gives QLoRA's logits."""
    _, _, module, params, decoder, lora_params, _ = tiny
    quantised, q_params = with_adapters(module, params, quantize, adapters_from=lora_params)
    flat = traverse_util.flatten_dict(q_params)
    assert any(key[-1] == lora.CODES for key in flat)
    assert not any(key[-1] == "kernel" and key[-2].endswith("_proj") for key in flat)
    ids, mask = padded_batch()
    valid = mask.astype(bool)
    reference = np.asarray(jax.jit(decoder.apply)({"params": lora_params}, ids, mask))
    got = np.asarray(jax.jit(quantised.apply)({"params": q_params}, ids, mask))
    error = np.sqrt(np.mean((got[valid] - reference[valid]) ** 2)) / reference[valid].std()
    assert 0 < error < QUANTISED_TOLERANCE[quantize], error
    merged = lora.merge(q_params, quantised.config.lora)
    folded = np.asarray(jax.jit(module.apply)({"params": merged}, ids, mask))
    np.testing.assert_allclose(folded[valid], got[valid], atol=1e-5, rtol=0)



def numpy_quantise(kernel, block, kind):
    """Dequantised [in, out] kernel: blocks of ``block`` rows, each column scaled by its
    block's absmax; int8 rounds to 127 levels a side, NF4 to the nearest NormalFloat level."""
    kernel = np.asarray(kernel, np.float64)
    out = np.empty_like(kernel)
    levels = lora.NF4_LEVELS.astype(np.float64)
    for start in range(0, kernel.shape[0], block):
        part = kernel[start:start + block]
        absmax = np.abs(part).max(axis=0, keepdims=True)
        if kind == "int8":
            out[start:start + block] = np.round(part / absmax * 127) * absmax / 127
        else:
            nearest = np.abs(part[..., None] / absmax[..., None] - levels).argmin(axis=-1)
            out[start:start + block] = levels[nearest] * absmax
    return out


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantisers_match_numpy(kind):
    kernel = np.random.default_rng(0).normal(size=(2, 64, 24)).astype(np.float32)  # [L, in, out]
    config = lora.LoraConfig(rank=2, alpha=2.0, quantize=kind, block_size=BLOCK)
    codes, scales = lora.quantize(jnp.asarray(kernel), 1, config)
    assert codes.dtype == (np.int8 if kind == "int8" else np.uint8)
    assert codes.shape == ((2, 64, 24) if kind == "int8" else (2, 32, 24))
    assert scales.shape == (2, 64 // BLOCK, 24)
    got = np.asarray(lora.dequantize(codes, scales, 1, config, jnp.float32))
    for layer in range(2):
        np.testing.assert_allclose(got[layer], numpy_quantise(kernel[layer], BLOCK, kind),
                                   rtol=1e-6, atol=1e-6)


def test_dense_layers_take_adapters_by_name():
    config = lora.LoraConfig(rank=2, alpha=4.0, targets=("q_*",))
    assert layers.dense(4, axes=("embed", "mlp"), name="q_proj", lora=config).lora is config
    assert layers.dense(4, axes=("embed", "mlp"), name="k_proj", lora=config).lora is None
    with pytest.raises(ValueError, match="does not split into blocks"):
        lora.quantize(jnp.ones((10, 4)), 1, lora.LoraConfig(rank=1, alpha=1.0,
                                                            quantize="nf4", block_size=4))


def test_nf4_base_equals_qwix():
    """Our NF4 base (codes, block scales, dequantised matmul) against qwix's QLoRA provider
    on the same plain decoder, float weights and adapters (its MLP projections, which qwix
    adapts): the same logits. (int8 rounds differently: BENCHMARKS.md "LoRA and QLoRA".)"""
    sides = qlora.build_sides(qlora.SIZES["tiny"], "nf4")
    ours, theirs = sides.logits("ours"), sides.logits("qwix")
    assert qlora.relative_rms(ours, sides.reference) > 1e-3  # the base is quantised
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
