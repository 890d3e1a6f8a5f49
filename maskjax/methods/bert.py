"""BERT (Devlin et al. 2019) and RoBERTa (Liu et al. 2019): masked language modeling.

masking  15% of the tokens, 80% [MASK] / 10% random / 10% kept, at most
         `max_predictions` per sequence; drawn on device from fold_in(seed, step),
         so every pass over a sequence sees a fresh mask (RoBERTa's dynamic masking).
         strategy: "bert" (tokens), "whole_word" (BERT 2019), "span" (SpanBERT), "roberta"
model    models.bert.Bert: vocabulary logits only at the gathered masked positions
loss     cross-entropy on masked positions (+ next-sentence prediction for BERT)
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from maskjax import losses, masking
from maskjax.config import MLM_STRATEGIES
from maskjax.models import bert

STRATEGIES = MLM_STRATEGIES


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
    if model.cfg.nsp:
        labels = batch["next_sentence_label"]
        nsp = losses.nsp_loss(out["nsp_logits"], labels)
        ones = jnp.ones(labels.shape, jnp.float32)
        metrics.update(nsp_loss=nsp, nsp_accuracy=losses.masked_accuracy(out["nsp_logits"], labels, ones))
        total = total + nsp
    metrics["loss"] = total
    return total, metrics


def batch_spec(config: Any, model_cfg: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the text loaders produce for layout "bert" (with NSP pairs) or "roberta"."""
    b, t = config.global_batch_size, config.data.seq_length
    vec = lambda dtype: jax.ShapeDtypeStruct((b, t), dtype)
    spec = {"input_ids": vec(jnp.int32), "attention_mask": vec(jnp.int32), "word_starts": vec(jnp.bool_)}
    spec["special_tokens_mask"] = vec(jnp.bool_)
    if config.data.get("layout", config.family) == "bert":
        spec["token_type_ids"] = vec(jnp.int32)
        spec["next_sentence_label"] = jax.ShapeDtypeStruct((b,), jnp.int32)
    return spec


def _eval_accuracy(model: bert.Bert, batch: dict, key: jax.Array, masking_cfg: Any, top_token: int) -> dict:
    m = mask(key, batch, model.cfg.vocab_size, masking_cfg)
    out = model(
        m.inputs,
        token_type_ids=batch.get("token_type_ids"),
        attention_mask=batch["attention_mask"],
        masked_positions=m.positions,
    )
    baseline = jnp.full(m.targets.shape, top_token)
    return {
        "mlm_accuracy": losses.masked_accuracy(out["mlm_logits"], m.targets, m.weights),
        "unigram_accuracy": losses.weighted_mean((baseline == m.targets).astype(jnp.float32), m.weights),
    }


def report(trainer: Any, state: dict, config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
    """Held-out masked-token accuracy beside the unigram baseline (always the most frequent token)."""
    from maskjax.data import loaders

    train_ids = loaders.first_batches(config, "train", 8)["input_ids"]
    counts = np.bincount(train_ids.ravel(), minlength=trainer.model_cfg.vocab_size)
    counts[list(config.masking.special_ids) + [config.masking.pad_id, config.masking.mask_id]] = 0
    top_token = int(counts.argmax())
    batch = loaders.first_batches(config, "eval", config.get("eval_batches", 4))
    model = nnx.merge(trainer.graphdef, jax.device_get(state["params"]))
    key = jax.random.fold_in(jax.random.key(config.seed), 2)  # a stream of its own
    out = jax.jit(lambda mdl, b, k: _eval_accuracy(mdl, b, k, config.masking, top_token))(model, batch, key)
    result = {
        "eval_masked_token_accuracy": float(out["mlm_accuracy"]),
        "unigram_baseline_accuracy": float(out["unigram_accuracy"]),
    }
    (epath.Path(workdir) / "report.json").write_text(json.dumps(result, indent=2))
    print(
        f"held-out masked-token accuracy: {result['eval_masked_token_accuracy']:.4f}   "
        f"unigram-frequency baseline: {result['unigram_baseline_accuracy']:.4f}",
        flush=True,
    )
    return result
