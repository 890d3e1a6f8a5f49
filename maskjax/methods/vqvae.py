"""The visual tokenizer BEiT predicts: a VQ-VAE (van den Oord et al. 2017), stage one of BEiT.

loss = MSE(reconstruction, image) + ‖sg[z_e] − e‖² + β‖z_e − sg[e]‖²    (models.beit.vq_loss)
"""

from __future__ import annotations

from typing import Any

import jax
from etils import epath

from maskjax.methods import image_batch_spec
from maskjax.models import beit


def loss(
    model: beit.VqTokenizer, batch: dict, key: jax.Array, config: Any, *, train: bool, extras: Any = None
) -> tuple[jax.Array, dict]:
    value, metrics = beit.vq_loss(model, batch["image"])
    return value, {"loss": value, **metrics}


batch_spec = image_batch_spec  # the global batch's shapes, for ahead-of-time compiles


def report(trainer: Any, state: dict, config: Any, workdir: epath.Path) -> None:
    """Nothing beyond the eval metrics (reconstruction, codebook usage) already in metrics.jsonl."""
