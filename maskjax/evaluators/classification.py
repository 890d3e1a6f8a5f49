"""A classifier after training: top-1 and F1 over the whole held-out split (every example, none dropped)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx


def f1_scores(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) F1 of each class: 2·TP / (2·TP + FP + FN), 0 for a class never predicted nor present."""
    scores = np.zeros(num_classes)
    for c in range(num_classes):
        tp = np.sum((predicted == c) & (labels == c))
        wrong = np.sum((predicted == c) != (labels == c))
        scores[c] = 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0
    return scores


def top1(trainer: Any, params: dict, config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
    """Top-1 accuracy and macro-F1 of the trained classifier on every example of `data.eval_split`
    (its evaluation transform); with two classes also the F1 of class 1, the rare "positive" class of
    one-against-the-rest sets such as Reuters grain, where accuracy says little.

    The last batch is padded to the batch size, so one program serves every batch; padding rows are
    not counted."""
    from maskjax.data import loaders

    source, transform = loaders.source_and_transform(config, "eval")
    model = nnx.merge(trainer.graphdef, params)
    scores = jax.jit(trainer.method.logits)
    size, total = config.global_batch_size, len(source)
    predicted, labels = [], []
    for start in range(0, total, size):
        rows = [transform(source[i]) for i in range(start, min(start + size, total))]
        batch = {}
        for key in rows[0]:
            if key == "label":
                continue
            x = np.stack([r[key] for r in rows])
            batch[key] = np.concatenate([x, np.zeros((size - len(rows), *x.shape[1:]), x.dtype)])
        logits = np.asarray(scores(model, batch))
        predicted.append(logits[: len(rows)].argmax(-1))
        labels.append(np.array([r["label"] for r in rows]))
    predicted, labels = np.concatenate(predicted), np.concatenate(labels)
    num_classes = logits.shape[-1]
    f1 = f1_scores(predicted, labels, num_classes)
    correct = int((predicted == labels).sum())
    accuracy = correct / max(total, 1)
    out = {"top1": accuracy, "macro_f1": float(f1.mean()), "eval_examples": total}
    what = config.data.get("dataset")
    line = f"held-out top-1: {accuracy:.4f} ({correct}/{total} of {what} {config.data.eval_split})"
    line += f", macro-F1 {f1.mean():.4f}"
    if num_classes == 2:
        out["f1"] = float(f1[1])
        line += f", F1 of class 1: {f1[1]:.4f} ({int((labels == 1).sum())} in the split)"
    print(line, flush=True)
    return out
