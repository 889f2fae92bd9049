"""Reading ``.bin`` checkpoints: each shard loaded once, memory-mapped, whatever the lookup
order; legacy (non-zip) files still read; bad files named."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch

from tokenpacker_jax.convert import checkpoint_io


@pytest.fixture
def loads(monkeypatch):
    """Records (file name, mmap) of every torch.load call."""
    calls = []
    real_load = torch.load

    def counting_load(path, *args, **kwargs):
        calls.append((str(path).rsplit("/", 1)[-1], kwargs.get("mmap")))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    return calls


def write_shards(directory, state, num_shards=2):
    weight_map = {}
    keys = list(state)
    for i in range(num_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        torch.save({k: state[k] for k in keys[i::num_shards]}, directory / name)
        weight_map.update(dict.fromkeys(keys[i::num_shards], name))
    (directory / checkpoint_io.TORCH_INDEX).write_text(json.dumps({"weight_map": weight_map}))


def test_bin_shards_are_loaded_once_each_and_memory_mapped(tmp_path, loads):
    generator = torch.Generator().manual_seed(0)
    state = {f"layer.{i}.weight": torch.randn(3, 4, generator=generator) for i in range(6)}
    state["embed.weight"] = torch.randn(5, 2, generator=generator).to(torch.bfloat16)
    write_shards(tmp_path, state)
    reader = checkpoint_io.TensorReader(tmp_path)
    # Keys alternate between the two shards, so a reader that kept only the last shard
    # open would re-read a shard on every lookup.
    for _ in range(2):
        for key in state:
            got = reader[key]
            if key == "embed.weight":
                assert got.dtype == ml_dtypes.bfloat16
                np.testing.assert_array_equal(got.astype(np.float32), state[key].float().numpy())
            else:
                np.testing.assert_array_equal(got, state[key].numpy())
            assert reader.shape(key) == tuple(state[key].shape)
    assert sorted(loads) == [("pytorch_model-00001-of-00002.bin", True),
                             ("pytorch_model-00002-of-00002.bin", True)]


def test_legacy_format_is_read_without_mmap(tmp_path, loads):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(state, tmp_path / checkpoint_io.TORCH_SINGLE,
               _use_new_zipfile_serialization=False)
    reader = checkpoint_io.TensorReader(tmp_path)
    np.testing.assert_array_equal(reader["w"], state["w"].numpy())
    assert [mmap for _, mmap in loads] == [True, False]


def test_bad_files_are_named(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "list.bin")
    with pytest.raises(ValueError, match="list.bin: expected a state dict"):
        checkpoint_io.load_torch_file(tmp_path / "list.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.bin: cannot read as a PyTorch state dict"):
        checkpoint_io.load_torch_file(tmp_path / "junk.bin")
