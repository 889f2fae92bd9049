"""Reading and writing Hugging Face style checkpoint directories, tensor by tensor.

A directory holds ``config.json`` and its weights as one of:
``model.safetensors``; ``model.safetensors.index.json`` + shards; ``pytorch_model.bin``;
``pytorch_model.bin.index.json`` + shards. Safetensors are read lazily (one tensor at a time,
no torch needed); ``.bin`` files need torch and are opened with ``weights_only=True`` so an
untrusted file cannot run code, memory-mapped (``mmap=True``) so that a shard is read from
disk only as its tensors are used. A converted tree of parameters is checked against the
model's abstract tree (same structure, same shapes) before anything is written, and
everything is written into a new or empty directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from tokenpacker_jax.user_error import CheckpointError

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_SINGLE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"


def read_config(path: str | os.PathLike) -> dict:
    """The ``config.json`` of a checkpoint directory as a dict."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no config.json in the checkpoint directory")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from err


def torch_to_numpy(value) -> np.ndarray:
    """A torch tensor (bfloat16 included) or array-like as a NumPy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            return value.float().numpy().astype(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def load_torch_state(path: str | os.PathLike) -> Mapping[str, Any]:
    """A ``.bin`` / ``.pt`` state dict of torch tensors, loaded without running code
    (``weights_only=True``) and memory-mapped: tensors stay in the file until read.

    Files in PyTorch's legacy (pre-1.6, non-zip) format cannot be mapped and are read whole.
    """
    import torch  # noqa: PLC0415 (torch: optional, only .bin checkpoints need it)

    def load(mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            state = load(mmap=True)
        except RuntimeError as err:
            if "_use_new_zipfile_serialization" not in str(err):
                raise
            state = load(mmap=False)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read as a PyTorch state dict ({err})") from err
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (mapping), got "
                              f"{type(state).__name__}")
    return {str(k): v for k, v in state.items()}


def load_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A ``.bin`` / ``.pt`` state dict as NumPy arrays (see ``load_torch_state``)."""
    return {k: torch_to_numpy(v) for k, v in load_torch_state(path).items()}


class TensorReader(Mapping):
    """Read-only, lazy mapping {tensor name: np.ndarray} over a checkpoint directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file_of: dict[str, Path] = {}
        # .bin shards, memory-mapped, each loaded once (lookups may go back and forth).
        self._torch_cache: dict[Path, Mapping[str, Any]] = {}
        if (self.path / SAFETENSORS_SINGLE).is_file():
            self._index_safetensors([self.path / SAFETENSORS_SINGLE])
        elif (self.path / SAFETENSORS_INDEX).is_file():
            self._index_from_json(self.path / SAFETENSORS_INDEX)
        elif (self.path / TORCH_SINGLE).is_file():
            for name in self._torch_state(self.path / TORCH_SINGLE):
                self._file_of[name] = self.path / TORCH_SINGLE
        elif (self.path / TORCH_INDEX).is_file():
            self._index_from_json(self.path / TORCH_INDEX)
        else:
            raise FileNotFoundError(
                f"{self.path}: no weights found (looked for {SAFETENSORS_SINGLE}, "
                f"{SAFETENSORS_INDEX}, {TORCH_SINGLE}, {TORCH_INDEX})")

    def _index_safetensors(self, files: list[Path]) -> None:
        for file in files:
            with safe_open(file, framework="numpy") as handle:
                for name in handle.keys():
                    self._file_of[name] = file

    def _index_from_json(self, index_path: Path) -> None:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index_path}: not a checkpoint index ({err})") from err
        for name, file in weight_map.items():
            shard = self.path / file
            if not shard.is_file():
                raise FileNotFoundError(f"{index_path}: shard {file} of {name} is missing")
            self._file_of[name] = shard

    def _torch_state(self, file: Path) -> Mapping[str, Any]:
        if file not in self._torch_cache:
            self._torch_cache[file] = load_torch_state(file)
        return self._torch_cache[file]

    def __getitem__(self, name: str) -> np.ndarray:
        file = self._file_of[name]
        if file.suffix == ".safetensors":
            with safe_open(file, framework="numpy") as handle:
                return handle.get_tensor(name)
        return torch_to_numpy(self._torch_state(file)[name])

    def shape(self, name: str) -> tuple[int, ...]:
        file = self._file_of[name]
        if file.suffix == ".safetensors":
            with safe_open(file, framework="numpy") as handle:
                return tuple(handle.get_slice(name).get_shape())
        return tuple(self._torch_state(file)[name].shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def write_safetensors(tensors: Iterator[tuple[str, np.ndarray]], path: str | os.PathLike,
                      max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes (name, array) pairs as safetensors shards plus an index when there are several.

    Arrays arrive one at a time and at most one shard is held in memory.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[tuple[str, list[str]]] = []
    pending: dict[str, np.ndarray] = {}
    pending_bytes = 0
    total_bytes = 0

    def flush():
        nonlocal pending, pending_bytes
        if not pending:
            return
        name = f"model-{len(shards) + 1:05d}.safetensors.tmp"
        save_file(pending, out / name, metadata={"format": "pt"})
        shards.append((name, list(pending)))
        pending, pending_bytes = {}, 0

    for name, array in tensors:
        array = np.ascontiguousarray(array)
        if pending and pending_bytes + array.nbytes > max_shard_bytes:
            flush()
        pending[name] = array
        pending_bytes += array.nbytes
        total_bytes += array.nbytes
    flush()

    if len(shards) == 1:
        os.replace(out / shards[0][0], out / SAFETENSORS_SINGLE)
        return
    weight_map = {}
    for i, (tmp_name, names) in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out / tmp_name, out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))


def require_empty_directory(path: Path, what: str) -> None:
    """``path`` (the directory that ``what`` names, e.g. ``--out``) is absent or empty."""
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path}: {what} must be a new or empty directory")


def check_fits(abstract: Any, params: Any, group: str) -> None:
    """The loaded tree ``params`` has the structure and shapes of the model's ``abstract``
    tree (of parameter group ``group``, named in the error)."""
    want = jax.tree.map(lambda x: tuple(x.shape), abstract)
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    if want != got:
        raise CheckpointError(f"{group}: the checkpoint's parameters do not fit the model "
                              f"(expected {want}, got {got})")
