"""GPT-2 (Radford et al. 2019): next-token prediction over packed documents.

masking  masking.causal_lm: targets shifted by one, every real next token a target (the
         first token after <|endoftext|> too), padding weight 0; attention causal and
         confined to the document (segment ids)
model    models.gpt.Gpt
loss     cross-entropy over real next tokens; perplexity = exp(loss)

FLOPs per step = B · 3 · (stack_flops(D, F, L, T) + 2·T·D·V): the tied output projection runs at
every position.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maskjax import losses, masking
from maskjax.methods import Method, stack_flops
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
        "loss_terms": {"next_token": (value, c.weights.sum())},  # real next tokens vary per batch
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


def example_batch(config: Any, model_cfg: gpt.GptConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows of random tokens, each one document (segment 1; 0 would be padding)."""
    shape = (config.global_batch_size, config.data.seq_length)
    return {
        "input_ids": rng.integers(0, model_cfg.vocab_size, shape, dtype=np.int32),
        "segment_ids": np.ones(shape, np.int32),
    }


def flops(config: Any, model_cfg: gpt.GptConfig) -> int:
    """Model FLOPs of one train step; formula in the module docstring."""
    c, t = model_cfg, config.data.seq_length
    forward = stack_flops(c.hidden, c.mlp_dim, c.layers, t) + 2 * t * c.hidden * c.vocab_size
    return config.global_batch_size * 3 * forward


def describe_masking(config: Any, model_cfg: gpt.GptConfig) -> dict[str, Any]:
    return {"strategy": "causal", "ratio": None, "max_predictions": None}  # no masking: the next token


GPT = Method(
    name="gpt",
    model="gpt",
    data="text",
    loss=loss,
    batch_spec=batch_spec,
    flops=flops,
    describe_masking=describe_masking,
    evaluators=("greedy_sample_and_perplexity",),
    example_batch=example_batch,
)
