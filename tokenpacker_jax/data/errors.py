"""Bad input: one error type with a reason code, and the per-reason skip counter.

Every problem the data pipeline can find in one record raises ``DataError`` with a
``reason`` from ``REASONS`` and a message naming the record (``id`` and file/line or
source index). With ``data.on_error = skip`` the record is dropped and counted under its
reason; with ``raise`` the error propagates (see ``tokenpacker_jax.data.pipeline``).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping

from tokenpacker_jax.user_error import UserError

logger = logging.getLogger("tokenpacker_jax.data")

# Reason codes, in the order summaries print them.
BAD_JSON = "bad_json"  # a JSONL line (or JSON element) that does not parse
BAD_RECORD = "bad_record"  # missing / mistyped fields, empty turn text
EMPTY_CONVERSATION = "empty_conversation"
ROLE_ORDER = "role_order"  # not user, assistant, user, assistant, ...
PLACEHOLDER_WITHOUT_IMAGE = "placeholder_without_image"  # '<image>' but no image
IMAGE_WITHOUT_PLACEHOLDER = "image_without_placeholder"  # an image but no '<image>'
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
TOO_LONG = "too_long"  # over max_length and no safe cut (image tokens or no answer left)
TOKENIZATION = "tokenization"  # a template boundary falls inside a token
REASONS = (BAD_JSON, BAD_RECORD, EMPTY_CONVERSATION, ROLE_ORDER, PLACEHOLDER_WITHOUT_IMAGE,
           IMAGE_WITHOUT_PLACEHOLDER, MISSING_IMAGE, CORRUPT_IMAGE, TOO_LONG, TOKENIZATION)


class DataError(UserError, ValueError):
    """A record that cannot be used; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown data error reason {reason!r}; known: {REASONS}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    def with_record(self, where: str) -> DataError:
        """The same error with the record's description in front of the message."""
        return DataError(self.reason, f"{where}: {self.message}")

    def __reduce__(self):  # keeps reason and message across process boundaries
        return (DataError, (self.reason, self.message))


class SkipCounter:
    """Skipped records per reason, with the first messages of each kept for the log."""

    def __init__(self, counts: Mapping[str, int] | None = None, *, max_logged: int = 10):
        self.counts: collections.Counter[str] = collections.Counter(counts or {})
        self.max_logged = max_logged

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, error: DataError) -> None:
        self.counts[error.reason] += 1
        if self.counts[error.reason] <= self.max_logged:
            suffix = (f" (further '{error.reason}' skips are counted, not logged)"
                      if self.counts[error.reason] == self.max_logged else "")
            logger.warning("skipped %s [%s]%s", error.message, error.reason, suffix)

    def as_dict(self) -> dict[str, int]:
        return {reason: int(self.counts[reason]) for reason in REASONS if self.counts[reason]}

    def summary(self, what: str) -> str:
        if not self.total:
            return f"{what}: no records skipped"
        parts = ", ".join(f"{reason}: {count}" for reason, count in self.as_dict().items())
        return f"{what}: {self.total} records skipped ({parts})"
