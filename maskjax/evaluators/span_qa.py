"""Extractive QA after training: exact match and F1 (SQuAD v1.1's) over every held-out question."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx


def squad(trainer: Any, params: dict, config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
    """EM and F1 (percent) of the best span of every question of `data.eval_split` over all its windows
    (`maskjax.data.span_qa.best_spans`); writes WORKDIR/predictions.json ({question id: answer})."""
    import json

    from maskjax.data import loaders, span_qa
    from maskjax.methods.span_qa import span_logits

    data = loaders.qa_windows(config, "eval")
    model = nnx.merge(trainer.graphdef, params)
    run = jax.jit(span_logits)
    size, starts, ends = config.global_batch_size, [], []
    for first in range(0, len(data), size):
        rows = [data[i] for i in range(first, min(first + size, len(data)))]
        batch = {}
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            x = np.stack([r[key] for r in rows])
            batch[key] = np.concatenate([x, np.zeros((size - len(rows), x.shape[1]), x.dtype)])
        s, e = run(model, batch)
        starts.append(np.asarray(s)[: len(rows)])
        ends.append(np.asarray(e)[: len(rows)])
    predictions = span_qa.best_spans(
        data, np.concatenate(starts), np.concatenate(ends), max_answer=config.data.max_answer_length
    )
    result = span_qa.scores(predictions, data.examples)
    ids = [e.id for e in data.examples]
    (workdir / "predictions.json").write_text(
        json.dumps({ids[i]: p for i, p in predictions.items()}, indent=1)
    )
    print(
        f"held-out exact match {result['exact_match']:.2f}, F1 {result['f1']:.2f} ({len(data.examples)} "
        f"questions of {config.data.dataset} {config.data.eval_split}, {len(data)} windows)",
        flush=True,
    )
    return {**result, "eval_questions": len(data.examples)}
