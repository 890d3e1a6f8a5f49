"""BEiT (Bao et al. 2022): masked image modeling over discrete visual tokens.

targets  the visual tokenizer's codes of the *uncorrupted* image, one per patch
         (BEiT used DALL-E's dVAE; here a VQ-VAE trained by `configs/demo/vqvae.py`
         and named by `masking.tokenizer_workdir`)
masking  masking.beit_block_mask: blocks of >= 16 patches, aspect in [0.3, 1/0.3],
         exactly `num_masked` patches per image (75 of 196 at 224/16, Sec. 2.3)
model    models.beit.Beit: [MASK] embedding at masked patches; logits only there
loss     cross-entropy of the visual-token ids at the masked patches
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from maskjax import checkpoint, losses, masking, models
from maskjax.models import beit


@functools.cache
def _tokenizer(workdir: str) -> tuple[Any, Any, dict]:
    family, cfg, params = checkpoint.load_params(workdir)
    if family != "vqvae":
        raise ValueError(f"masking.tokenizer_workdir={workdir} holds a {family!r} checkpoint, not 'vqvae'")
    graphdef = nnx.split(nnx.eval_shape(lambda: models.build(family, cfg)))[0]
    return graphdef, cfg, params


def extras(config: Any) -> dict:
    """The frozen tokenizer's parameters, passed into the jitted step (never trained)."""
    return {"tokenizer": _tokenizer(config.masking.tokenizer_workdir)[2]}


def masked_positions(mask: jax.Array, count: int) -> jax.Array:
    """(B, N) bool with exactly `count` True per row -> their indices (B, count), ascending."""
    return jnp.argsort(~mask, axis=-1, stable=True)[:, :count].astype(jnp.int32)


def loss(
    model: beit.Beit, batch: dict, key: jax.Array, config: Any, *, train: bool, extras: Any = None
) -> tuple[jax.Array, dict]:
    cfg, m = model.cfg, config.masking
    images = batch["image"]
    graphdef, _, _ = _tokenizer(m.tokenizer_workdir)
    codes = jax.lax.stop_gradient(nnx.merge(graphdef, extras["tokenizer"]).encode(images))  # (B, N)
    k_mask, k_drop = jax.random.split(key)
    mask = masking.beit_block_mask(
        k_mask, images.shape[0], cfg.grid, num_masked=m.num_masked, min_block=m.get("min_block", 16)
    )
    positions = masked_positions(mask, m.num_masked)
    out = model(images, mask, masked_positions=positions, dropout_key=k_drop if train else None)
    targets = jnp.take_along_axis(codes, positions, axis=1)
    weights = jnp.ones(targets.shape, jnp.float32)
    value = losses.masked_cross_entropy(out["logits"], targets, weights)
    return value, {"loss": value, "accuracy": losses.masked_accuracy(out["logits"], targets, weights)}


def report(trainer: Any, state: dict, config: Any, workdir: Path) -> None:
    """Nothing beyond the eval metrics (visual-token loss and accuracy) already in metrics.jsonl."""
