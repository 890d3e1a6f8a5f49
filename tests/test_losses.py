"""Losses against PyTorch's own implementations, and the edge cases that make NaNs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax import losses

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _random(shape, seed, scale=3.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def test_masked_cross_entropy_matches_torch_with_ignored_slots():
    rng = np.random.default_rng(0)
    logits = _random((4, 7, 11), 1)
    targets = rng.integers(0, 11, size=(4, 7))
    weights = (rng.random((4, 7)) < 0.6).astype(np.float32)
    weights[0, 0] = 1.0
    ignored = np.where(weights > 0, targets, -100)
    expected = F.cross_entropy(
        torch.from_numpy(logits).reshape(-1, 11), torch.from_numpy(ignored).reshape(-1), ignore_index=-100
    ).item()
    got = losses.masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_masked_accuracy_counts_only_weighted_positions():
    logits = _random((3, 5, 6), 2)
    targets = np.argmax(logits, -1).copy()
    targets[:, 1] = (targets[:, 1] + 1) % 6  # every position 1 is wrong
    weights = np.zeros((3, 5), np.float32)
    weights[:, :2] = 1.0  # half of the weighted positions are wrong
    np.testing.assert_allclose(float(losses.masked_accuracy(logits, targets, weights)), 0.5)
    weights[:, 1] = 0.0
    np.testing.assert_allclose(float(losses.masked_accuracy(logits, targets, weights)), 1.0)


def test_no_real_prediction_gives_zero_not_nan():
    logits = jnp.asarray(_random((2, 3, 5), 3))
    zeros = jnp.zeros((2, 3))
    targets = jnp.zeros((2, 3), jnp.int32)
    assert float(losses.masked_cross_entropy(logits, targets, zeros)) == 0.0
    assert float(losses.masked_accuracy(logits, targets, zeros)) == 0.0
    pred = jnp.asarray(_random((2, 4, 12), 4))
    assert float(losses.mae_loss(pred, pred + 1, jnp.zeros((2, 4)))) == 0.0
    grads = jax.grad(lambda x: losses.masked_cross_entropy(x, targets, zeros))(logits)
    assert np.isfinite(np.asarray(grads)).all()


def test_losses_are_float32_for_bfloat16_inputs():
    logits = _random((2, 3, 50), 5, scale=10.0)
    targets = np.random.default_rng(5).integers(0, 50, size=(2, 3))
    weights = np.ones((2, 3), np.float32)
    low = losses.masked_cross_entropy(jnp.asarray(logits, jnp.bfloat16), targets, weights)
    high = losses.masked_cross_entropy(
        jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32), targets, weights
    )
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(float(low), float(high), rtol=1e-6)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_matches_reference_formula_in_torch(norm_pix):
    rng = np.random.default_rng(6)
    pred, target = _random((3, 9, 12), 7), _random((3, 9, 12), 8) + 2.0
    mask = (rng.random((3, 9)) < 0.75).astype(np.float32)
    # MAE's forward_loss written with torch ops: torch.var is unbiased by default.
    t = torch.from_numpy(target)
    if norm_pix:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((torch.from_numpy(pred) - t) ** 2).mean(-1)
    expected = ((per_patch * torch.from_numpy(mask)).sum() / torch.from_numpy(mask).sum()).item()
    got = losses.mae_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), norm_pix=norm_pix)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_nsp_loss_matches_torch():
    logits = _random((8, 2), 9)
    labels = np.random.default_rng(9).integers(0, 2, size=8)
    expected = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    np.testing.assert_allclose(float(losses.nsp_loss(logits, labels)), expected, rtol=1e-5)
