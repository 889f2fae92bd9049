"""CLIP / SigLIP towers: parity with transformers' PyTorch models, import errors, sharding."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from tokenpacker_jax import sharding
from tokenpacker_jax.convert import hf
from tokenpacker_jax.models import layers
from tokenpacker_jax.models.vision import VisionConfig, VisionTransformer, select_features

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)


def _save(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random HF towers saved in the layouts users bring."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("towers")
    clip_cfg = transformers.CLIPVisionConfig(**TINY, image_size=30, patch_size=6)
    siglip_cfg = transformers.SiglipVisionConfig(**TINY, image_size=28, patch_size=7)
    # Non-default sizes where the conv drops a remainder (32 = 5 * 6 + 2).
    odd_clip_cfg = transformers.CLIPVisionConfig(**TINY, image_size=32, patch_size=6,
                                                 hidden_act="gelu", layer_norm_eps=1e-6)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, vocab_size=99, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    out = {
        "clip": _save(transformers.CLIPVisionModel(clip_cfg), root / "clip"),
        "siglip": _save(transformers.SiglipVisionModel(siglip_cfg), root / "siglip"),
        "clip_odd_sharded": _save(transformers.CLIPVisionModel(odd_clip_cfg),
                                  root / "clip_odd", max_shard_size="20KB"),
        "clip_full": _save(transformers.CLIPModel(transformers.CLIPConfig(
            vision_config=clip_cfg.to_dict(), text_config=text)), root / "clip_full"),
        "siglip_full": _save(transformers.SiglipModel(transformers.SiglipConfig(
            vision_config=siglip_cfg.to_dict(), text_config=text)), root / "siglip_full"),
    }
    # A PyTorch .bin in the transformers 4.x layout (vision_model. prefix).
    bin_dir = root / "clip_bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((out["clip"] / "config.json").read_text())
    model = transformers.CLIPVisionModel.from_pretrained(out["clip"])
    torch.save({f"vision_model.{k}": v for k, v in model.state_dict().items()},
               bin_dir / "pytorch_model.bin")
    out["clip_bin"] = bin_dir
    return out


def _torch_hidden_states(path, pixels_nhwc):
    config = transformers.AutoConfig.from_pretrained(path)
    if config.model_type in ("clip", "siglip"):
        model = transformers.AutoModel.from_pretrained(path).vision_model
    else:
        model = transformers.AutoModel.from_pretrained(path)
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2)),
                    output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("name", ["clip", "siglip", "clip_odd_sharded", "clip_full",
                                  "siglip_full", "clip_bin"])
def test_hidden_states_match_transformers(checkpoints, name):
    module, params = hf.load_vision_tower(checkpoints[name])
    size = module.config.image_size
    pixels = np.random.default_rng(1).normal(size=(2, size, size, 3)).astype(np.float32)
    ours = module.apply({"params": params}, pixels)
    reference = _torch_hidden_states(checkpoints[name], pixels)
    assert len(ours) == len(reference) == module.config.num_layers + 1
    for index, (a, b) in enumerate(zip(ours, reference, strict=True)):
        assert a.shape == b.shape, index
        scale = np.abs(b).max()
        np.testing.assert_allclose(np.asarray(a) / scale, b / scale, atol=1e-5,
                                   err_msg=f"hidden state {index}")


def test_families_are_read_from_config(checkpoints):
    assert hf.load_vision_tower(checkpoints["clip_full"])[0].config.family == "clip"
    siglip = hf.load_vision_tower(checkpoints["siglip_full"])[0].config
    assert siglip.family == "siglip" and siglip.hidden_act == "gelu_pytorch_tanh"
    assert hf.load_vision_tower(checkpoints["clip_odd_sharded"])[0].config.grid_size == 5


def test_missing_and_unexpected_keys_are_named(checkpoints, tmp_path):
    state = load_file(checkpoints["clip"] / "model.safetensors")
    del state["encoder.layers.1.mlp.fc2.bias"]
    state["encoder.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((checkpoints["clip"] / "config.json").read_text())
    with pytest.raises(ValueError) as err:
        hf.load_vision_tower(tmp_path)
    assert "encoder.layers.1.mlp.fc2.bias" in str(err.value)
    assert "encoder.layers.0.mlp.extra.weight" in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_not_a_vision_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="llama"):
        hf.load_vision_tower(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_vision_tower(tmp_path / "nowhere")


def test_save_load_round_trip_is_exact(checkpoints, tmp_path):
    module, params = hf.load_vision_tower(checkpoints["siglip"])
    hf.save_vision_tower(module, params, tmp_path)
    _, again = hf.load_vision_tower(tmp_path)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, again)
    reloaded = transformers.SiglipVisionModel.from_pretrained(tmp_path)
    original = transformers.SiglipVisionModel.from_pretrained(checkpoints["siglip"])
    reloaded_state = reloaded.state_dict()
    compared = 0
    for key, value in original.state_dict().items():
        if "head." not in key:
            torch.testing.assert_close(reloaded_state[key], value, rtol=0, atol=0)
            compared += 1
    assert compared == 3 * 16 + 5  # per layer: 4 projections, 2 MLP, 2 norms (w + b)


def test_clip_l14_336_parameter_count_without_allocating():
    hf_config = transformers.CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    with torch.device("meta"):
        reference = sum(p.numel() for p in transformers.CLIPVisionModel(hf_config).parameters())
    config = VisionConfig()  # defaults are CLIP ViT-L/14-336
    abstract = hf.abstract_vision_params(config)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct)
               for leaf in jax.tree.leaves(layers.count_params.__globals__["nn"].meta.unbox(
                   abstract)))
    assert layers.count_params(abstract) == reference == 303_507_456


def test_remat_policy_does_not_change_values_or_gradients():
    config = VisionConfig(image_size=16, patch_size=4, width=32, mlp_dim=64, num_layers=2,
                          num_heads=4)
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(1, 16, 16, 3)), jnp.float32)
    params = VisionTransformer(config).init(jax.random.key(0), pixels)["params"]

    def value_and_grad(policy):
        module = VisionTransformer(dataclasses.replace(config, remat_policy=policy))

        def loss(p):
            return jnp.sum(module.apply({"params": p}, pixels)[-1] ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    plain_value, plain_grads = value_and_grad("none")
    remat_value, remat_grads = value_and_grad("full")
    np.testing.assert_allclose(remat_value, plain_value, rtol=1e-6)
    # Recomputation changes float32 summation order: compare at the gradients' scale.
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(plain_grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale),
                 remat_grads, plain_grads)


def test_sharded_tower_matches_single_device(mesh8):
    config = VisionConfig(image_size=16, patch_size=4, width=32, mlp_dim=64, num_layers=2,
                          num_heads=4)
    module = VisionTransformer(config)
    pixels = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
    params = nn_unbox(module.init(jax.random.key(0), pixels)["params"])
    expected = jax.jit(module.apply)({"params": params}, pixels)

    with sharding.use_mesh(mesh8):
        shardings = sharding.logical_shardings(hf.abstract_vision_params(config), mesh8)
        params_sharded = jax.device_put(params, shardings)
        pixels_sharded = jax.device_put(pixels, sharding.batch_sharding(mesh8, 4))
        outputs = jax.jit(module.apply)({"params": params_sharded}, pixels_sharded)

    fc1 = params_sharded["encoder"]["layers"]["fc1"]["kernel"]  # [layers, embed, mlp]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert fc1.addressable_shards[0].data.shape == (2, 16, 32)
    q = params_sharded["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert outputs[-1].sharding.spec[0] == ("data", "fsdp")
    for a, b in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def nn_unbox(tree):
    return nn.meta.unbox(tree)


def test_select_features_shapes_and_order():
    states = [jnp.full((2, 5, 3), float(i)) for i in range(25)]
    x, x_multi = select_features(states, has_class_token=True)
    assert x.shape == (2, 4, 3) and float(x[0, 0, 0]) == 23.0
    assert x_multi.shape == (2, 4, 12)
    assert [float(v) for v in x_multi[0, 0, ::3]] == [12.0, 16.0, 22.0, 23.0]
    x, _ = select_features(states, has_class_token=False, select_layer=-1, multi_layers=(0,))
    assert x.shape == (2, 5, 3) and float(x[0, 0, 0]) == 24.0
    with pytest.raises(ValueError, match="out of range"):
        select_features(states, has_class_token=True, multi_layers=(25,))
