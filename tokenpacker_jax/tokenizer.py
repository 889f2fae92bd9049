"""Tokenizers of the decoder families, from a local directory, with their special-token rules.

``load_tokenizer(path)`` reads what ``transformers.AutoTokenizer`` reads (``tokenizer.json``,
or a sentencepiece ``tokenizer.model`` with ``tokenizer_config.json``) and settles the
conventions that differ between families:

| family          | BOS                   | EOS (generation also stops at)    | pad         |
|-----------------|-----------------------|-----------------------------------|-------------|
| LLaMA-2, Vicuna | ``<s>`` 1             | ``</s>`` 2                        | unk 0 (1)   |
| LLaMA-3.x       | ``<|begin_of_text|>`` | ``<|end_of_text|>`` (``<|eot_id|>``) | EOS (2)  |
| Gemma 1 / 2 / 3 | ``<bos>`` 2           | ``<eos>`` 1 (``<end_of_turn>``)   | ``<pad>`` 0 |

(1) LLaMA-2 has no pad token; the reference LLaVA-1.5 training sets ``pad = unk`` (id 0),
    and so do we. Pads are always masked, so the id only has to be a valid one.
(2) LLaMA-3 has neither pad nor unk; EOS is used, as most LLaMA-3 fine-tuning code does.

BOS is added by ``encode`` itself (the tokenizer is called without its own special tokens),
so every family and file format behaves the same.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tokenpacker_jax.convert.hf_decoder import family_of_model_type
from tokenpacker_jax.data.batch import pad_rows
from tokenpacker_jax.data.text_tokenizer import default_pad_id
from tokenpacker_jax.models.decoder_config import DECODER_FAMILIES

TOKENIZER_FAMILIES = DECODER_FAMILIES
# Chat-turn terminators that generation should stop at, besides EOS.
_EXTRA_STOP_TOKENS = ("<|eot_id|>", "<end_of_turn>")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A transformers tokenizer plus the family's special-token ids."""

    hf: Any  # transformers.PreTrainedTokenizerBase
    family: str
    bos_id: int | None
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]  # EOS first

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``, with BOS in front when ``add_bos`` (and the family has one)."""
        ids = list(self.hf.encode(text, add_special_tokens=False))
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def pad_batch(self, sequences: Sequence[Sequence[int]], length: int | None = None, *,
                  side: str = "left") -> tuple[np.ndarray, np.ndarray]:
        """Pads id lists to ``length`` (default: the longest) with ``pad_id``
        (``data.batch.pad_rows``).
        Returns (ids [B, L] int32, attention mask [B, L] int32)."""
        return pad_rows(sequences, self.pad_id, length, side=side)


def _family_from_directory(path: Path, hf_tokenizer: Any) -> str:
    config_path = path / "config.json"
    if config_path.is_file():
        family = family_of_model_type(json.loads(config_path.read_text()).get("model_type"))
        if family is not None:
            return family
    vocab = hf_tokenizer.get_vocab()
    if "<start_of_turn>" in vocab or "<bos>" in vocab:
        return "gemma"
    if "<|begin_of_text|>" in vocab or "<s>" in vocab:
        return "llama"
    raise ValueError(f"{path}: cannot tell the tokenizer's model family (no config.json with a "
                     f"known model_type, no known BOS token); pass family= one of "
                     f"{TOKENIZER_FAMILIES}")


def _config_eos_ids(path: Path) -> list[int]:
    """EOS ids listed by generation_config.json / config.json (LLaMA-3 instruct lists
    several)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.is_file():
            eos = json.loads(file.read_text()).get("eos_token_id")
            if eos is not None:
                ids.extend(eos if isinstance(eos, list) else [eos])
    return [int(i) for i in ids]


def load_tokenizer(path: str | os.PathLike, *, family: str | None = None) -> Tokenizer:
    """The tokenizer saved in a local directory (no downloads) with its family's rules."""
    from transformers import AutoTokenizer  # noqa: PLC0415 (transformers: seconds to import)

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a tokenizer directory")
    hf_tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if family is None:
        family = _family_from_directory(path, hf_tokenizer)
    if family not in TOKENIZER_FAMILIES:
        raise ValueError(f"tokenizer family must be one of {TOKENIZER_FAMILIES}, got {family!r}")
    eos_id = hf_tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"{path}: the tokenizer defines no EOS token")
    pad_id = default_pad_id(hf_tokenizer)
    vocab = hf_tokenizer.get_vocab()
    stops = [eos_id, *_config_eos_ids(path), *(vocab[t] for t in _EXTRA_STOP_TOKENS
                                               if t in vocab)]
    stop_ids = tuple(dict.fromkeys(int(i) for i in stops))
    return Tokenizer(hf=hf_tokenizer, family=family, bos_id=hf_tokenizer.bos_token_id,
                     eos_id=int(eos_id), pad_id=int(pad_id), stop_ids=stop_ids)
