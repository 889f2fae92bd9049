"""Decoders against transformers' PyTorch models: logits on padded batches, KV-cache decoding,
greedy generation, export / import round trips, config.json layouts, parameter counts;
packed rows by the XLA, splash and (lowered for CUDA) cuDNN kernels.

Tiny random models of each family are saved with ``save_pretrained`` once per module.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax import export
from jax._src.cudnn import fused_attention_stablehlo
from safetensors.numpy import load_file

from tokenpacker_jax.convert import checkpoint_io, hf, hf_decoder
from tokenpacker_jax.models import layers
from tokenpacker_jax.models.attention import attend_one_token, attention_mask
from tokenpacker_jax.models.decoder import Decoder, unstack_layers

VOCAB = 128
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=16)


def hf_config(family):
    """Tiny configs: MHA LLaMA-2; GQA LLaMA-3 with llama3 RoPE scaling; Gemma with MQA;
    Gemma 2 with a sliding window (4) shorter than the test sequences; Gemma 3 text with
    an irregular sliding / global pattern and linear RoPE scaling on the global layers."""
    if family == "llama_mha":
        return transformers.LlamaConfig(**TINY, num_key_value_heads=4)
    if family == "llama3_gqa":
        return transformers.LlamaConfig(**TINY, num_key_value_heads=2,
                                        rope_parameters=dict(LLAMA3_ROPE),
                                        bos_token_id=1, eos_token_id=[2, 3])
    if family == "gemma":
        return transformers.GemmaConfig(**TINY, num_key_value_heads=1, head_dim=8)
    if family == "gemma2":
        return transformers.Gemma2Config(**{**TINY, "num_hidden_layers": 4},
                                         num_key_value_heads=2, head_dim=8, sliding_window=4,
                                         query_pre_attn_scalar=16)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            **{**TINY, "num_hidden_layers": 4}, num_key_value_heads=2, head_dim=8,
            sliding_window=4, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention",
                         "sliding_attention"],
            rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0,
                                                    rope_theta=1e6),
                             "sliding_attention": dict(rope_type="default", rope_theta=1e4)})
    raise ValueError(family)


FAMILIES = ("llama_mha", "llama3_gqa", "gemma", "gemma2", "gemma3")


def randomize(model, seed):
    """Weights large enough that logits spread over several units (a 1e-4 tolerance then
    means something), and norm weights away from their initial values (for Gemma's
    x * (1 + w) this makes the scales about 2, which keeps the tiny models from repeating
    their input token in generation)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.3 * noise if "norm" in name else 0.25 * noise)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    """(family, checkpoint dir, torch model, our module, our params, jitted forward)."""
    family = request.param
    torch_model = transformers.AutoModelForCausalLM.from_config(
        hf_config(family), attn_implementation="eager").eval()
    randomize(torch_model, seed=FAMILIES.index(family))
    path = tmp_path_factory.mktemp(family)
    torch_model.save_pretrained(path)
    module, params = hf.load_decoder(path)
    forward = jax.jit(module.apply)
    return family, path, torch_model, module, params, forward


def padded_batch(length=12, seed=0):
    """Rows: full; left padded by 3; right padded by 4."""
    ids = np.random.RandomState(seed).randint(4, VOCAB, size=(3, length))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, -4:] = 0
    ids = np.where(mask == 1, ids, 0)
    return ids, mask


def torch_logits(model, ids, mask):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0) * mask
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.numpy()


def test_logits_match_transformers_on_padded_batch(tiny):
    family, _, torch_model, module, params, forward = tiny
    ids, mask = padded_batch()
    expected = torch_logits(torch_model, ids, mask)
    got = np.asarray(forward({"params": params}, ids, mask))
    valid = mask.astype(bool)
    assert got.shape == (3, 12, VOCAB) and got.dtype == np.float32
    assert expected[valid].std() > 0.5, "logits too flat for a meaningful comparison"
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-4, rtol=0)

    # The embeddings entry point (used to splice in visual tokens) gives the same logits.
    embeds = module.apply({"params": params}, ids, method=Decoder.embed)
    from_embeds = np.asarray(forward({"params": params}, inputs_embeds=embeds,
                                     attention_mask=mask))
    np.testing.assert_allclose(from_embeds[valid], got[valid], atol=1e-5, rtol=0)


# One cache size and prompt length for the decoding tests, so they share compilations.
MAX_LENGTH = 28
PROMPT = 8


@functools.cache
def decode_fns(module):
    prefill = jax.jit(functools.partial(module.apply, method=Decoder.prefill,
                                        max_length=MAX_LENGTH))
    step = jax.jit(functools.partial(module.apply, method=Decoder.decode_step))
    return prefill, step


def test_kv_cache_decoding_reproduces_full_sequence(tiny):
    """Prompt (rows: left padded, right padded, full) then 16 teacher-forced steps."""
    _, _, _, module, params, forward = tiny
    variables = {"params": params}
    prompt, prompt_mask = padded_batch(length=PROMPT, seed=1)
    prompt_mask = prompt_mask[[1, 2, 0]]  # left padded, right padded, full
    prompt = prompt[[1, 2, 0]]
    steps = 16
    new = np.random.RandomState(2).randint(4, VOCAB, size=(3, steps))
    full_ids = np.concatenate([prompt, new], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones_like(new)], axis=1)
    full = np.asarray(forward(variables, full_ids, full_mask))

    prefill, step = decode_fns(module)
    logits, cache = prefill(variables, prompt, prompt_mask)
    last_prompt = [7, 3, 7]  # last real token of each row
    np.testing.assert_allclose(np.asarray(logits), full[np.arange(3), last_prompt], atol=1e-4,
                               rtol=0)
    for i in range(steps):
        logits, cache = step(variables, jnp.asarray(new[:, i]), cache)
        np.testing.assert_allclose(np.asarray(logits), full[:, 8 + i], atol=1e-4, rtol=0,
                                   err_msg=f"decode step {i}")
    assert int(cache.index) == 8 + steps
    np.testing.assert_array_equal(np.asarray(cache.next_position),
                                  prompt_mask.sum(axis=1) + steps)


def test_per_layer_cache_decodes_as_the_stacked_one(tiny):
    """The unscanned decoder over one cache array per layer (``KVCache.per_layer``, what
    ``Generator`` decodes with on the CPU) gives the stacked cache's logits and keeps its
    layout from step to step; the scanned decoder refuses it."""
    _, _, _, module, params, _ = tiny
    flat = Decoder(dataclasses.replace(module.config, scan_layers=False))
    flat_params = {"params": unstack_layers(params, module.config.num_layers)}
    prompt, mask = padded_batch(length=PROMPT, seed=4)
    prefill, step = decode_fns(module)
    flat_prefill, flat_step = decode_fns(flat)
    logits, stacked = prefill({"params": params}, prompt, mask)
    _, cache = flat_prefill(flat_params, prompt, mask)
    cache = cache.per_layer()
    assert len(cache.keys) == module.config.num_layers and cache.max_length == MAX_LENGTH
    for i in range(4):
        token = jnp.argmax(logits, axis=-1)
        logits, stacked = step({"params": params}, token, stacked)
        flat_logits, cache = flat_step(flat_params, token, cache)
        # (atol as for the cache against the full forward: scanned and unscanned layers
        # fuse their float32 sums differently)
        np.testing.assert_allclose(np.asarray(flat_logits), np.asarray(logits), atol=1e-4,
                                   rtol=0, err_msg=f"decode step {i}")
    assert isinstance(cache.keys, tuple) and isinstance(cache.values, tuple)
    layers, batch, length, kv_heads, head_dim = stacked.values.shape
    per_layer = np.stack(cache.values).reshape(layers, batch, kv_heads, length, head_dim)
    np.testing.assert_allclose(per_layer.swapaxes(2, 3), np.asarray(stacked.values),
                               atol=1e-4)
    with pytest.raises(ValueError, match="per-layer"):
        step({"params": params}, token, cache)


def test_greedy_generation_matches_transformers(tiny):
    _, _, torch_model, module, params, _ = tiny
    prompt, mask = padded_batch(length=PROMPT, seed=3)
    # Left padding only (transformers' generate needs it): full; 3 pads; 5 pads.
    mask[2] = np.arange(PROMPT) >= 5
    prompt = np.where(mask == 1, np.random.RandomState(5).randint(4, VOCAB, prompt.shape), 0)
    new_tokens = MAX_LENGTH - PROMPT
    torch_model.generation_config.eos_token_id = None  # never stop early
    with torch.no_grad():
        expected = torch_model.generate(
            input_ids=torch.tensor(prompt), attention_mask=torch.tensor(mask),
            do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            pad_token_id=0).numpy()[:, prompt.shape[1]:]

    prefill, step = decode_fns(module)
    variables = {"params": params}
    logits, cache = prefill(variables, prompt, mask)
    generated = []
    for i in range(new_tokens):
        token = jnp.argmax(logits, axis=-1)
        generated.append(np.asarray(token))
        if i + 1 < new_tokens:
            logits, cache = step(variables, token, cache)
    assert len(np.unique(expected)) > 5, "degenerate generation would prove little"
    np.testing.assert_array_equal(np.stack(generated, axis=1), expected)


def test_export_is_bit_exact_and_loads_in_transformers(tiny, tmp_path):
    """Exported in several safetensors shards with an index, as large models are."""
    _, path, torch_model, module, params, forward = tiny
    hf.save_decoder(module, params, tmp_path, max_shard_bytes=40_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    original = load_file(path / "model.safetensors")
    exported = checkpoint_io.TensorReader(tmp_path)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    _, reimported = hf.load_decoder(tmp_path)  # reads the sharded index
    jax.tree_util.tree_map(np.testing.assert_array_equal, reimported, params)

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(torch_model)
    ids, mask = padded_batch(seed=4)
    valid = mask.astype(bool)
    ours = np.asarray(forward({"params": params}, ids, mask))
    np.testing.assert_allclose(torch_logits(reloaded, ids, mask)[valid], ours[valid],
                               atol=1e-4, rtol=0)


def test_config_json_layouts_round_trip(tiny, tmp_path):
    """Our config -> 4.x and 5.x config.json -> transformers' own parse -> our config."""
    _, path, _, module, _, _ = tiny
    config = module.config
    for layout in ("4", "5"):
        hf_dict = hf_decoder.decoder_config_to_hf(config, layout)
        assert ("rope_parameters" in hf_dict) == (layout == "5")
        assert hf_decoder.decoder_config_from_hf(hf_dict) == config
        (tmp_path / "config.json").write_text(json.dumps(hf_dict))
        parsed = transformers.AutoConfig.from_pretrained(tmp_path).to_dict()
        assert hf_decoder.decoder_config_from_hf(parsed) == config


# Released config.json files (transformers 4.x layout), abridged to the architecture keys.
VICUNA_7B_V15 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "pad_token_id": 0,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "torch_dtype": "float16", "vocab_size": 32000}
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256}
GEMMA_2B = {
    "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "bos_token_id": 2,
    "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu", "hidden_size": 2048,
    "intermediate_size": 16384, "max_position_embeddings": 8192, "num_attention_heads": 8,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0, "vocab_size": 256000}
GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": [1, 107], "final_logit_softcapping": 30.0, "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304, "intermediate_size": 9216, "max_position_embeddings": 8192,
    "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 256000}
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
    "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": [1, 106],
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": 512, "sliding_window_pattern": 6, "vocab_size": 262144}


@pytest.mark.parametrize("released", [VICUNA_7B_V15, LLAMA31_8B, GEMMA_2B, GEMMA2_2B,
                                      GEMMA3_1B],
                         ids=["vicuna7b", "llama31_8b", "gemma2b", "gemma2_2b", "gemma3_1b"])
def test_released_4x_configs_read_as_transformers_5_reads_them(released, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(released))
    ours = hf_decoder.decoder_config_from_hf(released)
    normalised = transformers.AutoConfig.from_pretrained(tmp_path).to_dict()
    assert "rope_parameters" in normalised
    assert hf_decoder.decoder_config_from_hf(normalised) == ours
    if released is LLAMA31_8B:
        assert (ours.rope_type, ours.rope_factor, ours.rope_original_max_position,
                ours.eos_token_id, ours.num_kv_heads) == ("llama3", 8.0, 8192,
                                                          (128001, 128008, 128009), 8)
    if released is GEMMA_2B:
        assert ours.hidden_act == "gelu_pytorch_tanh" and ours.num_kv_heads == 1
    if released is GEMMA2_2B:
        assert ours.layer_types[:2] == ("sliding_attention", "full_attention")
        assert ours.query_scale == 256**-0.5
    if released is GEMMA3_1B:
        assert ours.layer_types[4:7] == ("sliding_attention", "full_attention",
                                         "sliding_attention")
        assert (ours.rope_theta, ours.rope_local_theta, ours.qk_norm) == (1e6, 1e4, True)


@pytest.mark.parametrize("name, make_config, expected", [
    ("vicuna7b", transformers.LlamaConfig, 6_738_415_616),
    ("gemma2_2b", transformers.Gemma2Config, 2_614_341_888),
])
def test_parameter_counts_of_real_configs(name, make_config, expected):
    """transformers' defaults are LLaMA-2 7B (= Vicuna-7B v1.5) and Gemma-2-2B."""
    hf_cfg = make_config()
    with torch.device("meta"):
        torch_model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    torch_count = sum(p.numel() for p in torch_model.parameters())
    ours = layers.count_params(hf.abstract_decoder_params(
        hf_decoder.decoder_config_from_hf(hf_cfg.to_dict())))
    assert ours == torch_count == expected


@pytest.mark.parametrize("tiny", ["llama_mha"], indirect=True)
def test_llava_style_bin_checkpoint_imports_the_llm(tiny, tmp_path):
    """Reference LLaVA / TokenPacker checkpoints: ``llava_llama`` config, ``.bin`` shards with
    RoPE buffers and the projector / vision tower beside the LLM's keys."""
    _, _, torch_model, module, params, forward = tiny
    state = dict(torch_model.state_dict())
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    state["model.mm_projector.0.weight"] = torch.ones(32, 8)
    state["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(8)
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, names in shards.items():
        torch.save({k: state[k] for k in names}, tmp_path / name)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, names in shards.items() for k in names}}))
    config = torch_model.config.to_dict()
    config.update(model_type="llava_llama", mm_projector_type="tokenpacker",
                  mm_hidden_size=1024, mm_vision_tower="openai/clip-vit-large-patch14-336")
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded_module, loaded = hf.load_decoder(tmp_path)
    assert loaded_module.config == module.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)

    del state["model.layers.1.mlp.up_proj.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "pytorch_model.bin.index.json").unlink()
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.mlp.up_proj.weight'\]"):
        hf.load_decoder(tmp_path)


@pytest.mark.parametrize("tiny", ["llama_mha"], indirect=True)
def test_remat_gives_the_same_gradients(tiny):
    _, path, _, module, params, _ = tiny
    remat_module, _ = hf.load_decoder(path, remat_policy="full")
    ids, mask = padded_batch(seed=6)

    def loss(apply, p):
        logits = apply({"params": p}, ids, mask)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 7] * mask)

    grads = jax.jit(jax.grad(functools.partial(loss, module.apply)))(params)
    remat_grads = jax.jit(jax.grad(functools.partial(loss, remat_module.apply)))(params)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads))
    assert scale > 0
    # Recomputation may fuse differently: equal up to float32 rounding.
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, atol=1e-5 * scale,
                                             rtol=1e-4), remat_grads, grads)


def test_attention_mask_padding_causality_window_and_prefix():
    """Row 0: 1 left pad, then 5 tokens. Window 3; bidirectional prefix of 2 tokens."""
    q_slots = k_slots = jnp.arange(6)
    positions = jnp.asarray([[0, 0, 1, 2, 3, 4]])
    k_positions = jnp.asarray([[-1, 0, 1, 2, 3, 4]])
    causal = np.asarray(attention_mask(q_slots, positions, k_slots, k_positions))[0, 0]
    expected = np.tril(np.ones((6, 6), bool))
    expected[:, 0] = False  # the pad is never a key
    np.testing.assert_array_equal(causal, expected)

    window = np.asarray(attention_mask(q_slots, positions, k_slots, k_positions,
                                       sliding_window=3))[0, 0]
    expected_window = expected & (np.asarray(positions)[0][:, None]
                                  - np.asarray(k_positions)[0][None, :] < 3)
    np.testing.assert_array_equal(window, expected_window)
    assert window[5].tolist() == [False, False, False, True, True, True]

    prefix = np.asarray(attention_mask(q_slots, positions, k_slots, k_positions,
                                       prefix_length=jnp.asarray([2])))[0, 0]
    expected_prefix = expected.copy()
    expected_prefix[2, 2] = expected_prefix[1, 2] = True  # tokens 0 and 1 see each other
    expected_prefix[0, 1:3] = True  # (the pad query is irrelevant: its output is unused)
    np.testing.assert_array_equal(prefix[1:], expected_prefix[1:])
    assert prefix[3].tolist() == expected[3].tolist()  # after the prefix: causal


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_one_token_attention_over_the_per_layer_cache(softcap):
    """``attend_one_token`` on [B*K, S, H] caches against softmax attention in float64
    NumPy, grouped heads (N = 6 query heads over K = 2), some slots masked per row."""
    batch, heads, kv_heads, length, head_dim, scale = 2, 6, 2, 7, 4, 0.5
    rng = np.random.default_rng(0)
    query = rng.standard_normal((batch, 1, heads, head_dim))
    keys, values = rng.standard_normal((2, batch, length, kv_heads, head_dim))
    mask = rng.random((batch, 1, 1, length)) < 0.7
    mask[:, :, :, 0] = True
    rows = [np.swapaxes(c, 1, 2).reshape(batch * kv_heads, length, head_dim)
            for c in (keys, values)]
    out = attend_one_token(*(jnp.asarray(x, jnp.float32) for x in (query, *rows)),
                           jnp.asarray(mask), scale=scale, softcap=softcap)
    expected = np.zeros((batch, 1, heads, head_dim))
    for b in range(batch):
        for n in range(heads):
            kv = n // (heads // kv_heads)
            logits = keys[b, :, kv] @ query[b, 0, n] * scale
            if softcap is not None:
                logits = softcap * np.tanh(logits / softcap)
            logits = np.where(mask[b, 0, 0], logits, -np.inf)
            weights = np.exp(logits - logits.max())
            expected[b, 0, n] = weights / weights.sum() @ values[b, :, kv]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one query"):
        attend_one_token(jnp.zeros((batch, 2, heads, head_dim)), *rows, mask, scale=1.0)


@pytest.mark.parametrize("tiny", ["gemma2"], indirect=True)
def test_bidirectional_prefix_reaches_the_decoder(tiny):
    """A one-token prefix is plain causal attention; a longer one lets the first token see
    the rest of its prefix, and nothing past the prefix."""
    _, _, _, module, params, forward = tiny
    ids, mask = padded_batch(seed=8)
    variables = {"params": params}
    causal = np.asarray(forward(variables, ids, mask))
    one = np.asarray(forward(variables, ids, mask, prefix_length=jnp.ones(3, jnp.int32)))
    valid = mask.astype(bool)  # (pad queries' outputs are unused and may differ)
    np.testing.assert_array_equal(one[valid], causal[valid])
    prefix = jnp.asarray([4, 4, 4])
    bidirectional = np.asarray(forward(variables, ids, mask, prefix_length=prefix))
    assert np.abs(bidirectional[0, 0] - causal[0, 0]).max() > 1e-2  # saw tokens 1..3
    # Changing a token after the prefix changes nothing before it.
    changed = ids.copy()
    changed[0, 6] = (changed[0, 6] + 1) % VOCAB
    after = np.asarray(forward(variables, changed, mask, prefix_length=prefix))
    np.testing.assert_array_equal(after[0, :6], bidirectional[0, :6])
    assert np.abs(after[0, 6] - bidirectional[0, 6]).max() > 1e-2


def packed_row(lengths=(5, 9, 7), length=24, seed=9):
    """One row holding samples of ``lengths`` back to back (segments 1, 2, ...), then
    padding: (ids [1, T], segment ids [1, T], the samples' ids, their start slots)."""
    rng = np.random.RandomState(seed)
    samples = [rng.randint(4, VOCAB, size=n) for n in lengths]
    ids, segments = np.zeros((1, length), np.int64), np.zeros((1, length), np.int32)
    starts = np.cumsum((0, *lengths[:-1]))
    for segment, (start, sample) in enumerate(zip(starts, samples, strict=True), 1):
        ids[0, start:start + len(sample)] = sample
        segments[0, start:start + len(sample)] = segment
    return ids, segments, samples, starts


def test_packed_row_equals_each_sample_alone(tiny):
    """Three samples in one row (segment ids, positions restarting at 0) give each sample's
    logits as it gets alone: within 1e-5 (of the largest logit) of our decoder on the sample
    alone, within 1e-4 of transformers' (Gemma 2 / 3: a window of 4, shorter than the
    samples)."""
    family, _, torch_model, module, params, forward = tiny
    ids, segments, samples, starts = packed_row()
    variables = {"params": params}
    packed = np.asarray(forward(variables, ids, segment_ids=segments))
    positions = np.concatenate([np.arange(len(s)) for s in samples]
                               + [np.zeros(ids.shape[1] - sum(map(len, samples)), int)])
    explicit = np.asarray(forward(variables, ids, positions=positions[None],
                                  segment_ids=segments))
    valid = segments[0] > 0  # (padding slots' positions differ: 0 here, 0, 1, 2 by default)
    np.testing.assert_array_equal(explicit[0, valid], packed[0, valid])
    for sample, start in zip(samples, starts, strict=True):
        got = packed[0, start:start + len(sample)]
        alone = np.asarray(forward(variables, sample[None]))[0]
        # Rows of other lengths sum in another order: float32 rounding, relative to logits
        # of up to ~6 (these weights are large, see randomize).
        np.testing.assert_allclose(got, alone, atol=1e-5 * np.abs(alone).max(), rtol=0)
        expected = torch_logits(torch_model, sample[None], np.ones((1, len(sample)), int))[0]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tiny", ["gemma2"], indirect=True)
def test_splash_kernel_in_the_decoder_equals_xla(tiny):
    """The splash kernel (interpret mode here) in the scanned layers: Gemma 2's sliding and
    global layers alternate (a window of 4), logits soft-capped; same logits as XLA."""
    _, _, _, module, params, forward = tiny
    ids, segments, _, _ = packed_row(lengths=(40, 50, 30), length=128)
    splash_module = Decoder(dataclasses.replace(module.config, attention_impl="splash"))
    got = jax.jit(splash_module.apply)({"params": params}, ids, segment_ids=segments)
    expected = forward({"params": params}, ids, segment_ids=segments)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected),
                               atol=1e-5 * float(jnp.abs(expected).max()), rtol=0)


@pytest.mark.parametrize("tiny", ["llama3_gqa"], indirect=True)
def test_cudnn_kernel_lowers_for_nvidia_gpus(tiny, monkeypatch):
    """The cuDNN path (grouped heads, bfloat16, a packed row's segment mask plus the causal
    hint) is accepted by JAX's cuDNN lowering for CUDA, forward and gradients: lowered here
    without a GPU, its module holds cuDNN's fused attention, not an XLA fallback. This
    machine has no cuDNN for JAX's version check to ask, so the check is told cuDNN 9.1."""
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90100)
    _, _, _, module, params, _ = tiny
    config = dataclasses.replace(module.config, attention_impl="cudnn", dtype="bfloat16")
    ids, segments, _, _ = packed_row(lengths=(40, 50, 30), length=128)
    cudnn_module = Decoder(config)

    def loss(params):
        logits = cudnn_module.apply({"params": params}, ids, segment_ids=segments)
        return jnp.sum(logits * (segments[..., None] > 0))

    targets = ("__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward")
    lowered = export.export(
        jax.jit(jax.value_and_grad(loss)), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(t) for t in targets])(params)
    text = lowered.mlir_module()
    assert f"@{targets[0]}(" in text and f"@{targets[1]}(" in text
    assert '\\22mask_type\\22: \\22CAUSAL\\22' in text
