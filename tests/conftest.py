"""Test setup: 8 simulated CPU devices and full-precision matmuls for parity tests.

The XLA flag must be set before jax is imported anywhere, hence at the top of conftest.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Whole training runs compile the same step again (each run, each subprocess): a persistent
# compilation cache, shared by the test process and the processes it starts, pays once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "tokenpacker_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

from tokenpacker_jax import sharding  # noqa: E402


@pytest.fixture(scope="session")
def mesh8():
    """A (data=2, fsdp=2, tensor=2) mesh over the 8 simulated devices."""
    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices"
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="session")
def mesh1():
    """A one-device mesh (every axis of size 1)."""
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
