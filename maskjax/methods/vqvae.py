"""The visual tokenizer BEiT predicts: a VQ-VAE (van den Oord et al. 2017), stage one of BEiT.

loss = MSE(reconstruction, image) + ‖sg[z_e] − e‖² + β‖z_e − sg[e]‖²    (models.beit.vq_loss)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from maskjax.models import beit


def loss(
    model: beit.VqTokenizer, batch: dict, key: jax.Array, config: Any, *, train: bool, extras: Any = None
) -> tuple[jax.Array, dict]:
    value, metrics = beit.vq_loss(model, batch["image"])
    return value, {"loss": value, **metrics}


def batch_spec(config: Any, model_cfg: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the image loaders produce: {"image": (B, H, W, C) float32, normalised}."""
    size, channels = model_cfg.image_size, model_cfg.channels
    return {"image": jax.ShapeDtypeStruct((config.global_batch_size, size, size, channels), jnp.float32)}


def report(trainer: Any, state: dict, config: Any, workdir: epath.Path) -> None:
    """Nothing beyond the eval metrics (reconstruction, codebook usage) already in metrics.jsonl."""
