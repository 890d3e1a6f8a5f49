"""Losses and metrics of the five objectives, always computed in float32.

Every loss is a weighted mean over *real* predictions only: padding slots of a
fixed-size prediction buffer (BERT's `max_predictions_per_seq`, BEiT's masked
patches, GPT's document ends) carry weight 0. A batch without a single real
prediction gives loss 0, not 0/0 = NaN.

  BERT / RoBERTa MLM   masked_cross_entropy(logits at masked positions, original ids, weights)
  GPT next token       masked_cross_entropy(logits, next ids, weights)
  BEiT                 masked_cross_entropy(logits at masked patches, visual-token ids, weights)
  MAE                  mae_loss(predicted pixels, target pixels, mask, norm_pix)
  BERT NSP             nsp_loss(logits, is_random_next)
  classification       soft_cross_entropy(logits, mixed / smoothed targets)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Σ w·v / Σ w, and 0 when Σ w = 0."""
    weights = weights.astype(jnp.float32)
    total = weights.sum()
    return jnp.where(total > 0, (values * weights).sum() / jnp.maximum(total, 1e-9), 0.0)


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean of −log softmax(logits)[target] over positions with weight > 0.

    logits (..., V) in any dtype, targets (...) int, weights (...) float.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return weighted_mean(nll, weights)


def masked_accuracy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Fraction of weighted positions where argmax(logits) == target (0 if none)."""
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return weighted_mean(correct, weights)


def normalized_pixels(target: jax.Array, eps: float = 1e-6) -> jax.Array:
    """MAE's `norm_pix_loss` target: each patch normalised by its own mean and std.

    target (B, N, P) pixels of each patch. As in the MAE reference code the
    variance is the unbiased one (He et al. 2022, Sec. 3 "Reconstruction target").
    """
    target = target.astype(jnp.float32)
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    return (target - mean) / jnp.sqrt(var + eps)


def mae_loss(pred: jax.Array, target: jax.Array, mask: jax.Array, norm_pix: bool = False) -> jax.Array:
    """Mean squared error per patch, averaged over the masked (removed) patches only.

    pred, target (B, N, P); mask (B, N), 1 = removed. The loss on visible
    patches is not computed into the objective (He et al. 2022, Sec. 3).
    """
    if norm_pix:
        target = normalized_pixels(target)
    per_patch = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)).mean(-1)
    return weighted_mean(per_patch, mask)


def nsp_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Next-sentence prediction: 2-way softmax cross-entropy; labels (B,), 1 = random next."""
    return masked_cross_entropy(logits, labels, jnp.ones(labels.shape, jnp.float32))


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of −Σ_k t_k·log softmax(logits)_k; logits, targets (B, K), targets sum to 1."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -(targets.astype(jnp.float32) * logp).sum(-1).mean()
