"""What the data pipeline needs of a tokenizer, and adapters that give it.

``TextTokenizer``: ``encode(text)`` without BOS/EOS added (special-token strings in the text
map to their ids), ``bos_id``, ``eos_id``, ``pad_id``. ``text_tokenizer`` adapts
``tokenpacker_jax.tokenizer.Tokenizer`` and transformers tokenizers to it; a transformers
tokenizer pads with ``default_pad_id``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol


class TextTokenizer(Protocol):
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, no BOS/EOS added; special-token strings map to their ids."""


@dataclasses.dataclass(frozen=True)
class HFTextTokenizer:
    """A transformers tokenizer seen through the ``TextTokenizer`` interface."""

    hf: Any
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


def default_pad_id(hf_tokenizer: Any) -> int:
    """The pad id of a transformers tokenizer: its pad token; else UNK (LLaMA-2 has no pad
    token, and the reference's training pads with UNK); else EOS (LLaMA-3 has neither)."""
    for candidate in (hf_tokenizer.pad_token_id, hf_tokenizer.unk_token_id,
                      hf_tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer defines no pad, unknown or EOS token")


def text_tokenizer(tokenizer: Any) -> TextTokenizer:
    """``tokenpacker_jax.tokenizer.Tokenizer``, a transformers tokenizer, or anything with
    ``encode(text)``, ``bos_id``, ``eos_id``, ``pad_id`` -> ``TextTokenizer``.

    A transformers tokenizer pads as ``default_pad_id`` says.
    """
    if isinstance(tokenizer, HFTextTokenizer):
        return tokenizer
    if hasattr(tokenizer, "hf") and hasattr(tokenizer, "pad_id"):  # our Tokenizer
        return HFTextTokenizer(tokenizer.hf, tokenizer.bos_id, int(tokenizer.eos_id),
                               int(tokenizer.pad_id))
    if hasattr(tokenizer, "bos_id") and hasattr(tokenizer, "pad_id"):
        return tokenizer
    if hasattr(tokenizer, "eos_token_id"):  # a transformers tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer defines no EOS token")
        return HFTextTokenizer(tokenizer, tokenizer.bos_token_id, int(tokenizer.eos_token_id),
                               default_pad_id(tokenizer))
    raise TypeError(f"cannot use {type(tokenizer).__name__} as a tokenizer: need encode(text) "
                    f"and bos_id / eos_id / pad_id, or a transformers tokenizer")
