"""A checkpoint in the reference TokenPacker / LLaVA layout -> a run workdir
(``python -m tokenpacker_jax.convert import``).

The input is a checkpoint in the reference layout (see ``convert/llava.py``: config.json,
the LLM + projector weights as safetensors or ``.bin`` shards, tokenizer files) plus a local
HF CLIP / SigLIP directory (``--vision``; default: the checkpoint's ``mm_vision_tower`` when
that is a local directory). The output is ``WORKDIR/checkpoints/0/{state,config}``, which
``generate``, ``evaluate`` and ``train`` (as ``train.init_from``) use directly, with the
tokenizer files copied to ``WORKDIR/tokenizer``. The run config says what the reference
config says: ``vicuna_v1``, the aspect mode from ``image_aspect_ratio``, HD ``patch_num``
and the reference's HD global view (``reference_canvas``, see ``tokenpacker_jax.data.hd``),
the feature layers, the projector's scale factor; the HD separator ids are the reference's
own lookups (``convert_tokens_to_ids(',')`` and ``('\\n')``). Each tensor goes straight to
its shards on a mesh over all devices.

The saved state has step 0 and an empty optimizer state: an imported workdir is a starting
point (``--config.train.init_from=WORKDIR`` restores its parameters and builds the optimizer
of the new run), not a run to resume.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import ml_collections

from tokenpacker_jax import assembly, checkpoint, configuration
from tokenpacker_jax.convert import checkpoint_io, hf, hf_decoder, hf_vision, llava, reference
from tokenpacker_jax.convert.hf_preprocessor import image_normalisation
from tokenpacker_jax.convert.tokenizer_files import write_tokenizer
from tokenpacker_jax.tokenizer import load_tokenizer
from tokenpacker_jax.user_error import CheckpointError, InputError


@contextlib.contextmanager
def _naming(directory: Path) -> Iterator[None]:
    """A CheckpointError raised while reading ``directory`` says which directory."""
    try:
        yield
    except CheckpointError as err:
        if str(directory) in str(err):
            raise
        raise CheckpointError(f"{directory}: {err}") from err


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
    checkpoint_io.require_empty_directory(out, "--out")
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
        checkpoint_io.check_fits(abstract[group], tree, group)

    write_tokenizer(tokenizer_source, tokenizer_dir, decoder_config)
    return checkpoint.save_params(out, params, config.to_json())
