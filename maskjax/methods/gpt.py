"""GPT-2 (Radford et al. 2019): next-token prediction over packed documents.

masking  masking.causal_lm: targets shifted by one, weights 0 where the next
         token belongs to another document or is padding; attention causal
         and confined to the document (segment ids)
model    models.gpt.Gpt
loss     cross-entropy over real next tokens; perplexity = exp(loss)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from maskjax import losses, masking
from maskjax.models import gpt


def loss(
    model: gpt.Gpt, batch: dict, key: jax.Array, config: Any, *, train: bool, extras: Any = None
) -> tuple[jax.Array, dict]:
    segments = batch["segment_ids"]  # document number within the packed row; 0 = padding
    c = masking.causal_lm(batch["input_ids"], segments, valid=segments > 0)
    out = model(c.inputs, attention_mask=c.attention_mask, dropout_key=key if train else None)
    value = losses.masked_cross_entropy(out["logits"], c.targets, c.weights)
    return value, {
        "loss": value,
        "accuracy": losses.masked_accuracy(out["logits"], c.targets, c.weights),
        "perplexity": jnp.exp(value),
    }


def batch_spec(config: Any, model_cfg: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the text loaders produce for layout "gpt": packed rows and their document ids."""
    shape = (config.global_batch_size, config.data.seq_length)
    return {
        "input_ids": jax.ShapeDtypeStruct(shape, jnp.int32),
        "segment_ids": jax.ShapeDtypeStruct(shape, jnp.int32),
    }


def report(trainer: Any, state: dict, config: Any, workdir: epath.Path) -> None:
    """Nothing beyond the eval metrics (loss, perplexity) already in metrics.jsonl."""
