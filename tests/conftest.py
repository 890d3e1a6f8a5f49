"""Tests run on CPU with 8 emulated devices; XLA reads the flag when jax is first imported."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Any earlier device count goes (pytest-xdist's workers inherit the controller's, which ran this too).
_flags = [
    f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
]
os.environ["XLA_FLAGS"] = " ".join([*_flags, "--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Most of the suite's time is the same tiny programs compiled again by every `maskjax train` subprocess
# (a tiny MAE run: 41 s without, 19 s with, the same losses). One persistent compilation cache per pytest
# run, made by the controller and inherited by the xdist workers and every subprocess they start; a size
# limit turns on jax's file lock, so concurrent writers never leave a half-written entry for a reader.
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="maskjax-test-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The digits dataset, prepared once for every test file that trains MAE on it (test_train.py
    declares its own, with a text corpus and BEiT's tokenizer as well)."""
    from maskjax.data import image_datasets

    d = tmp_path_factory.mktemp("digits")
    image_datasets.prepare("digits", d)
    return d
