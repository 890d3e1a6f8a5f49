"""Tests run on CPU with 8 emulated devices; XLA reads the flag when jax is first imported."""

import os
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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The digits dataset, prepared once for every test file that trains MAE on it (test_train.py
    declares its own, with a text corpus and BEiT's tokenizer as well)."""
    from maskjax.data import image_datasets

    d = tmp_path_factory.mktemp("digits")
    image_datasets.prepare("digits", d)
    return d
