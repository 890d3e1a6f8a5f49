"""A classifier after training: top-1 over the whole held-out split (every image, none dropped)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx


def top1(trainer: Any, params: dict, config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
    """Top-1 accuracy of the trained classifier on every image of `data.eval_split` (eval transform).

    The last batch is padded to the batch size, so one program serves every batch; padding rows are
    not counted."""
    from maskjax.data import loaders

    source, transform = loaders.source_and_transform(config, "eval")
    model = nnx.merge(trainer.graphdef, params)
    predict = jax.jit(lambda m, x: jnp.argmax(m(x), axis=-1))
    size, total, correct = config.global_batch_size, len(source), 0
    for start in range(0, total, size):
        rows = [transform(source[i]) for i in range(start, min(start + size, total))]
        images = np.stack([r["image"] for r in rows])
        labels = np.array([r["label"] for r in rows])
        padded = np.concatenate([images, np.zeros((size - len(rows), *images.shape[1:]), images.dtype)])
        correct += int((np.asarray(predict(model, padded))[: len(rows)] == labels).sum())
    accuracy = correct / max(total, 1)
    print(
        f"held-out top-1: {accuracy:.4f} ({correct}/{total} images of {config.data.dataset} "
        f"{config.data.eval_split})",
        flush=True,
    )
    return {"top1": accuracy, "eval_images": total}
