"""Bad records out of the example stream, and what the pipeline did to records, counted.

``SkipBadRecords`` takes a stream of examples, ``Skipped`` markers (a record that failed,
``tokenpacker_jax.data.errors``) and ``Truncated`` examples (cut at max_length). It drops
each marker (or, for the evaluation splits, replaces it with a padding row), counts it by
reason, logs the first few per reason and summarises each epoch; an epoch without a single
usable record raises (an endless stream would otherwise spin). With ``on_error='raise'`` the
first marker raises its DataError, naming the record. Truncated examples are counted and
passed on unwrapped.

The counts live in the iterator's state (saved with every checkpoint, so a resumed run
continues them): ``skipped_records`` and ``record_counts`` read them from a pipeline
iterator or its saved state, however deeply the state of later stages nests it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import grain

from tokenpacker_jax.data import errors, packing
from tokenpacker_jax.data.errors import DataError, SkipCounter
from tokenpacker_jax.data.example import Skipped, Truncated

logger = errors.logger
ON_ERROR = ("skip", "raise")
SKIP_STATE_KEY = "skipped_by_reason"
TRUNCATED_STATE_KEY = "truncated"  # samples cut at max_length: in all, in this epoch


class SkipBadRecords(grain.IterDataset):
    """Drops (or, with ``replacement``, replaces) ``Skipped`` markers and counts them; counts
    and unwraps ``Truncated`` examples (cut at max_length, kept).

    Args:
      parent: elements that are examples or ``Skipped``.
      on_error: ``skip`` or ``raise`` (raise the marker's DataError).
      epoch_length: elements per epoch upstream (for the per-epoch summary).
      name: what the summary calls this stream.
      replacement: if given, a bad record is replaced by ``replacement()`` instead of
        dropped (evaluation: keeps the number of rows per host fixed).
    """

    def __init__(self, parent: grain.IterDataset, *, on_error: str = "skip",
                 epoch_length: int = 0, name: str = "data",
                 replacement: Callable[[], Any] | None = None):
        super().__init__(parent)
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.epoch_length = epoch_length
        self.name = name
        self.replacement = replacement

    def __iter__(self) -> _SkipIterator:
        return _SkipIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"SkipBadRecords(on_error={self.on_error})"


class _SkipIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, dataset: SkipBadRecords):
        super().__init__(parent)
        self._dataset = dataset
        self._consumed = 0  # elements taken from the parent (good and bad)
        self._total = SkipCounter()
        self._epoch = SkipCounter(max_logged=0)
        self._good_in_epoch = 0
        self._truncated = [0, 0]  # in all, in this epoch
        self._finished = False

    def __next__(self):
        dataset = self._dataset
        while True:
            try:
                element = next(self._parent)
            except StopIteration:
                if not self._finished:
                    self._finished = True
                    self._log_summary(f"{dataset.name}: end of data", self._total,
                                      self._truncated[0])
                raise
            self._consumed += 1
            if isinstance(element, Truncated):
                self._truncated = [count + 1 for count in self._truncated]
                element = element.example
            if isinstance(element, Skipped):
                if dataset.on_error == "raise":
                    raise element.error
                self._total.add(element.error)
                self._epoch.add(element.error)
            else:
                self._good_in_epoch += 1
            length = dataset.epoch_length
            if length and self._consumed % length == 0:
                epoch = self._consumed // length - 1
                what = f"{dataset.name}: epoch {epoch}"
                self._log_summary(what, self._epoch, self._truncated[1])
                if not self._good_in_epoch:  # an endless stream would spin here forever
                    raise DataError(next(iter(self._epoch.counts)),
                                    f"{self._epoch.summary(what)}: no usable record at "
                                    f"all; the first messages are logged above")
                self._epoch = SkipCounter(max_logged=0)
                self._good_in_epoch = 0
                self._truncated[1] = 0
            if not isinstance(element, Skipped):
                return element
            if dataset.replacement is not None:
                return dataset.replacement()

    @staticmethod
    def _log_summary(what: str, counter: SkipCounter, truncated: int) -> None:
        cut = f"; {truncated} cut at max_length" if truncated else ""
        logger.log(logging.WARNING if counter.total else logging.INFO,
                   counter.summary(what) + cut)

    @property
    def skipped(self) -> dict[str, int]:
        """Records skipped so far, by reason."""
        return self._total.as_dict()

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "consumed": self._consumed,
                SKIP_STATE_KEY: self._total.as_dict(), "epoch_skipped": self._epoch.as_dict(),
                "epoch_good": self._good_in_epoch, TRUNCATED_STATE_KEY: list(self._truncated)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._consumed = int(state["consumed"])
        self._total = SkipCounter(state[SKIP_STATE_KEY])
        self._epoch = SkipCounter(state["epoch_skipped"], max_logged=0)
        self._good_in_epoch = int(state["epoch_good"])
        self._truncated = [int(count) for count in state.get(TRUNCATED_STATE_KEY, (0, 0))]
        self._finished = False


def _find_state(state: Any, key: str) -> Any:
    """The value under ``key`` in the first mapping of a nested iterator state holding it
    (None if none does)."""
    stack = [state]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            if key in item:
                return item[key]
            stack.extend(item.values())
    return None


def _state(iterator_or_state: Any) -> Any:
    if isinstance(iterator_or_state, grain.DatasetIterator):
        return iterator_or_state.get_state()
    return iterator_or_state


def skipped_records(iterator_or_state: Any) -> dict[str, int]:
    """Records skipped so far by reason, from a pipeline iterator or its state."""
    counts = _find_state(_state(iterator_or_state), SKIP_STATE_KEY)
    if counts is None:
        raise ValueError("no SkipBadRecords state found in this iterator state")
    return dict(counts)


def record_counts(iterator_or_state: Any) -> dict[str, int]:
    """What the pipeline did to records so far: ``skipped`` (all reasons), ``truncated``
    (cut at max_length) and, packing, ``deferred_by_tiles`` (sent to a later row by the
    row's tile budget)."""
    state = _state(iterator_or_state)
    counts = {"skipped": sum(skipped_records(state).values()),
              "truncated": int(_find_state(state, TRUNCATED_STATE_KEY)[0])}
    deferred = _find_state(state, packing.DEFERRED_STATE_KEY)
    if deferred is not None:  # packed rows
        counts["deferred_by_tiles"] = int(deferred)
    return counts
