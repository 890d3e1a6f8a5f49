"""Checkpoint fingerprints: what a restore compares against what the save wrote."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maskjax import checkpoint


def _mix(h: int) -> int:
    """MurmurHash3's 32-bit finalizer, in Python integers."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) % 2**32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) % 2**32
    return h ^ (h >> 16)


def _reference(x: np.ndarray) -> list[int]:
    """The docstring's formula in plain numpy and Python integers: h_k = sum_i mix(b_i ^ mix(i ^ seed_k))
    mod 2**32, b_i the element's bits, seeds 0x9E3779B9 and 0x7F4A7C15."""
    if x.dtype == np.bool_:
        bits = x.astype(np.uint64).ravel()
    else:
        unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
        bits = np.ascontiguousarray(x).view(unsigned).astype(np.uint64).ravel()
    return [
        sum(_mix(b ^ _mix(i ^ seed)) for i, b in enumerate(bits.tolist())) % 2**32
        for seed in (0x9E3779B9, 0x7F4A7C15)
    ]


CASES = {
    "float32": np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32),
    "bfloat16": np.random.default_rng(1).normal(size=(4, 3)).astype(ml_dtypes.bfloat16),
    "float16": np.random.default_rng(2).normal(size=(7,)).astype(np.float16),
    "int32": np.random.default_rng(3).integers(-(2**31), 2**31 - 1, size=(2, 2, 3), dtype=np.int32),
    "uint8": np.random.default_rng(4).integers(0, 256, size=(9,), dtype=np.uint8),
    "bool": np.random.default_rng(5).random((6,)) > 0.5,
    "scalar": np.float32(3.25).reshape(()),
    "empty": np.zeros((0, 4), np.float32),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_fingerprint_is_the_documented_formula(name):
    x = CASES[name]
    finite, sums = checkpoint.fingerprints({"x": jnp.asarray(x)})
    assert finite
    assert sums == {"x": _reference(x)}


@pytest.mark.parametrize("name", ["float32", "bfloat16", "int32", "uint8"])
def test_any_one_flipped_bit_changes_the_fingerprint(name):
    x = CASES[name]
    before = checkpoint.fingerprints({"x": jnp.asarray(x)})[1]["x"]
    rng = np.random.default_rng(7)
    width = 8 * x.dtype.itemsize
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
    for _ in range(20):
        flat = np.ascontiguousarray(x).view(unsigned).ravel().copy()
        i, bit = rng.integers(flat.size), rng.integers(width)
        flat[i] ^= unsigned(1) << unsigned(bit)
        damaged = flat.view(x.dtype).reshape(x.shape)
        after = checkpoint.fingerprints({"x": jnp.asarray(damaged)})[1]["x"]
        assert after[0] != before[0] and after[1] != before[1], (i, bit)  # each sum sees one change


def test_moved_swapped_or_negated_elements_change_the_fingerprint():
    """Damage that keeps the multiset of bits (a shuffled copy) or their plain sum (a value and its
    negation trading places; two halves trading places) must show too."""
    x = np.random.default_rng(9).normal(size=(64, 32)).astype(np.float32)
    x[3, 4], x[40, 1] = 1.5, -1.5
    base = checkpoint.fingerprints({"x": jnp.asarray(x)})[1]["x"]
    swapped = x.copy()
    swapped[3, 4], swapped[40, 1] = x[40, 1], x[3, 4]
    halves = np.concatenate([x[32:], x[:32]])
    rolled = np.roll(x, 1, axis=1)
    for damaged in (swapped, halves, rolled):
        now = checkpoint.fingerprints({"x": jnp.asarray(damaged)})[1]["x"]
        assert now[0] != base[0] and now[1] != base[1]


def test_the_fingerprint_does_not_depend_on_the_mesh():
    """Saved from 8 devices, verified on 1 (or any other mesh): the same integers."""
    x = np.random.default_rng(8).normal(size=(16, 24)).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    placements = [
        jax.device_put(x, jax.devices()[0]),
        jax.device_put(x, NamedSharding(mesh, PartitionSpec("a", "b"))),
        jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, ("a", "b")))),
        jax.device_put(x, NamedSharding(mesh, PartitionSpec())),
    ]
    sums = [checkpoint.fingerprints({"w": p})[1] for p in placements]
    assert all(s == sums[0] for s in sums) and sums[0] == {"w": _reference(x)}


def test_a_non_finite_value_is_reported():
    x = CASES["float32"].copy()
    x[1, 2] = np.inf
    finite, _ = checkpoint.fingerprints({"a": jnp.ones(3), "b": jnp.asarray(x), "n": jnp.arange(4)})
    assert not finite
    assert checkpoint.fingerprints({"a": jnp.ones(3), "n": jnp.arange(4)})[0]


def test_paths_name_the_nested_arrays():
    tree = {"encoder": {"layers": [jnp.ones(2), jnp.zeros(3)]}, "step": jnp.int32(4)}
    _, sums = checkpoint.fingerprints(tree)
    assert sorted(sums) == ["encoder/layers/0", "encoder/layers/1", "step"]
