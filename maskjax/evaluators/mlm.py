"""Masked language models after training: held-out masked-token accuracy beside the unigram baseline.

The baseline always predicts the most frequent non-special token of the training data, so
"better than the baseline" means the model reads the context.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from maskjax import losses
from maskjax.methods import bert as bert_method


def _accuracy(model: Any, batch: dict, key: jax.Array, masking_cfg: Any, top_token: int) -> dict:
    m = bert_method.mask(key, batch, model.cfg.vocab_size, masking_cfg)
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


def unigram_baseline(
    trainer: Any, params: dict, config: ml_collections.ConfigDict, workdir: epath.Path
) -> dict:
    """Held-out masked-token accuracy and the always-the-most-frequent-token baseline's."""
    from maskjax.data import loaders

    m = config.masking
    train_ids = loaders.first_batches(config, "train", 8)["input_ids"]
    counts = np.bincount(train_ids.ravel(), minlength=trainer.model_cfg.vocab_size)
    counts[list(m.special_ids) + [m.pad_id, m.mask_id]] = 0
    top_token = int(counts.argmax())
    batch = loaders.first_batches(config, "eval", config.eval_batches)
    model = nnx.merge(trainer.graphdef, params)
    key = jax.random.fold_in(jax.random.key(config.seed), 2)  # a stream of its own
    out = jax.jit(lambda mdl, b, k: _accuracy(mdl, b, k, m, top_token))(model, batch, key)
    result = {
        "eval_masked_token_accuracy": float(out["mlm_accuracy"]),
        "unigram_baseline_accuracy": float(out["unigram_accuracy"]),
    }
    print(
        f"held-out masked-token accuracy: {result['eval_masked_token_accuracy']:.4f}   "
        f"unigram-frequency baseline: {result['unigram_baseline_accuracy']:.4f}",
        flush=True,
    )
    return result
