"""``python -m tokenpacker_jax.convert import|export`` against PyTorch: a tiny checkpoint in
the reference TokenPacker / LLaVA layout is built here (a random transformers LLaMA, a
TokenPacker written from docs/reference.md §3 in torch, a sentencepiece tokenizer, a random HF CLIP
tower), imported, exported in every format and checked against transformers and torch;
then the whole MLLM against a PyTorch assembly of the exported parts (CLIP hidden states ->
torch projector -> LLaMA with the visual tokens spliced at ``<image>``), logits and greedy
tokens."""

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import traverse_util
from PIL import Image
from safetensors.numpy import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from tokenpacker_jax import checkpoint, configuration, conversion, run_export
from tokenpacker_jax.assembly import load_trained
from tokenpacker_jax.bench.torch_tokenpacker import TorchTokenPacker
from tokenpacker_jax.convert import checkpoint_io, llava, reference
from tokenpacker_jax.data import hd
from tokenpacker_jax.data.conversation import VICUNA_SYSTEM
from tokenpacker_jax.data.example import example_builder
from tokenpacker_jax.data.prompt import build_prompt
from tokenpacker_jax.data.synthetic import train_tokenizer
from tokenpacker_jax.generate import Generator, SamplingConfig, answer
from tokenpacker_jax.models.decoder import Decoder
from tokenpacker_jax.models.projectors import build_projector
from tokenpacker_jax.models.vision import VisionTransformer

from data_helpers import corpus, reference_slice, tokenizer_image_token

VOCAB, WIDTH, LAYERS = 400, 64, 2  # LLM
TOWER_WIDTH, TOWER_LAYERS, IMAGE, PATCH = 32, 4, 32, 4  # CLIP: 8 x 8 patches
MULTI_LAYERS, SELECT_LAYER, SCALE, HEADS = (1, 2, 3, 4), -2, 2, 4  # 16 visual tokens
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
QUESTION = "What is the colour of the shape?"
EOS = 2

# The reference config fields (beside the LLaMA ones) of the checkpoint built here, as a
# released TokenPacker config writes them (mm_projector_type says mlp2x_gelu there too).
MULTIMODAL_FIELDS = dict(
    mm_vision_tower="openai/clip-vit-large-patch14-336", mm_vision_select_layer=SELECT_LAYER,
    mm_vision_select_feature="patch", mm_projector_type="mlp2x_gelu",
    mm_hidden_size=TOWER_WIDTH, image_aspect_ratio="pad", image_grid_pinpoints=None,
    scale_factor=SCALE, patch_num=16, use_mm_proj=True, mm_use_im_start_end=False,
    mm_use_im_patch_token=False, tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False,
    tokenizer_model_max_length=256)
LLAMA_FIELDS = dict(
    vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=LAYERS,
    num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-5,
    max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=EOS,
    pad_token_id=0)


def randomise(module, generator):
    """Every parameter random at a scale that keeps activations O(1): norms around 1,
    biases small, matrices 1/sqrt(fan_in)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if "norm" in name or name.split(".")[-2].startswith(("ln_", "layer_norm")):
                param.copy_((1.0 + 0.2 * noise) if name.endswith("weight") else 0.1 * noise)
            elif param.ndim == 1 or name.endswith(("class_embedding", "position_embedding.weight")):
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise / math.sqrt(math.prod(param.shape[1:])))


def write_bin_shards(state, directory, num_shards=2):
    """``pytorch_model-0000i-of-0000n.bin`` + index, as older transformers saved them."""
    keys = list(state)
    weight_map = {}
    for i in range(num_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        part = keys[i::num_shards]
        torch.save({k: state[k].contiguous() for k in part}, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The reference checkpoint directory, the CLIP directory and the torch originals."""
    root = tmp_path_factory.mktemp("convert_cli")
    ref_dir, clip_dir = root / "llava-tokenpacker-tiny", root / "clip"
    generator = torch.Generator().manual_seed(0)

    train_tokenizer(corpus() + [VICUNA_SYSTEM + " USER: ASSISTANT:"] * 50 + [QUESTION] * 20,
                    str(ref_dir), VOCAB)
    (ref_dir / "config.json").unlink()  # the checkpoint's own config.json follows

    llama = LlamaForCausalLM(LlamaConfig(**LLAMA_FIELDS)).eval()
    randomise(llama, generator)
    projector = TorchTokenPacker(TOWER_WIDTH, len(MULTI_LAYERS), TOWER_WIDTH, HEADS, WIDTH,
                                 SCALE).eval()
    randomise(projector, generator)
    state = dict(llama.state_dict())
    state.update({reference.PREFIX + k: v for k, v in projector.state_dict().items()})
    write_bin_shards(state, ref_dir)
    (ref_dir / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "torch_dtype": "float32", "transformers_version": "4.31.0", "rope_scaling": None,
        **LLAMA_FIELDS, **MULTIMODAL_FIELDS}, indent=2))

    clip = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=TOWER_WIDTH, intermediate_size=64, num_hidden_layers=TOWER_LAYERS,
        num_attention_heads=4, image_size=IMAGE, patch_size=PATCH,
        hidden_act="quick_gelu")).eval()
    randomise(clip, generator)
    clip.save_pretrained(clip_dir)
    expected = {k: v.numpy() for k, v in state.items()}
    return dict(ref_dir=ref_dir, clip_dir=clip_dir, root=root, state=expected)


@pytest.fixture(scope="module")
def imported(built):
    workdir = built["root"] / "imported"
    conversion.main(["import", f"--checkpoint={built['ref_dir']}", f"--vision={built['clip_dir']}",
                     f"--out={workdir}", f"--multi_layers={','.join(map(str, MULTI_LAYERS))}",
                     f"--projector_heads={HEADS}"])
    return workdir, load_trained(str(workdir))


@pytest.fixture(scope="module")
def exported(built, imported):
    """The imported workdir in each format (float32)."""
    workdir, _ = imported
    return {fmt: Path(run_export.export_checkpoint(workdir, built["root"] / f"export_{fmt}", fmt))
            for fmt in run_export.FORMATS}


def flat(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def safetensors_state(directory):
    reader = checkpoint_io.TensorReader(directory)
    return {key: reader[key] for key in reader}


def test_import_takes_the_reference_settings(built, imported):
    workdir, trained = imported
    config = trained.config
    assert config.data.template == "vicuna_v1"
    assert config.data.image.aspect_mode == "pad"
    assert (config.data.image.image_size, config.data.hd.patch_num) == (IMAGE, 16)
    assert config.model.features.select_layer == SELECT_LAYER
    assert tuple(config.model.features.multi_layers) == MULTI_LAYERS
    assert (config.model.projector.name, config.model.projector.scale_factor,
            config.model.projector.num_heads) == ("tokenpacker", SCALE, HEADS)
    assert config.data.max_length == 256 and trained.tokens_per_tile == 16
    # The tokenizer lives in the workdir; the HD separators are the reference's lookups.
    assert config.model.tokenizer == str(workdir / "tokenizer")
    hf_tokenizer = trained.tokenizer.hf
    assert config.data.hd.comma_id == hf_tokenizer.convert_tokens_to_ids(",")
    assert config.data.hd.newline_id == hf_tokenizer.unk_token_id == 0
    assert trained.tokenizer.stop_ids[0] == EOS
    configuration.validate(config)
    # No data iterator and an empty optimizer state: a starting point for init_from.
    step_dir = workdir / "checkpoints" / "0"
    assert sorted(p.name for p in step_dir.iterdir() if p.is_dir()) == ["config", "state"]
    assert config.convert.imported_from == str(built["ref_dir"])


def test_hd_import_uses_the_reference_global_view(built, tmp_path):
    """A reference-layout TokenPacker-HD checkpoint (``image_aspect_ratio: slice``) imports
    with the reference's global view, so generation and evaluation build the reference's
    tiles; a workdir whose config was saved before the view had a name loads with the view
    its weights were trained with."""
    source = tmp_path / "llava-tokenpacker-hd-tiny"
    shutil.copytree(built["ref_dir"], source)
    ref_config = json.loads((source / "config.json").read_text())
    ref_config.update(image_aspect_ratio="slice", patch_num=9)
    (source / "config.json").write_text(json.dumps(ref_config))
    workdir = tmp_path / "imported_hd"
    conversion.main(["import", f"--checkpoint={source}", f"--vision={built['clip_dir']}",
                     f"--out={workdir}", f"--multi_layers={','.join(map(str, MULTI_LAYERS))}",
                     f"--projector_heads={HEADS}"])
    trained = load_trained(str(workdir))
    config = trained.config
    assert (config.data.image.aspect_mode, config.data.hd.patch_num) == ("slice", 9)
    assert config.data.hd.global_view == "reference_canvas"

    # What generation and evaluation build from the imported config: the reference's pixels
    # (a 44 x 70 image: 2 x 3 tiles of 32 px, the canvas margin at the bottom).
    builder = example_builder(config.data, trained.tokenizer, trained.tokens_per_tile)
    pixels = np.random.default_rng(5).integers(0, 256, (44, 70, 3), dtype=np.uint8)
    grid = hd.select_hd_grid(44, 70, 9, IMAGE)
    assert grid[0] * grid[1] > 1
    expected, _ = reference_slice(pixels, grid, "reference_canvas", tile=IMAGE,
                                  mean=config.data.image.mean, std=config.data.image.std)
    prompt = build_prompt(builder, QUESTION, Image.fromarray(pixels))
    assert prompt.tile_mask.sum() == len(expected)
    np.testing.assert_allclose(prompt.pixel_values[:len(expected)], expected, atol=1e-5,
                               rtol=0)

    # The same workdir as an earlier import wrote it: the boolean field, left False (and no
    # checksums, which came later).
    saved_file = workdir / "checkpoints" / "0" / "config" / "metadata"
    saved = json.loads(saved_file.read_text())
    del saved["data"]["hd"]["global_view"]
    saved["data"]["hd"]["reference_global_view"] = False
    saved_file.write_text(json.dumps(saved))
    (workdir / "checkpoints" / "0" / "checksums.json").unlink()
    assert load_trained(str(workdir)).config.data.hd.global_view == "reference_canvas"


def test_global_view_field_of_a_reference_config():
    """Absent (the reference's own configs): its view; written by our export: read back."""
    base = {"mm_vision_select_layer": -2, "image_aspect_ratio": "slice", "patch_num": 9}
    assert llava.settings_from_reference(base, projector="tokenpacker",
                                         embed_dim=128).global_view == "reference_canvas"
    fit = {**base, llava.GLOBAL_VIEW_FIELD: "fit_image"}
    settings = llava.settings_from_reference(fit, projector="tokenpacker", embed_dim=128)
    assert settings.global_view == "fit_image"
    with pytest.raises(ValueError, match="mm_hd_global_view 'canvas' is not one of"):
        llava.settings_from_reference({**base, llava.GLOBAL_VIEW_FIELD: "canvas"},
                                      projector="tokenpacker", embed_dim=128)


def test_reference_export_is_the_input_and_round_trips_bit_exactly(built, imported,
                                                                   exported):
    _, trained = imported
    out = exported["reference"]
    # Same keys and the very same tensors as the checkpoint that was imported (.bin shards
    # in, safetensors out).
    state = safetensors_state(out)
    assert set(state) == set(built["state"])
    for key, value in built["state"].items():
        assert state[key].dtype == value.dtype, key
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    source = json.loads((built["ref_dir"] / "config.json").read_text())
    written = json.loads((out / "config.json").read_text())
    for field in (*LLAMA_FIELDS, *MULTIMODAL_FIELDS):
        if field not in ("mm_vision_tower", "mm_projector_type"):
            assert written[field] == source[field], field
    assert written[llava.GLOBAL_VIEW_FIELD] == "reference_canvas"
    assert written["model_type"] == "llava_llama"
    assert written["mm_projector_type"] == "tokenpacker"
    assert written["mm_vision_tower"] == f"{out}/vision_tower"

    # ... and imports again (the tower from mm_vision_tower, the extra fields read back)
    # into the same parameters, bit for bit, and the same config.
    again_dir = built["root"] / "reimported"
    conversion.main(["import", f"--checkpoint={out}", f"--out={again_dir}"])
    again = load_trained(str(again_dir))
    first, second = flat(trained.params), flat(again.params)
    assert set(first) == set(second)
    for path, value in first.items():
        assert second[path].dtype == value.dtype, path
        np.testing.assert_array_equal(second[path], value, err_msg=str(path))
    one, two = trained.config.to_dict(), again.config.to_dict()
    for config in (one, two):
        del config["convert"], config["model"]["tokenizer"]
    assert one == two
    assert (again_dir / "tokenizer" / "tokenizer.model").read_bytes() == \
        (built["ref_dir"] / "tokenizer.model").read_bytes()


def test_reference_export_loads_as_llama_plus_the_spec_projector(exported):
    """What the reference's LlavaLlamaForCausalLM is: a LLaMA whose state dict also holds
    model.mm_projector.* (and the tower named by mm_vision_tower)."""
    out = exported["reference"]
    config = json.loads((out / "config.json").read_text())
    state = {k: torch.from_numpy(v) for k, v in safetensors_state(out).items()}
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items()
                                            if k != "model_type"}))
    result = llama.load_state_dict(state, strict=False)
    assert not result.missing_keys
    assert all(k.startswith(reference.PREFIX) for k in result.unexpected_keys)
    projector = TorchTokenPacker(config["mm_hidden_size"], len(config["mm_vision_multi_layers"]),
                                 config["mm_hidden_size"], config["mm_projector_num_heads"],
                                 config["hidden_size"], config["scale_factor"])
    projector.load_state_dict({k.removeprefix(reference.PREFIX): state[k]
                               for k in result.unexpected_keys}, strict=True)
    CLIPVisionModel.from_pretrained(config["mm_vision_tower"])


def test_exported_llm_and_projector_match_transformers_and_torch(imported, exported):
    _, trained = imported
    out = exported["hf"]
    params, model_config = trained.params, trained.model.config

    llm = AutoModelForCausalLM.from_pretrained(out).double().eval()
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
    with torch.no_grad():
        expected = llm(torch.from_numpy(ids)).logits.numpy()
    ours = jax.jit(Decoder(model_config.decoder).apply)({"params": params["decoder"]},
                                                        jnp.asarray(ids, jnp.int32))
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)

    state = torch.load(out / "mm_projector.bin", weights_only=True)
    projector = TorchTokenPacker(TOWER_WIDTH, len(MULTI_LAYERS), TOWER_WIDTH, HEADS, WIDTH,
                                 SCALE).double().eval()
    projector.load_state_dict({k.removeprefix(reference.PREFIX): v.double()
                               for k, v in state.items()}, strict=True)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 64, TOWER_WIDTH)).astype(np.float32)
    x_multi = rng.normal(size=(2, 64, TOWER_WIDTH * len(MULTI_LAYERS))).astype(np.float32)
    with torch.no_grad():
        expected, _ = projector(torch.from_numpy(x).double(), torch.from_numpy(x_multi).double())
    ours = jax.jit(build_projector(model_config.projector).apply)(
        {"params": params["projector"]}, x, x_multi)
    assert np.abs(expected.numpy()).max() > 0.5
    np.testing.assert_allclose(np.asarray(ours), expected.numpy(), atol=1e-5, rtol=0)


def test_exported_tower_matches_transformers(imported, exported):
    _, trained = imported
    out = exported["vision"]
    tower = CLIPVisionModel.from_pretrained(out).double().eval()
    pixels = np.random.default_rng(2).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
    with torch.no_grad():
        expected = tower(torch.from_numpy(pixels).permute(0, 3, 1, 2).double(),
                         output_hidden_states=True).hidden_states
    ours = jax.jit(VisionTransformer(trained.model.config.vision).apply)(
        {"params": trained.params["vision_tower"]}, pixels)
    assert len(ours) == len(expected) == TOWER_LAYERS + 1
    for level, (a, b) in enumerate(zip(ours, expected, strict=True)):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-5, rtol=0,
                                   err_msg=f"hidden state {level}")
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["crop_size"] == {"height": IMAGE, "width": IMAGE}
    np.testing.assert_allclose(preprocessor["image_mean"], CLIP_MEAN)


class TorchAssembly:
    """transformers CLIP -> torch projector (docs/reference.md §3) -> transformers LLaMA,
    float64."""

    def __init__(self, exported):
        self.tower = CLIPVisionModel.from_pretrained(exported["vision"]).double().eval()
        self.llm = AutoModelForCausalLM.from_pretrained(exported["hf"]).double().eval()
        self.tokenizer = AutoTokenizer.from_pretrained(exported["reference"])
        self.projector = TorchTokenPacker(TOWER_WIDTH, len(MULTI_LAYERS), TOWER_WIDTH, HEADS,
                                          WIDTH, SCALE).double().eval()
        state = torch.load(exported["hf"] / "mm_projector.bin", weights_only=True)
        self.projector.load_state_dict({k.removeprefix(reference.PREFIX): v.double()
                                        for k, v in state.items()}, strict=True)

    @staticmethod
    def pixels(image):
        """docs/reference.md §2 ``pad``: a square canvas of the mean colour, image centred
        (already the tower's size here, so no resize), then CLIP normalisation."""
        side = max(image.size)
        canvas = Image.new("RGB", (side, side), tuple(int(255 * m) for m in CLIP_MEAN))
        canvas.paste(image, ((side - image.size[0]) // 2, (side - image.size[1]) // 2))
        values = (np.asarray(canvas, np.float64) / 255.0 - CLIP_MEAN) / CLIP_STD
        return torch.from_numpy(values).permute(2, 0, 1)[None]

    @torch.no_grad()
    def visual_tokens(self, image):
        hidden = self.tower(self.pixels(image), output_hidden_states=True).hidden_states
        x = hidden[SELECT_LAYER][:, 1:]
        x_multi = torch.cat([hidden[i][:, 1:] for i in MULTI_LAYERS], dim=-1)
        return self.projector(x, x_multi)[0][0]

    def prompt_ids(self, question):
        prompt = f"{VICUNA_SYSTEM} USER: <image>\n{question} ASSISTANT:"
        return tokenizer_image_token(prompt, self.tokenizer)

    @torch.no_grad()
    def logits(self, ids, visual):
        slot = ids.index(-200)
        embed = self.llm.get_input_embeddings()
        before, after = (embed(torch.tensor(part)) for part in (ids[:slot], ids[slot + 1:]))
        inputs = torch.cat([before, visual, after])[None]
        return self.llm(inputs_embeds=inputs).logits[0].numpy()

    def greedy(self, ids, visual, steps):
        tokens = []
        for _ in range(steps):
            token = int(np.argmax(self.logits(ids + tokens, visual)[-1]))
            if token == EOS:
                break
            tokens.append(token)
        return tokens


def test_whole_model_logits_and_greedy_tokens_equal_the_pytorch_assembly(imported, exported):
    _, trained = imported
    assembly = TorchAssembly(exported)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, IMAGE, 3),
                                                             dtype=np.uint8))
    reference_ids = assembly.prompt_ids(QUESTION)
    visual = assembly.visual_tokens(image)
    expected = assembly.logits(reference_ids, visual)

    builder = example_builder(trained.config.data, trained.tokenizer, trained.tokens_per_tile)
    prompt = build_prompt(builder, QUESTION, image)
    slot = reference_ids.index(-200)
    assert prompt.image_mask.sum() == visual.shape[0] == 16
    text_ids = reference_ids[:slot] + reference_ids[slot + 1:]
    assert prompt.ids[~prompt.image_mask].tolist() == text_ids
    assert np.flatnonzero(prompt.image_mask)[0] == slot
    ours = jax.jit(trained.model.apply)(
        {"params": trained.params}, prompt.ids[None], prompt.image_mask[None],
        prompt.pixel_values[None], np.ones((1, len(prompt.ids)), np.int32))[0]
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)

    steps = 8
    generator = Generator(trained.model, trained.params, trained.tokenizer.stop_ids,
                          trained.tokenizer.pad_id, SamplingConfig(max_new_tokens=steps))
    result = answer(generator, builder, trained.tokenizer, [(QUESTION, image)])[0]
    torch_tokens = assembly.greedy(reference_ids, visual, steps)
    assert len(torch_tokens) >= 4
    assert result["token_ids"] == torch_tokens


def test_llava_mlp_checkpoint_with_tower_keys(built, tmp_path):
    """A LLaVA-1.5 style checkpoint: mlp2x_gelu projector, one safetensors file that also
    holds the tower (ignored: the tower comes from --vision), no image_aspect_ratio."""
    source = tmp_path / "llava-v1.5-tiny"
    source.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (source / name).write_bytes((built["ref_dir"] / name).read_bytes())
    rng = np.random.default_rng(4)
    mlp = {"0.weight": (WIDTH, TOWER_WIDTH), "0.bias": (WIDTH,), "2.weight": (WIDTH, WIDTH),
           "2.bias": (WIDTH,)}
    state = {k: v for k, v in built["state"].items() if not k.startswith(reference.PREFIX)}
    state.update({reference.PREFIX + k: rng.normal(size=shape).astype(np.float32)
                  for k, shape in mlp.items()})
    tower = {"model.vision_tower.vision_tower.vision_model." + k: v.numpy()
             for k, v in CLIPVisionModel.from_pretrained(built["clip_dir"]).state_dict().items()}
    save_file({**state, **tower}, source / "model.safetensors")
    config = json.loads((built["ref_dir"] / "config.json").read_text())
    del config["image_aspect_ratio"], config["scale_factor"], config["patch_num"]
    (source / "config.json").write_text(json.dumps(config))

    workdir = tmp_path / "imported"
    conversion.main(["import", f"--checkpoint={source}", f"--vision={built['clip_dir']}",
                     f"--out={workdir}", "--multi_layers=1,2,3,4"])
    config = checkpoint.restore_config(checkpoint.run_directory(workdir))
    assert (config["model"]["projector"]["name"], config["model"]["projector"]["scale_factor"],
            config["data"]["image"]["aspect_mode"]) == ("mlp2x_gelu", 1, "square")
    out = Path(run_export.export_checkpoint(workdir, tmp_path / "exported", "reference",
                                            mm_vision_tower="openai/clip-vit-large-patch14-336"))
    assert not (out / "vision_tower").exists()
    exported = safetensors_state(out)
    assert set(exported) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    written = json.loads((out / "config.json").read_text())
    assert (written["mm_projector_type"], written["image_aspect_ratio"],
            written["mm_vision_tower"]) == ("mlp2x_gelu", "square",
                                            "openai/clip-vit-large-patch14-336")


def test_bfloat16_export(built, imported):
    workdir, trained = imported
    out = conversion.main(["export", f"--checkpoint={workdir}",
                           f"--out={built['root'] / 'bf16'}", "--format=hf", "--dtype=bfloat16",
                           "--projector_file=mm_projector.safetensors"])
    state = load_file(Path(out) / "model.safetensors")
    assert {v.dtype for v in state.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert json.loads((Path(out) / "config.json").read_text())["dtype"] == "bfloat16"
    np.testing.assert_array_equal(
        state["model.embed_tokens.weight"],
        np.asarray(trained.params["decoder"]["embedder"]["embedding"]).astype(ml_dtypes.bfloat16))
    projector = load_file(Path(out) / "mm_projector.safetensors")
    assert {v.dtype for v in projector.values()} == {np.dtype(ml_dtypes.bfloat16)}


def test_clear_errors(built, imported, tmp_path):
    workdir, _ = imported
    with pytest.raises(ValueError, match="not a local directory; download the tower"):
        conversion.main(["import", f"--checkpoint={built['ref_dir']}", f"--out={tmp_path / 'a'}"])
    # Without --multi_layers the reference's hard-coded levels do not exist in a 4-layer tower.
    with pytest.raises(configuration.ConfigError, match="model.features.multi_layers"):
        conversion.main(["import", f"--checkpoint={built['ref_dir']}",
                         f"--vision={built['clip_dir']}", f"--out={tmp_path / 'b'}",
                         f"--projector_heads={HEADS}"])
    assert not (tmp_path / "b").exists()  # nothing written before everything was checked
    with pytest.raises(FileExistsError, match="new or empty"):
        conversion.main(["import", f"--checkpoint={built['ref_dir']}",
                         f"--vision={built['clip_dir']}", f"--out={workdir}"])
    with pytest.raises(SystemExit):
        conversion.main(["export", f"--checkpoint={workdir}", f"--out={tmp_path / 'c'}",
                         "--format=onnx"])
    assert checkpoint.restore_config(checkpoint.run_directory(workdir))["data"]["template"] \
        == "vicuna_v1"
