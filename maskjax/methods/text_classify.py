"""Text classification on a BERT or RoBERTa encoder: the GLUE half of Devlin et al. 2019 (Sec. 4.1).

    [CLS] a [SEP] (b [SEP])  ->  Bert  ->  pooled = tanh(h[CLS]·Wp + bp)  ->  Dropout  ->  ·Wc + bc
                             ->  cross-entropy against the label                              (B, C)

Every weight trains; the classifier is fresh, the encoder (and BERT's pooler) come from `config.init`,
a maskjax BERT/RoBERTa workdir or a transformers directory. RoBERTa checkpoints have no pooler: it is
fresh too, as in RobertaForSequenceClassification, whose dense + tanh head it is. The architecture
fields (`INIT_FIELDS`) are read from the init's checkpoint, so one config fine-tunes any size.

Data: `maskjax.data.labelled_text` (records text_a, text_b, label), tokenized with the init's
tokenizer unless data.tokenizer names one.

FLOPs per step = B · 3 · (stack_flops(D, F, L, T) + 2·D² + 2·D·C): the encoder, the pooler, the head.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from maskjax import losses
from maskjax.errors import ConfigError
from maskjax.methods import Method, no_masking, stack_flops
from maskjax.models import bert

# Model fields a checkpoint fixes (its architecture); the rest (heads, dropout, dtype) the config sets.
INIT_FIELDS = (
    "vocab_size", "max_length", "type_vocab_size", "pad_id", "position_offset", "hidden", "layers", "heads",
    "mlp_dim", "layer_norm_eps", "activation", "qkv_bias", "pre_ln",
)  # fmt: skip


def logits(model: bert.Bert, batch: dict, dropout_key: jax.Array | None = None) -> jax.Array:
    """(B, C) float32 class logits of batch {"input_ids", "token_type_ids", "attention_mask"} (B, T)."""
    out = model(
        batch["input_ids"],
        token_type_ids=batch["token_type_ids"],
        attention_mask=batch["attention_mask"],
        dropout_key=dropout_key,
    )
    return out["logits"]


def loss(
    model: bert.Bert, batch: dict, key: jax.Array, config: Any, *, train: bool, extras: Any = None
) -> tuple[jax.Array, dict]:
    labels = batch["label"].astype(jnp.int32)
    scores = logits(model, batch, key if train else None)
    weights = jnp.ones(labels.shape, jnp.float32)
    value = losses.masked_cross_entropy(scores, labels, weights)
    return value, {"loss": value, "accuracy": losses.masked_accuracy(scores, labels, weights)}


def batch_spec(config: Any, model_cfg: bert.BertConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """{"input_ids", "token_type_ids", "attention_mask": (B, T) int32, "label": (B,) int32}."""
    b, t = config.global_batch_size, config.data.seq_length
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
    return {
        "input_ids": tokens,
        "token_type_ids": tokens,
        "attention_mask": tokens,
        "label": jax.ShapeDtypeStruct((b,), jnp.int32),
    }


def flops(config: Any, model_cfg: bert.BertConfig) -> int:
    """Model FLOPs of one step; formula in the module docstring."""
    c, t = model_cfg, config.data.seq_length
    forward = stack_flops(c.hidden, c.mlp_dim, c.layers, t) + 2 * c.hidden**2 + 2 * c.hidden * c.num_labels
    return config.global_batch_size * 3 * forward


def init_weights(family: str, params: dict, model_cfg: bert.BertConfig) -> dict:
    """A BERT or RoBERTa checkpoint's weights as they are: its MLM and NSP heads are reported unused."""
    if family not in ("bert", "roberta"):
        raise ConfigError(f"init: a {family!r} checkpoint has no BERT encoder; give a BERT or RoBERTa one")
    return params


def validate(config: Any, model_cfg: bert.BertConfig) -> None:
    if model_cfg.num_labels < 2:
        raise ConfigError(
            f"model.num_labels must be the number of classes (>= 2); got {model_cfg.num_labels}"
        )
    if model_cfg.mlm_head or model_cfg.nsp or not model_cfg.pooler:
        raise ConfigError(
            "a text classifier is the encoder, its pooler and a classifier: set model.mlm_head=False, "
            "model.nsp=False, model.pooler=True"
        )
    if config.data.seq_length > model_cfg.max_seq_len:
        raise ConfigError(
            f"data.seq_length={config.data.seq_length} exceeds the model's {model_cfg.max_seq_len} positions"
        )


TEXT_CLASSIFICATION = Method(
    name="text_classification",
    model="bert",
    data="labelled_text",
    loss=loss,
    batch_spec=batch_spec,
    flops=flops,
    describe_masking=no_masking,
    validate=validate,
    evaluators=("top1",),
    init_weights=init_weights,
    task="finetune",
    logits=lambda model, batch: logits(model, batch),
    init_fields=INIT_FIELDS,
)
