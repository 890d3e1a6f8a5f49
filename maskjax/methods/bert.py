"""BERT (Devlin et al. 2019) and RoBERTa (Liu et al. 2019): masked language modeling.

masking  15% of the tokens, 80% [MASK] / 10% random / 10% kept, at most
         `max_predictions` per sequence; drawn on device from fold_in(seed, step),
         so every pass over a sequence sees a fresh mask (RoBERTa's dynamic masking).
         strategy: "bert" (tokens), "whole_word" (BERT 2019), "span" (SpanBERT), "roberta";
         for ablations "random" (round(mask_prob·T) tokens, all [MASK], no 80/10/10) and
         "contiguous" (one run of round(mask_prob·T) tokens, all [MASK])
model    models.bert.Bert: vocabulary logits only at the gathered masked positions
loss     cross-entropy on masked positions (+ next-sentence prediction for BERT)
metrics  mlm_accuracy (masked-token top-1), for every strategy alike

FLOPs per step = B · 3 · (stack_flops(D, F, L, T) + P·(2D² + 2D·V) [+ 2D² pooler] [+ 4D NSP]),
with P the prediction slots per row (the head's transform and vocabulary projection run there only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maskjax import losses, masking
from maskjax.errors import ConfigError
from maskjax.methods import Method, stack_flops
from maskjax.models import bert

STRATEGIES = ("bert", "whole_word", "span", "roberta", "random", "contiguous")
_ABLATIONS = ("random", "contiguous")  # the simple strategies: a fixed count, every chosen token [MASK]


def num_predictions(m: Any, seq_length: int) -> int:
    """P, the prediction slots per row: `max_predictions`, or the ablations' fixed count."""
    if m.strategy in _ABLATIONS:
        return max(1, round(m.mask_prob * seq_length))
    return m.max_predictions


def mask(key: jax.Array, batch: dict, vocab_size: int, m: Any) -> masking.MlmMask:
    """The config's masking strategy applied to batch["input_ids"] (B, T)."""
    common = dict(
        vocab_size=vocab_size,
        mask_id=m.mask_id,
        special_ids=tuple(m.special_ids),
        pad_id=m.pad_id,
        max_predictions=m.max_predictions,
        mask_prob=m.mask_prob,
    )
    ids = batch["input_ids"]
    if m.strategy == "bert":
        return masking.bert_mlm(key, ids, **common)
    if m.strategy == "whole_word":
        return masking.whole_word_mlm(key, ids, batch["word_starts"], **common)
    if m.strategy == "span":
        return masking.span_mlm(key, ids, batch["word_starts"], **common)
    if m.strategy == "roberta":
        return masking.roberta_mlm(key, ids, **common)
    if m.strategy in _ABLATIONS:
        real = ids != m.pad_id
        candidates = real & ~jnp.isin(ids, jnp.asarray(tuple(m.special_ids), ids.dtype))
        count = num_predictions(m, ids.shape[1])
        if m.strategy == "random":
            return masking.random_token_mask(
                key, ids, candidates, ratio=count / ids.shape[1], mask_id=m.mask_id
            )
        return masking.contiguous_block_mask(key, ids, candidates, length=count, mask_id=m.mask_id)
    raise ValueError(f"masking.strategy must be one of {STRATEGIES}; got {m.strategy!r}")


def loss(
    model: bert.Bert, batch: dict, key: jax.Array, config: Any, *, train: bool, extras: Any = None
) -> tuple[jax.Array, dict]:
    k_mask, k_drop = jax.random.split(key)
    m = mask(k_mask, batch, model.cfg.vocab_size, config.masking)
    out = model(
        m.inputs,
        token_type_ids=batch.get("token_type_ids"),
        attention_mask=batch["attention_mask"],
        masked_positions=m.positions,
        dropout_key=k_drop if train else None,
    )
    mlm = losses.masked_cross_entropy(out["mlm_logits"], m.targets, m.weights)
    metrics = {
        "mlm_loss": mlm,
        "mlm_accuracy": losses.masked_accuracy(out["mlm_logits"], m.targets, m.weights),
    }
    total = mlm
    terms = {"mlm": (mlm, m.weights.sum())}  # a mean over a varying number of masked tokens
    if model.cfg.nsp:
        labels = batch["next_sentence_label"]
        nsp = losses.nsp_loss(out["nsp_logits"], labels)
        ones = jnp.ones(labels.shape, jnp.float32)
        metrics.update(nsp_loss=nsp, nsp_accuracy=losses.masked_accuracy(out["nsp_logits"], labels, ones))
        total = total + nsp
        terms["nsp"] = (nsp, ones.sum())
    metrics.update(loss=total, loss_terms=terms)
    return total, metrics


def batch_spec(config: Any, model_cfg: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the text loaders produce for layout "bert" (with NSP pairs) or "roberta"."""
    b, t = config.global_batch_size, config.data.seq_length
    vec = lambda dtype: jax.ShapeDtypeStruct((b, t), dtype)
    spec = {"input_ids": vec(jnp.int32), "attention_mask": vec(jnp.int32), "word_starts": vec(jnp.bool_)}
    spec["special_tokens_mask"] = vec(jnp.bool_)
    if config.data.layout == "bert":
        spec["token_type_ids"] = vec(jnp.int32)
        spec["next_sentence_label"] = jax.ShapeDtypeStruct((b,), jnp.int32)
    return spec


def example_batch(config: Any, model_cfg: bert.BertConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Full rows without padding: the first special id, random ordinary tokens, the last special id
    at the end (and, for BERT's sentence pairs, in the middle, segment 1 after it); 3 words in 4 start
    a word (whole-word masking has words to pick)."""
    b, t, m = config.global_batch_size, config.data.seq_length, config.masking
    lowest = max(m.mask_id, m.pad_id, *m.special_ids) + 1  # the ordinary tokens, in the usual layouts
    ids = rng.integers(lowest, model_cfg.vocab_size, (b, t), dtype=np.int32)
    ends = [0, t - 1] + ([t // 2] if config.data.layout == "bert" else [])
    special = np.zeros((b, t), bool)
    special[:, ends] = True
    ids[:, 0], ids[:, ends[1:]] = m.special_ids[0], m.special_ids[-1]
    batch = {
        "input_ids": ids,
        "attention_mask": np.ones((b, t), np.int32),
        "word_starts": (rng.random((b, t)) < 0.75) | special,
        "special_tokens_mask": special,
    }
    if config.data.layout == "bert":
        batch["token_type_ids"] = np.broadcast_to(np.arange(t) > t // 2, (b, t)).astype(np.int32)
        batch["next_sentence_label"] = rng.integers(0, 2, (b,), dtype=np.int32)
    return batch


def savings(config: Any, model_cfg: bert.BertConfig) -> dict[str, dict[str, Any]]:
    """The vocabulary projection at every position, as a model that does not gather the masked ones
    computes it: P = T prediction slots (the fixed-count ablation strategies have no such knob)."""
    if config.masking.strategy in _ABLATIONS:
        return {}
    return {"vocabulary logits at every position": {"masking.max_predictions": config.data.seq_length}}


def flops(config: Any, model_cfg: bert.BertConfig) -> int:
    """Model FLOPs of one train step; formula in the module docstring."""
    c, t, d = model_cfg, config.data.seq_length, model_cfg.hidden
    forward = stack_flops(d, c.mlp_dim, c.layers, t) + num_predictions(config.masking, t) * (
        2 * d * d + 2 * d * c.vocab_size
    )
    forward += 2 * d * d if c.pooler else 0
    forward += 2 * d * 2 if c.nsp else 0
    return config.global_batch_size * 3 * forward


def describe_masking(config: Any, model_cfg: bert.BertConfig) -> dict[str, Any]:
    m = config.masking
    return {
        "strategy": m.strategy,
        "ratio": m.mask_prob,
        "max_predictions": num_predictions(m, config.data.seq_length),
    }


def validate(config: Any, model_cfg: bert.BertConfig) -> None:
    m = config.get("masking")
    if m is None:
        raise ConfigError("masking is missing from the config (strategy, mask_prob, max_predictions, ...)")
    if m.get("strategy") not in STRATEGIES:
        raise ConfigError(f"masking.strategy must be one of {list(STRATEGIES)}; got {m.get('strategy')!r}")
    for field in ("mask_prob", "max_predictions", "mask_id", "pad_id", "special_ids"):
        if field not in m:
            raise ConfigError(f"masking.{field} is missing from the config")
    if not isinstance(m.mask_prob, int | float) or not 0.0 < m.mask_prob < 1.0:
        raise ConfigError(f"masking.mask_prob must be in (0, 1); got {m.mask_prob!r}")
    seq = config.data.seq_length
    p = num_predictions(m, seq)
    if not isinstance(p, int) or not 1 <= p <= seq:
        raise ConfigError(f"masking.max_predictions must be in [1, data.seq_length={seq}]; got {p!r}")


def features(model: bert.Bert, batch: dict) -> jax.Array:
    """(B, D): the last hidden states averaged over the real tokens (the frozen-feature probes)."""
    out = model(
        batch["input_ids"], token_type_ids=batch.get("token_type_ids"), attention_mask=batch["attention_mask"]
    )
    real = batch["attention_mask"].astype(jnp.float32)[..., None]
    return (out["hidden"].astype(jnp.float32) * real).sum(1) / jnp.maximum(real.sum(1), 1.0)


BERT = Method(
    name="bert",
    model="bert",
    data="text",
    loss=loss,
    batch_spec=batch_spec,
    flops=flops,
    describe_masking=describe_masking,
    validate=validate,
    evaluators=("mlm_unigram_baseline", "fill_mask_samples"),
    features=features,
    example_batch=example_batch,
    savings=savings,
)
# RoBERTa: the same objective without NSP (its model config says so); the data layout differs.
ROBERTA = dataclasses.replace(BERT, name="roberta", model="roberta")
