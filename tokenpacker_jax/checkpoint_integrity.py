"""Checksums of a checkpoint step's files: recorded when the step is saved, verified before it
is restored.

Orbax 0.12.8 and TensorStore 0.1.86 verify none of the array bytes they read back: a step with
4 KiB flipped in an array file restores the flipped values without a word (the zstd frames
TensorStore's zarr driver writes carry no checksum). TensorStore's zarr3 driver has a
``crc32c`` codec that does verify on read (flipping a byte of a chunk written with it fails the
read with "Digest mismatch"), but Orbax puts it on the shard index only, never on the chunk
data, and has no option to add it; and the data iterator's and the config's items are JSON
files that no codec covers. So each step gets ``checksums.json``: the size and CRC-32 of every
file of every item, and for the state's OCDBT data files the arrays each one holds (read from
its index), so that a failure names both. ``checkpoint.Manager`` writes it after the items are
finalized and before Orbax commits the step, so every committed step has one.

A step without ``checksums.json`` was saved before checksums were recorded; it restores
unverified (``verify`` returns False and the caller says so).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import zlib
from collections.abc import Iterable, Sequence

import tensorstore as ts
from etils import epath

from tokenpacker_jax.user_error import CheckpointError

MANIFEST = "checksums.json"
FORMAT = 1
_CHUNK = 16 << 20
_THREADS = min(8, os.cpu_count() or 1)  # zlib.crc32 releases the GIL on large buffers
_NAMED = 3  # problems (and arrays per file) a message names before counting the rest


class DamagedCheckpoint(CheckpointError):
    """A step whose files differ from what was written; the message names files and arrays."""

    def __init__(self, step_dir: epath.Path, problems: Sequence[str]):
        self.step_dir = step_dir
        self.problems = list(problems)
        named = "; ".join(self.problems[:_NAMED])
        more = len(self.problems) - _NAMED
        super().__init__(f"checkpoint step {step_dir.name} in {step_dir.parent} is damaged: "
                         f"{named}{f'; and {more} more files' if more > 0 else ''}")


def file_checksum(path: epath.Path) -> tuple[int, int]:
    """(size in bytes, CRC-32) of a file."""
    crc, size = 0, 0
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


def _files(step_dir: epath.Path, items: Iterable[str]) -> list[str]:
    """Paths relative to ``step_dir`` of every file under the item directories present."""
    files, folders = [], [step_dir / item for item in items if (step_dir / item).is_dir()]
    while folders:  # (epath's rglob refuses to on object stores)
        for path in folders.pop().iterdir():
            if path.is_dir():
                folders.append(path)
            else:
                files.append(str(path.relative_to(step_dir)))
    return sorted(files)


def _checksums(step_dir: epath.Path, files: Sequence[str]) -> dict[str, tuple[int, int]]:
    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
        sums = pool.map(lambda f: file_checksum(step_dir / f), files)
        return dict(zip(files, sums, strict=True))


def ocdbt_arrays(item_dir: epath.Path) -> dict[str, list[str]]:
    """File (relative to ``item_dir``) -> names of the arrays with bytes in it, read from the
    item's OCDBT index (Orbax's array store: one key per zarr chunk, ``ARRAY/CHUNK``)."""
    if not (item_dir / "manifest.ocdbt").exists():
        return {}
    url = str(item_dir) if "://" in str(item_dir) else f"file://{os.path.abspath(item_dir)}"
    base = ts.KvStore.open(url + "/").result()
    arrays: dict[str, set[str]] = collections.defaultdict(set)

    def file_of(location: str) -> str:  # KIND:PREFIX:FILE:OFFSET:LENGTH
        _, prefix, name, *_ = location.split(":")
        return prefix + name

    def walk(location: str) -> None:
        node = ts.ocdbt.dump(base, location).result()
        for entry in node["entries"]:
            if node["height"] > 0:
                walk(entry["location"])
                continue
            array = entry["key"].decode().split("/")[0]
            where = entry.get("indirect_value") or location  # inline: in the node's file
            arrays[file_of(where)].add(array)

    manifest = ts.ocdbt.dump(base).result()
    root = manifest["versions"][-1]["root"]
    if "location" in root:  # an empty tree has none
        walk(root["location"])
    return {file: sorted(names) for file, names in arrays.items()}


def write_manifest(step_dir: epath.Path, items: Sequence[str]) -> None:
    """Writes ``step_dir/checksums.json`` for the files of ``items`` (the state item's arrays
    mapped to their files)."""
    files = _files(step_dir, items)
    arrays = {}
    for item in items:
        arrays.update({f"{item}/{file}": names
                       for file, names in ocdbt_arrays(step_dir / item).items()})
    manifest = {"format": FORMAT, "checksum": "crc32",
                "files": {f: {"bytes": size, "crc32": crc}
                          for f, (size, crc) in _checksums(step_dir, files).items()},
                "arrays": arrays}
    (step_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _describe(file: str, arrays: Sequence[str]) -> str:
    if not arrays:
        return file
    named = ", ".join(arrays[:_NAMED])
    more = f" and {len(arrays) - _NAMED} more" if len(arrays) > _NAMED else ""
    return f"{file} (array{'s' if len(arrays) > 1 else ''} {named}{more})"


def verify(step_dir: epath.Path, items: Sequence[str], *,
           array_prefix: str | None = None) -> bool:
    """Checks the files of ``items`` against the step's ``checksums.json``.

    Args:
      array_prefix: check only the state files holding an array whose name starts with this
        (``"params."``: what inference reads), beside those holding no array (metadata).
    Returns:
      True when verified; False when the step has no ``checksums.json`` (saved before they
      were recorded: nothing to verify against).
    Raises:
      DamagedCheckpoint: a file is missing, or its size or CRC-32 differs from the recorded.
    """
    path = step_dir / MANIFEST
    if not path.exists():
        return False
    try:
        manifest = json.loads(path.read_text())
        recorded = {f: (r["bytes"], r["crc32"]) for f, r in manifest["files"].items()}
        arrays = manifest["arrays"]
    except (ValueError, KeyError, TypeError) as err:
        raise DamagedCheckpoint(step_dir, [f"{MANIFEST} is unreadable ({err})"]) from err
    wanted = sorted(
        f for f in recorded if f.split("/")[0] in items
        and (array_prefix is None or not arrays.get(f)
             or any(a.startswith(array_prefix) for a in arrays[f])))
    present = [f for f in wanted if (step_dir / f).is_file()]
    actual = _checksums(step_dir, present)
    problems = []
    for file in wanted:
        where = _describe(file, arrays.get(file, []))
        size, crc = recorded[file]
        if file not in actual:
            problems.append(f"{where} is missing")
        elif actual[file][0] != size:
            problems.append(f"{where} has {actual[file][0]} bytes, {size} were written")
        elif actual[file][1] != crc:
            problems.append(f"{where} does not match its checksum (its bytes changed after "
                            f"they were written)")
    if problems:
        raise DamagedCheckpoint(step_dir, problems)
    return True


def set_aside(step_dir: epath.Path, reason: str) -> epath.Path:
    """Moves a step out of its checkpoint directory (never deletes it): ``DIR/STEP`` ->
    ``DIR.set_aside/STEP.REASON`` (``.2``, ``.3``, ... when that is taken); returns where."""
    root = step_dir.parent.parent / f"{step_dir.parent.name}.set_aside"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{step_dir.name}.{reason}"
    n = 1
    while target.exists():
        n += 1
        target = root / f"{step_dir.name}.{reason}.{n}"
    step_dir.rename(target)
    return target
