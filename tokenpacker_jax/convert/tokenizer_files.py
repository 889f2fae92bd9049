"""The tokenizer files of a checkpoint directory, copied from one directory to another.

A tokenizer directory holds ``tokenizer.model`` (SentencePiece) and / or ``tokenizer.json``
(fast tokenizers) with the side files of ``TOKENIZER_FILES``. ``write_tokenizer`` adds a
``config.json`` naming the model type and the EOS ids, which is what ``load_tokenizer``
reads to pick the family and the stop ids.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tokenpacker_jax.convert import hf_decoder
from tokenpacker_jax.models.decoder_config import DecoderConfig

# What a tokenizer directory may hold (config.json is written separately: it is the model's).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json")


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
