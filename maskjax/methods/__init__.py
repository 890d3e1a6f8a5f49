"""One short module per family: its masking strategy + model + loss, and nothing else.

Each module provides
  loss(model, batch, key, config, *, train, extras) -> (loss, metrics)   pure; runs inside the jitted step
  report(trainer, state, config, workdir)       after the last step: baselines, figures
and optionally
  extras(config) -> pytree                      frozen inputs of the loss (BEiT: the tokenizer's params)
This is the place a paper reader looks: the five differ only where the papers differ.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp

_MODULES = {
    "bert": "maskjax.methods.bert",
    "roberta": "maskjax.methods.bert",
    "gpt": "maskjax.methods.gpt",
    "mae": "maskjax.methods.mae",
    "beit": "maskjax.methods.beit",
    "vqvae": "maskjax.methods.vqvae",
}


def get(family: str) -> ModuleType:
    if family not in _MODULES:
        raise ValueError(f"family must be one of {sorted(_MODULES)}; got {family!r}")
    return importlib.import_module(_MODULES[family])


def image_batch_spec(config: Any, model_cfg: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the image loaders produce: {"image": (B, H, W, C) float32, normalised}."""
    size, channels = model_cfg.image_size, model_cfg.channels
    return {"image": jax.ShapeDtypeStruct((config.global_batch_size, size, size, channels), jnp.float32)}
