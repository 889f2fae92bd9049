"""LLaVA JSON / JSONL records as a random-access source (what ``grain.MapDataset.source``
takes).

A record is ``{"id": ..., "image": "relative/path.jpg", "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``; ``image`` is optional
(text-only samples), its path is relative to the image folder.

- ``.jsonl``: one record per line. Lines are kept as bytes and parsed when read, so a line
  that does not parse is one bad record (reason ``bad_json``), found in its epoch like any
  other, and named by file and line.
- ``.json``: one array of records, parsed when the source is built (a file that does not
  parse is an error right away, naming the file). Each element is kept as compact JSON.

Records are stored as one byte buffer plus offsets (about the size of the files), which is
cheap to hand to grain's worker processes and to index.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class SourceRecord:
    """One record as read from a source.

    index: position in the source (the ``sample_id`` of the batch).
    where: the record's file and line (or file and array index, or dataset and split).
    record: the parsed record (a dict for usable ones), None when it did not parse.
    error: why it did not parse (or why the record is unusable before any parsing).
    error_reason: the reason code of ``error`` (``tokenpacker_jax.data.errors``).
    image: pixels or encoded bytes supplied by the source itself (TFDS); None: the
      record's ``image`` field names a file.
    """

    index: int
    where: str
    record: Any
    error: str | None = None
    image: Any = None
    error_reason: str = "bad_json"

    def describe(self) -> str:
        record_id = self.record.get("id") if isinstance(self.record, dict) else None
        shown = f"id={record_id!r}" if record_id is not None else f"#{self.index}"
        return f"record {shown} ({self.where})"


def split_paths(paths: str | Sequence[str]) -> list[str]:
    """``"a.json,b.jsonl"`` or a list -> list of paths."""
    if isinstance(paths, str):
        return [p.strip() for p in paths.split(",") if p.strip()]
    return [str(p) for p in paths]


class LlavaSource:
    """The records of one or more LLaVA JSON / JSONL files, in file order.

    Args:
      paths: files (``.json`` arrays or ``.jsonl`` lines), comma-separated or a list.
    """

    def __init__(self, paths: str | Sequence[str]):
        self.paths = split_paths(paths)
        if not self.paths:
            raise ValueError("LlavaSource: no annotation files given")
        chunks: list[bytes] = []
        locations: list[tuple[int, int]] = []  # (file number, line or array index)
        self._jsonl: list[bool] = []
        for file_number, path in enumerate(self.paths):
            is_jsonl = path.endswith(".jsonl")
            self._jsonl.append(is_jsonl)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: annotation file not found")
            if is_jsonl:
                with open(path, "rb") as file:
                    for line_number, line in enumerate(file, start=1):
                        if line.strip():
                            chunks.append(line.rstrip(b"\r\n"))
                            locations.append((file_number, line_number))
            else:
                with open(path, "rb") as file:
                    try:
                        items = json.load(file)
                    except (json.JSONDecodeError, UnicodeDecodeError) as err:
                        raise ValueError(f"{path}: not valid JSON ({err}); use JSONL (one "
                                         f"record per line) to skip bad records") from err
                if not isinstance(items, list):
                    raise ValueError(f"{path}: expected a JSON array of records, got "
                                     f"{type(items).__name__}")
                for item_number, item in enumerate(items):
                    chunks.append(json.dumps(item, ensure_ascii=False,
                                             separators=(",", ":")).encode())
                    locations.append((file_number, item_number))
        self._buffer = np.frombuffer(b"".join(chunks), np.uint8) if chunks else \
            np.zeros(0, np.uint8)
        self._offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks],
                                                       dtype=np.int64)]).astype(np.int64)
        self._locations = np.asarray(locations, np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self._locations)

    def where(self, index: int) -> str:
        file_number, position = (int(v) for v in self._locations[index])
        path = self.paths[file_number]
        return f"{path}:{position}" if self._jsonl[file_number] else f"{path}[{position}]"

    def __getitem__(self, index: int) -> SourceRecord:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range (0..{len(self) - 1})")
        raw = self._buffer[self._offsets[index]:self._offsets[index + 1]].tobytes()
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return SourceRecord(index, self.where(index), None, f"not valid JSON ({err})")
        return SourceRecord(index, self.where(index), record)

    def __repr__(self) -> str:
        return f"LlavaSource({self.paths}, {len(self)} records)"
