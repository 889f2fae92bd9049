"""Checkpoints to and from PyTorch: ``python -m tokenpacker_jax.convert import|export``,
and LoRA adapters folded into their base: ``merge-lora``.

    python -m tokenpacker_jax.convert import --checkpoint=REF_DIR --vision=CLIP_DIR \\
        --out=WORKDIR [--tokenizer=DIR]
    python -m tokenpacker_jax.convert export --checkpoint=WORKDIR --out=DIR \\
        --format=reference|hf|vision [--dtype=float32|bfloat16]
    python -m tokenpacker_jax.convert merge-lora --checkpoint=WORKDIR --out=WORKDIR2

``import`` reads a checkpoint in the reference TokenPacker / LLaVA layout (see
``convert/llava.py``) plus a local HF CLIP / SigLIP directory (``--vision``; default: the
checkpoint's ``mm_vision_tower`` when that is a local directory) and writes a run workdir,
``WORKDIR/checkpoints/0/{state,config}``, that ``generate``, ``evaluate`` and ``train`` (as
``train.init_from``) use directly. The tokenizer files are copied to ``WORKDIR/tokenizer``.
The run config says what the reference config says: ``vicuna_v1``, the aspect mode from
``image_aspect_ratio``, HD ``patch_num`` and the reference's HD global view
(``reference_canvas``, see ``tokenpacker_jax.data.hd``), the feature layers, the projector's
scale factor;
the HD separator ids are the reference's own lookups (``convert_tokens_to_ids(',')`` and
``('\\n')``). Each tensor goes straight to its shards on a mesh over all devices.

The saved state has step 0 and an empty optimizer state: an imported workdir is a starting
point (``--config.train.init_from=WORKDIR`` restores its parameters and builds the optimizer
of the new run), not a run to resume.

``export`` writes one of

- ``reference``: the reference layout (config.json with the same fields, LLM + projector
  keys in safetensors, tokenizer files), so the reference PyTorch code loads it; the tower
  goes to ``DIR/vision_tower`` and ``mm_vision_tower`` names that directory (absolute), or,
  with ``--mm_vision_tower=NAME``, that name and no tower;
- ``hf``: a transformers ``*ForCausalLM`` directory (LLaMA or Gemma layout) with the tokenizer,
  plus the projector in the reference layout (``--projector_file``, default
  ``mm_projector.bin``; a ``.safetensors`` name writes safetensors);
- ``vision``: the tower as a vision-only HF CLIP / SigLIP directory with a
  ``preprocessor_config.json`` describing our preprocessing.

A run with LoRA adapters (``model.lora``) exports its LLM in the ``hf`` format as the
frozen base (dequantised if it was stored quantised) plus ``DIR/adapter`` in PEFT's format
(``peft.PeftModel.from_pretrained(model, DIR/adapter)``); every other part, and every
part in the other formats, with its adapters folded in. ``merge-lora`` folds all adapters
into their bases and writes a run workdir (step 0, no optimizer state, the tokenizer in
``WORKDIR2/tokenizer``) of the same model without adapters.

Tensors are fetched from the devices and written one at a time (safetensors shards of at
most ``--max_shard_gb``); ``--dtype`` casts them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from tokenpacker_jax import assembly, checkpoint, configuration, sharding, user_error
from tokenpacker_jax.convert import (
    adapters,
    checkpoint_io,
    hf,
    hf_decoder,
    hf_vision,
    llava,
    reference,
)
from tokenpacker_jax.data import image
from tokenpacker_jax.models import mllm
from tokenpacker_jax.models.decoder import Decoder
from tokenpacker_jax.models.decoder_config import DecoderConfig
from tokenpacker_jax.models.vision import VisionTransformer
from tokenpacker_jax.tokenizer import load_tokenizer
from tokenpacker_jax.user_error import CheckpointError, InputError

FORMATS = ("reference", "hf", "vision")
ADAPTER_DIR = "adapter"  # where an hf export of a LoRA run puts the PEFT adapter
# What a tokenizer directory may hold (config.json is written separately: it is the model's).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json")
_DEFAULT_NORMALISATION = {"clip": (image.CLIP_MEAN, image.CLIP_STD),
                          "siglip": (image.SIGLIP_MEAN, image.SIGLIP_STD)}


# -- small pieces ----------------------------------------------------------------------------

def copy_tokenizer(source: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Copies the tokenizer files of ``source`` into ``out``; returns their names."""
    source, out = Path(source), Path(out)
    names = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not ({"tokenizer.model", "tokenizer.json"} & set(names)):
        raise FileNotFoundError(f"{source}: no tokenizer.model or tokenizer.json")
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(source / name, out / name)
    return names


def write_tokenizer(source: str | os.PathLike, out: str | os.PathLike,
                    decoder: DecoderConfig) -> None:
    """The tokenizer files of ``source`` in ``out``, with a config.json whose model type and
    EOS ids (the decoder's) give ``load_tokenizer`` the family and the stop ids."""
    copy_tokenizer(source, out)
    hf_config = hf_decoder.decoder_config_to_hf(decoder)
    (Path(out) / "config.json").write_text(json.dumps(
        {"model_type": hf_config["model_type"], "eos_token_id": hf_config["eos_token_id"]},
        indent=2))


def image_normalisation(vision_dir: Path, family: str) -> tuple[tuple[float, ...], ...]:
    """(mean, std) from the tower's ``preprocessor_config.json``, else the family's."""
    file = vision_dir / "preprocessor_config.json"
    if file.is_file():
        values = json.loads(file.read_text())
        if "image_mean" in values and "image_std" in values:
            return tuple(values["image_mean"]), tuple(values["image_std"])
    return _DEFAULT_NORMALISATION[family]


def preprocessor_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A ``CLIPImageProcessor`` config for our ``square`` preprocessing (shortest side to
    the tile size, bicubic, centre crop, CLIP-style normalisation)."""
    size = int(config.data.image.image_size)
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
            "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": size, "width": size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(config.data.image.mean),
            "image_std": list(config.data.image.std), "do_convert_rgb": True}


def _require_empty(path: Path, what: str) -> None:
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path}: {what} must be a new or empty directory")


def _check_like(abstract: Any, params: Any, group: str) -> None:
    """The loaded tree has the model's structure and shapes."""
    want = jax.tree.map(lambda x: tuple(x.shape), abstract)
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    if want != got:
        raise CheckpointError(f"{group}: the checkpoint's parameters do not fit the model "
                              f"(expected {want}, got {got})")


@contextlib.contextmanager
def _naming(directory: Path) -> Iterator[None]:
    """A CheckpointError raised while reading ``directory`` says which directory."""
    try:
        yield
    except CheckpointError as err:
        if str(directory) in str(err):
            raise
        raise CheckpointError(f"{directory}: {err}") from err


def _all_devices_mesh() -> jax.sharding.Mesh:
    return sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})


# -- import ----------------------------------------------------------------------------------

def import_checkpoint(checkpoint_dir: str | os.PathLike, out: str | os.PathLike, *,
                      vision: str | os.PathLike | None = None,
                      tokenizer: str | os.PathLike | None = None,
                      multi_layers: Sequence[int] | None = None,
                      num_heads: int | None = None, patch_num: int | None = None,
                      dtype: str = "float32", param_dtype: str = "float32") -> str:
    """A reference-layout checkpoint (+ HF tower) -> a run workdir; returns its path.

    Args:
      checkpoint_dir: config.json, weights (safetensors or .bin shards), tokenizer files.
      out: the workdir to create (must be new or empty).
      vision: HF CLIP / SigLIP directory; default: ``mm_vision_tower`` if a local directory.
      tokenizer: directory of tokenizer files; default: ``checkpoint_dir``.
      multi_layers, num_heads, patch_num: what the reference config does not say (see
        ``convert/llava.py``).
      dtype, param_dtype: compute and parameter dtypes of the run config.
    """
    source, out = Path(checkpoint_dir), Path(out).absolute()
    _require_empty(out, "--out")
    ref_config = checkpoint_io.read_config(source)
    vision_dir = Path(vision) if vision else None
    if vision_dir is None:
        named = ref_config.get("mm_vision_tower")
        if not named or not Path(named).is_dir():
            raise InputError(f"{source}/config.json: mm_vision_tower {named!r} is not a local "
                             "directory; download the tower and pass --vision=DIR")
        vision_dir = Path(named)

    with _naming(source):
        reader = checkpoint_io.TensorReader(source)
        projector_state = llava.projector_state(reader)
        projector_name = reference.detect_projector(reference.strip_prefix(projector_state))
        decoder_config = hf_decoder.decoder_config_from_hf(ref_config, dtype=dtype,
                                                           param_dtype=param_dtype)
    with _naming(vision_dir):
        vision_config = hf_vision.vision_config_from_hf(
            checkpoint_io.read_config(vision_dir), dtype=dtype, param_dtype=param_dtype)
    q_proj = projector_state.get(reference.PREFIX + "q_proj_1.weight")
    embed_dim = int(q_proj.shape[0]) if q_proj is not None else vision_config.width
    settings = llava.settings_from_reference(
        ref_config, projector=projector_name, embed_dim=embed_dim,
        multi_layers=tuple(multi_layers) if multi_layers else None, num_heads=num_heads,
        patch_num=patch_num)

    # Nothing is written before everything has been read and checked.
    tokenizer_source = Path(tokenizer) if tokenizer else source
    tokenizer_dir = out / "tokenizer"
    mean, std = image_normalisation(vision_dir, vision_config.family)
    config = llava.run_config(settings, vision_config, decoder_config, embed_dim=embed_dim,
                              tokenizer=str(tokenizer_dir), mean=mean, std=std, dtype=dtype,
                              param_dtype=param_dtype)
    with tempfile.TemporaryDirectory() as staging:
        write_tokenizer(tokenizer_source, staging, decoder_config)
        hf_tokenizer = load_tokenizer(staging).hf
    if len(hf_tokenizer) > decoder_config.vocab_size:
        raise InputError(f"the tokenizer has {len(hf_tokenizer)} tokens, more than the LLM's "
                         f"vocab_size {decoder_config.vocab_size}")
    # The reference looks the HD separators up as tokens (docs/reference.md §4.4): ',' and a
    # literal '\n' (the unknown token with the Vicuna vocabulary).
    config.data.hd.comma_id = int(hf_tokenizer.convert_tokens_to_ids(","))
    config.data.hd.newline_id = int(hf_tokenizer.convert_tokens_to_ids("\n"))
    config.convert = ml_collections.ConfigDict(dict(
        imported_from=str(source.absolute()), vision=str(vision_dir.absolute()),
        mm_vision_tower=settings.vision_tower))
    configuration.validate(config)

    placed = assembly.place_model(config)
    abstract, shardings = placed.abstract_params, placed.param_shardings
    _, vision_params = hf.load_vision_tower(vision_dir, param_dtype=param_dtype,
                                            shardings=shardings["vision_tower"])
    _, decoder_params = hf.load_decoder(source, param_dtype=param_dtype,
                                        shardings=shardings["decoder"])
    projector_params = reference.projector_params_from_reference(
        projector_state, num_heads=settings.num_heads, dtype=param_dtype,
        shardings=shardings["projector"])
    del projector_state
    params = {"vision_tower": vision_params, "projector": projector_params,
              "decoder": decoder_params}
    for group, tree in params.items():
        _check_like(abstract[group], tree, group)

    write_tokenizer(tokenizer_source, tokenizer_dir, decoder_config)
    return checkpoint.save_params(out, params, config.to_json())


def merge_lora(workdir: str | os.PathLike, out: str | os.PathLike, *,
               step: int | None = None) -> str:
    """A LoRA run (its newest checkpoint, or ``step``) -> a run workdir ``out`` of the same
    model without adapters, each folded into its base (``lora.merge``); returns ``out``.

    The merged parameters take the dtypes of the model without adapters (a QLoRA base,
    dequantised, is stored in the config's ``param_dtype``)."""
    out = Path(out).absolute()
    _require_empty(out, "--out")
    mesh = _all_devices_mesh()
    trained = assembly.load_trained(str(workdir), mesh=mesh, step=step)
    if not any(mllm.lora_configs(trained.model.config).values()):
        raise InputError(f"{workdir}: the run has no LoRA adapters (model.lora.rank is 0), "
                         "nothing to merge")
    config = ml_collections.ConfigDict(trained.config.to_dict())
    config.model.lora.rank = 0
    plain = assembly.place_model(config, mesh)
    abstract, shardings = plain.abstract_params, plain.param_shardings
    merged = mllm.merge_adapters(trained.model.config, trained.params)
    for group, tree in merged.items():
        _check_like(abstract[group], tree, group)
    params = jax.tree.map(lambda value, like, where: jax.device_put(
        value.astype(like.dtype), where), merged, abstract, shardings)
    tokenizer_dir = out / "tokenizer"
    write_tokenizer(_tokenizer_source(trained.config), tokenizer_dir,
                    plain.model.config.decoder)
    config.model.tokenizer = str(tokenizer_dir)
    config.convert = ml_collections.ConfigDict(dict(
        merged_from=str(Path(workdir).absolute()), merged_step=int(trained.step)))
    return checkpoint.save_params(out, params, config.to_json())


# -- export ----------------------------------------------------------------------------------

def _tokenizer_source(config: ml_collections.ConfigDict) -> str:
    return config.model.tokenizer or config.model.decoder_checkpoint


def export_checkpoint(workdir: str | os.PathLike, out: str | os.PathLike, fmt: str, *,
                      dtype: str | None = None, step: int | None = None,
                      mm_vision_tower: str | None = None,
                      projector_file: str = "mm_projector.bin",
                      max_shard_gb: float = 5.0) -> str:
    """A run workdir (its newest checkpoint, or ``step``) -> ``out`` in ``fmt`` (one of
    FORMATS, see the module docstring); returns ``out``."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out).absolute()
    _require_empty(out, "--out")
    trained = assembly.load_trained(str(workdir), mesh=_all_devices_mesh(), step=step)
    adapted_config = trained.model.config
    # Every part with its adapters folded in; the hf LLM keeps its adapters apart.
    model_config = mllm.without_adapters(adapted_config)
    params = mllm.merge_adapters(adapted_config, trained.params)
    cast = jnp.dtype(dtype) if dtype else None
    max_bytes = int(max_shard_gb * 2**30)

    if fmt == "vision":
        _export_vision(trained.config, model_config.vision, params, out, cast)
    elif fmt == "hf":
        decoder_params = params["decoder"]
        if adapted_config.decoder.lora is not None:
            decoder_params = adapters.base_params(trained.params["decoder"],
                                                  adapted_config.decoder)
        hf.save_decoder(Decoder(model_config.decoder), decoder_params, out, dtype=cast,
                        max_shard_bytes=max_bytes)
        if adapted_config.decoder.lora is not None:
            adapters.save_peft_adapter(adapted_config.decoder, trained.params["decoder"],
                                       out / ADAPTER_DIR, base_model=str(out), dtype=cast)
        copy_tokenizer(_tokenizer_source(trained.config), out)
        reference.save_reference_projector(params["projector"], out / projector_file,
                                           name=trained.config.model.projector.name,
                                           dtype=cast)
    else:
        if mm_vision_tower is None:
            tower_dir = out / "vision_tower"
            _export_vision(trained.config, model_config.vision, params, tower_dir, cast)
            mm_vision_tower = str(tower_dir)
        settings = llava.settings_from_config(trained.config, mm_vision_tower)
        ref_config = llava.reference_config(
            settings, model_config.vision, model_config.decoder,
            dtype=str(cast or jnp.dtype(model_config.decoder.param_dtype)))
        out.mkdir(parents=True, exist_ok=True)
        copy_tokenizer(_tokenizer_source(trained.config), out)
        (out / "config.json").write_text(json.dumps(ref_config, indent=2))
        checkpoint_io.write_safetensors(
            llava.reference_tensors(model_config.decoder, params, settings.projector, cast),
            out, max_shard_bytes=max_bytes)
    return str(out)


def _export_vision(config: ml_collections.ConfigDict, vision_config, params: dict,
                   out: Path, dtype: Any) -> None:
    hf.save_vision_tower(VisionTransformer(vision_config), params["vision_tower"], out,
                         dtype=dtype)
    (out / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(config), indent=2))


# -- command line ----------------------------------------------------------------------------

def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got "
                                         f"{text!r}") from err


def parser() -> argparse.ArgumentParser:
    root = user_error.ArgumentParser(prog="python -m tokenpacker_jax.convert",
                                     description=__doc__.split("\n\n")[0])
    commands = root.add_subparsers(dest="command", required=True)

    imp = commands.add_parser("import", help="reference TokenPacker / LLaVA checkpoint -> "
                                             "run workdir")
    imp.add_argument("--checkpoint", required=True, help="reference checkpoint directory")
    imp.add_argument("--out", required=True, help="workdir to create")
    imp.add_argument("--vision", help="HF CLIP / SigLIP directory (default: mm_vision_tower, "
                                      "if it is a local directory)")
    imp.add_argument("--tokenizer", help="tokenizer directory (default: --checkpoint)")
    imp.add_argument("--multi_layers", type=_layers,
                     help="multi-level feature layers, e.g. 12,16,22,23 (default: the "
                          "config's mm_vision_multi_layers, else the reference's)")
    imp.add_argument("--projector_heads", type=int,
                     help="projector attention heads (default: width / 128)")
    imp.add_argument("--patch_num", type=int, help="HD tile budget (default: patch_num)")
    imp.add_argument("--dtype", default="float32", help="compute dtype of the run config")
    imp.add_argument("--param_dtype", default="float32", help="parameter dtype")

    exp = commands.add_parser("export", help="run workdir -> PyTorch layouts")
    exp.add_argument("--checkpoint", required=True, help="run workdir")
    exp.add_argument("--out", required=True, help="directory to create")
    exp.add_argument("--format", required=True, choices=FORMATS)
    exp.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                     help="cast tensors (default: as stored)")
    exp.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    exp.add_argument("--mm_vision_tower",
                     help="reference: the tower name to write instead of exporting the tower")
    exp.add_argument("--projector_file", default="mm_projector.bin",
                     help="hf: the projector's file name (.bin or .safetensors)")
    exp.add_argument("--max_shard_gb", type=float, default=5.0,
                     help="largest safetensors shard")

    merge = commands.add_parser("merge-lora", help="LoRA run workdir -> run workdir with the "
                                                   "adapters folded in")
    merge.add_argument("--checkpoint", required=True, help="run workdir of a LoRA run")
    merge.add_argument("--out", required=True, help="workdir to create")
    merge.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    return root


def main(argv: Sequence[str] | None = None) -> str:
    args = parser().parse_args(argv)
    if args.command == "merge-lora":
        result = merge_lora(args.checkpoint, args.out, step=args.step)
    elif args.command == "import":
        result = import_checkpoint(
            args.checkpoint, args.out, vision=args.vision, tokenizer=args.tokenizer,
            multi_layers=args.multi_layers, num_heads=args.projector_heads,
            patch_num=args.patch_num, dtype=args.dtype, param_dtype=args.param_dtype)
    else:
        result = export_checkpoint(
            args.checkpoint, args.out, args.format, dtype=args.dtype, step=args.step,
            mm_vision_tower=args.mm_vision_tower, projector_file=args.projector_file,
            max_shard_gb=args.max_shard_gb)
    print(result)
    return result
