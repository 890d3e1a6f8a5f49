"""Extractive question answering on a BERT or RoBERTa encoder: SQuAD v1.1 (Devlin et al. 2019, Sec. 4.2).

    [CLS] question [SEP] context window [SEP]  ->  Bert  ->  h·W + b  ->  start, end logits  (B, T) each
    loss = ½ (CE(start logits, start) + CE(end logits, end))

BertForQuestionAnswering's head (`qa_outputs`, fresh); windows without the answer point at [CLS].
The encoder comes from `config.init` with its sizes (`text_classify.INIT_FIELDS`), as for
classification. Data and the EM / F1 scoring: `maskjax.data.span_qa`; the `squad` evaluator scores
every held-out question after training.

FLOPs per step = B · 3 · (stack_flops(D, F, L, T) + 2·D·2·T).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from maskjax import losses
from maskjax.errors import ConfigError
from maskjax.methods import Method, no_masking, stack_flops
from maskjax.methods.text_classify import INIT_FIELDS, init_weights
from maskjax.models import bert


def span_logits(
    model: bert.Bert, batch: dict, dropout_key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(start, end) logits (B, T) float32 of batch {"input_ids", "token_type_ids", "attention_mask"}."""
    out = model(
        batch["input_ids"],
        token_type_ids=batch["token_type_ids"],
        attention_mask=batch["attention_mask"],
        dropout_key=dropout_key,
    )
    return out["start_logits"], out["end_logits"]


def loss(
    model: bert.Bert, batch: dict, key: jax.Array, config: Any, *, train: bool, extras: Any = None
) -> tuple[jax.Array, dict]:
    start, end = span_logits(model, batch, key if train else None)
    ones = jnp.ones(start.shape[:1], jnp.float32)
    targets = batch["start_positions"].astype(jnp.int32), batch["end_positions"].astype(jnp.int32)
    start_loss = losses.masked_cross_entropy(start, targets[0], ones)
    end_loss = losses.masked_cross_entropy(end, targets[1], ones)
    value = 0.5 * (start_loss + end_loss)
    both = (jnp.argmax(start, -1) == targets[0]) & (jnp.argmax(end, -1) == targets[1])
    return value, {"loss": value, "span_accuracy": both.astype(jnp.float32).mean()}


def batch_spec(config: Any, model_cfg: bert.BertConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """{"input_ids", "token_type_ids", "attention_mask": (B, T), "start_positions", "end_positions": (B,)}."""
    b, t = config.global_batch_size, config.data.seq_length
    tokens, rows = jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32)
    return {
        "input_ids": tokens,
        "token_type_ids": tokens,
        "attention_mask": tokens,
        "start_positions": rows,
        "end_positions": rows,
    }


def flops(config: Any, model_cfg: bert.BertConfig) -> int:
    c, t = model_cfg, config.data.seq_length
    return config.global_batch_size * 3 * (stack_flops(c.hidden, c.mlp_dim, c.layers, t) + 4 * c.hidden * t)


def validate(config: Any, model_cfg: bert.BertConfig) -> None:
    if not model_cfg.span_head or model_cfg.mlm_head or model_cfg.nsp or model_cfg.num_labels:
        raise ConfigError(
            "a span QA model is the encoder and a start/end head: set model.span_head=True, "
            "model.mlm_head=False, model.nsp=False, model.num_labels=0"
        )
    d = config.data
    if d.seq_length > model_cfg.max_seq_len:
        raise ConfigError(
            f"data.seq_length={d.seq_length} exceeds the model's {model_cfg.max_seq_len} positions"
        )
    if not 0 < d.doc_stride or d.max_query_length + 4 >= d.seq_length:
        raise ConfigError(
            f"need data.doc_stride > 0 and data.max_query_length + 4 < data.seq_length; got "
            f"{d.doc_stride}, {d.max_query_length}, {d.seq_length}"
        )


SPAN_QA = Method(
    name="span_qa",
    model="bert",
    data="span_qa",
    loss=loss,
    batch_spec=batch_spec,
    flops=flops,
    describe_masking=no_masking,
    validate=validate,
    evaluators=("squad",),
    init_weights=init_weights,
    task="finetune",
    init_fields=INIT_FIELDS,
)
