"""Reading a benchmark's published files and writing answer and result files.

Every reader names what it read in its errors: ``FILE:LINE`` for JSON lines, ``FILE: record
N`` (or ``FILE: KEY[N]``, ``FILE: question 'ID'``) for JSON, so a malformed record, a
missing field or an unknown question points at the line to fix. Writers replace their file
in one rename, so a killed run never leaves half a result file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

from tokenpacker_jax.user_error import InputError

Where = str  # "FILE:LINE" or "FILE: record N": where a record came from


class LayoutError(FileNotFoundError):
    """A benchmark directory that is not laid out as the benchmark publishes it."""


def require(path: str, what: str) -> str:
    """``path`` if it exists, else a LayoutError saying what was expected there."""
    if not os.path.exists(path):
        raise LayoutError(f"{path}: not found (expected {what})")
    return path


def first_existing(candidates: Sequence[str], what: str) -> str:
    """The first of ``candidates`` that exists, else a LayoutError naming them all."""
    for path in candidates:
        if os.path.exists(path):
            return path
    raise LayoutError(f"{what}: none of {list(candidates)} exists")


def read_jsonl(path: str) -> list[tuple[Where, dict[str, Any]]]:
    """(where, record) per non-empty line; a line that is not a JSON object is an error
    naming it."""
    records = []
    with open(require(path, "a JSON lines file"), encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{where}: not valid JSON ({err})") from err
            if not isinstance(record, dict):
                raise InputError(f"{where}: expected a JSON object, got "
                                 f"{type(record).__name__}")
            records.append((where, record))
    return records


def read_json(path: str, what: str = "a JSON file") -> Any:
    """A whole JSON document; a syntax error names the file and line."""
    with open(require(path, what), encoding="utf-8") as file:
        text = file.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}: not valid JSON ({err})") from err


def read_records(path: str, list_key: str | None = None) -> list[tuple[Where, dict[str, Any]]]:
    """(where, record) from a jsonl file, a JSON list, ``{list_key: [...]}``, or a JSON
    object keyed by question id (GQA; the key becomes ``question_id``)."""
    with open(require(path, "an annotation file"), encoding="utf-8") as file:
        text = file.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        first_line = next((line for line in text.splitlines() if line.strip()), "")
        try:
            json.loads(first_line)
        except json.JSONDecodeError:
            raise InputError(f"{path}:{err.lineno}: not valid JSON ({err})") from err
        return read_jsonl(path)  # one object per line
    if isinstance(value, list):
        return [(f"{path}: record {i}", r) for i, r in enumerate(value)]
    if isinstance(value, dict):
        if list_key and isinstance(value.get(list_key), list):
            return [(f"{path}: {list_key}[{i}]", r) for i, r in enumerate(value[list_key])]
        if "question_id" in value:  # jsonl with a single line
            return [(f"{path}:1", value)]
        if all(isinstance(r, dict) for r in value.values()):
            return [(f"{path}: question {key!r}", {"question_id": key, **r})
                    for key, r in value.items()]
    expected = f'{{"{list_key}": [...]}}, ' if list_key else ""
    raise InputError(f"{path}: expected JSON lines, a JSON list of records, {expected}or an "
                     f"object keyed by question id")


def check_fields(where: Where, record: Any, fields: Iterable[str]) -> None:
    """An error naming ``where`` unless ``record`` is an object holding ``fields``."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in fields if k not in record]
    if missing:
        raise InputError(f"{where}: missing fields {missing}")


def read_annotations(path: str, fields: Sequence[str],
                     list_key: str | None = None) -> dict[str, tuple[Where, dict[str, Any]]]:
    """{str(question_id): (where, record)}; each record must have ``question_id`` and
    ``fields``, and a question id may appear once."""
    annotations: dict[str, tuple[Where, dict[str, Any]]] = {}
    for where, record in read_records(path, list_key):
        check_fields(where, record, ("question_id", *fields))
        key = str(record["question_id"])
        if key in annotations:
            raise InputError(f"{where}: question_id {record['question_id']!r} repeats "
                             f"{annotations[key][0]}")
        annotations[key] = (where, record)
    return annotations


def read_answer_lines(path: str, fields: Sequence[str] = ("question_id", "text"),
                      text_field: str = "text") -> list[tuple[Where, dict[str, Any]]]:
    """An answer file's records; each needs ``fields`` and a string ``text_field``."""
    records = read_jsonl(path)
    for where, record in records:
        check_fields(where, record, fields)
        if not isinstance(record[text_field], str):
            raise InputError(f"{where}: {text_field} must be a string, got "
                             f"{type(record[text_field]).__name__}")
    return records


def read_answers(path: str, annotations: dict[str, tuple[Where, dict[str, Any]]],
                 annotations_path: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(answer, annotation) pairs for the answer file's records, in its order. Every answer
    needs ``question_id`` and ``text``, once each, and an annotation."""
    pairs, seen = [], {}
    for where, record in read_answer_lines(path):
        key = str(record["question_id"])
        if key in seen:
            raise InputError(f"{where}: question_id {record['question_id']!r} was already "
                             f"answered at {seen[key]}")
        seen[key] = where
        if key not in annotations:
            raise InputError(f"{where}: question_id {record['question_id']!r} is not in "
                             f"{annotations_path}")
        pairs.append((record, annotations[key][1]))
    return pairs


def mean(values: Sequence[float]) -> dict[str, Any]:
    """``{"accuracy": mean, "n": count}`` (0 for no values)."""
    return {"accuracy": sum(values) / len(values) if values else 0.0, "n": len(values)}


def grouped(groups: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {name: mean(values) for name, values in sorted(groups.items())}


def _replace(path: str, write) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


def write_jsonl(path: str, records: Iterable[dict[str, Any]]) -> str:
    """One JSON object per line (non-ASCII kept as is), replacing ``path`` at once."""
    return _replace(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n"
                                                 for r in records))


def write_json(path: str, value: Any, indent: int | None = None) -> str:
    """``json.dump`` of ``value`` (ASCII-escaped, as the reference's scripts write it),
    replacing ``path`` at once."""
    return _replace(path, lambda f: json.dump(value, f, indent=indent))


def write_text(path: str, text: str) -> str:
    return _replace(path, lambda f: f.write(text))
