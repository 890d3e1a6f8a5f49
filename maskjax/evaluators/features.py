"""Representation quality during pre-training: k-NN and ridge probes on frozen features.

`config.evals` names them, each with its cadence (`every` steps, 0 = off):

  knn    weighted k-NN top-1 (Wu et al. 2018; the DINO protocol, Caron et al. 2021, Sec. 4.1):
         cosine similarity s to every labelled training feature, the k = 20 nearest vote with
         weight exp(s / 0.07).
  ridge  closed-form regularised least squares onto ±1 one-hot targets, the few-shot probe
         big_vision runs on supervised ViTs: W = (XᵀX + λ·n·I)⁻¹ XᵀY on standardised features
         with a bias column; the class is argmax X·W.

Both fit on the first `evals.train_examples` images of the run's own `data.train_split` and score
the first `evals.test_examples` of `data.eval_split` (0: all; the eval transform, labels as stored).
The features are the method's `features(model, inputs)` (MAE: the encoder on every patch, [CLS]
after the final norm; BERT and RoBERTa: the mean of the last hidden states over the real tokens).
A text encoder pre-trains on unlabelled text, so its probes read a labelled set named in
`evals.text` (`maskjax.data.labelled_text`: dataset, root, train_split, eval_split), encoded with the
run's own tokenizer at the run's sequence length.
They are computed by one jitted program on the run's mesh (every process takes part, the result is
replicated), so the evaluators run inside the loop of any multi-process job; the fits are numpy.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

NAMES = ("knn", "ridge")
_SIZES = ("train_examples", "test_examples", "text")  # config.evals' shared settings, not evaluators


def knn_top1(
    train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray, k: int = 20,
    temperature: float = 0.07,
) -> float:  # fmt: skip
    """Weighted k-NN top-1 on cosine similarity; features (n, D), labels (n,) int."""
    a = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
    b = test / np.maximum(np.linalg.norm(test, axis=1, keepdims=True), 1e-12)
    sims = b @ a.T  # (m, n)
    k = min(k, len(a))
    nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sims, nearest, axis=1) / temperature)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = np.zeros((len(b), classes))
    np.add.at(votes, (np.arange(len(b))[:, None], train_labels[nearest]), weights)
    return float((votes.argmax(1) == test_labels).mean())


def ridge_top1(
    train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray, l2: float = 1e-2
) -> float:
    """Ridge regression onto ±1 one-hot targets, top-1; features standardised by the train statistics."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    x = np.concatenate([(train - mean) / std, np.ones((len(train), 1))], axis=1).astype(np.float64)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    y = 2.0 * np.eye(classes)[train_labels] - 1.0
    w = np.linalg.solve(x.T @ x + l2 * len(x) * np.eye(x.shape[1]), x.T @ y)
    t = np.concatenate([(test - mean) / std, np.ones((len(test), 1))], axis=1)
    return float(((t @ w).argmax(1) == test_labels).mean())


def scores(results: dict[str, float]) -> str:
    """'knn top-1 0.9123  ridge top-1 0.9345', for a progress line."""
    return "  ".join(
        f"{k.removesuffix('_top1')} top-1 {v:.4f}" for k, v in results.items() if k.endswith("_top1")
    )


class FeatureEvals:
    """The run's `config.evals`, built once: labelled images on the host, one jitted feature program."""

    def __init__(self, trainer: Any, config: ml_collections.ConfigDict):
        evals = {k: v for k, v in (config.get("evals") or {}).items() if k not in _SIZES}
        unknown = sorted(set(evals) - set(NAMES))
        if unknown:
            from maskjax.errors import ConfigError

            raise ConfigError(f"evals.{unknown[0]} is not an evaluator; allowed: {list(NAMES)}")
        self.every = {name: int(e.every) for name, e in evals.items() if e.every}
        self.config, self.trainer = config, trainer
        self.data: dict | None = None
        if self.every and trainer.method.features is None:
            from maskjax.errors import ConfigError

            raise ConfigError(
                f"evals: family {config.family!r} has no frozen features to evaluate; set every=0"
            )
        graphdef, features = trainer.graphdef, trainer.method.features
        self.run = jax.jit(
            lambda params, x: features(nnx.merge(graphdef, params), x), out_shardings=trainer.replicated
        )

    def due(self, step: int) -> list[str]:
        return [name for name, every in self.every.items() if step % every == 0]

    def _labelled(self) -> dict:
        """{"train": (images, labels), "test": (...)}, eval-transformed, read on first use (text: a
        dict of (n, T) token arrays in place of the images)."""
        from maskjax.data import loaders

        if self.data is None and self.config.data.kind == "text":
            self.data = self._labelled_text()
        if self.data is None:
            self.data, evals, data = {}, self.config.evals, self.config.data
            parts = (
                ("train", data.train_split, "train_examples"),
                ("test", data.eval_split, "test_examples"),
            )
            for part, split, cap in parts:
                plain = ml_collections.ConfigDict(self.config.to_dict())
                plain.data.eval_split = split  # the images as they are: no augmentation
                source, transform = loaders.source_and_transform(plain, "eval")
                n = min(len(source), int(evals.get(cap, 0)) or len(source))
                rows = [transform(source[i]) for i in range(n)]
                self.data[part] = (np.stack([r["image"] for r in rows]), np.array([r["label"] for r in rows]))
        return self.data

    def _labelled_text(self) -> dict:
        from maskjax.data import labelled_text, loaders, text_datasets

        spec, data = self.config.evals.text, self.config.data
        root = loaders.data_dir(data)
        stored = labelled_text.stored_name(spec.dataset, spec.get("root"))
        if spec.dataset in labelled_text.BUILDERS:
            loaders._once(
                f"{root}/{stored}", lambda: labelled_text.prepare(spec.dataset, root, spec.get("root"))
            )
        tokenizer = text_datasets.open_text_dataset(
            loaders._text_dir(data), "train", max_length=data.seq_length
        )[1]
        encode = labelled_text.encode(tokenizer, data.seq_length)
        out = {}
        for part, split, cap in (
            ("train", spec.train_split, "train_examples"),
            ("test", spec.eval_split, "test_examples"),
        ):
            source = labelled_text.open_source(stored, split, root)
            n = min(len(source), int(self.config.evals.get(cap, 0)) or len(source))
            rows = [encode(source[i]) for i in range(n)]
            inputs = {
                k: np.stack([r[k] for r in rows]) for k in ("input_ids", "token_type_ids", "attention_mask")
            }
            out[part] = (inputs, np.array([r["label"] for r in rows]))
        return out

    def _features(self, params: dict, inputs: np.ndarray | dict) -> np.ndarray:
        size = self.config.global_batch_size
        total = len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)

        def put(x: np.ndarray, start: int) -> jax.Array:
            chunk = x[start : start + size]
            chunk = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            return jax.make_array_from_callback(chunk.shape, self.trainer.batch_sharding, lambda i: chunk[i])

        out = []
        for start in range(0, total, size):
            x = jax.tree.map(lambda a, s=start: put(a, s), inputs)
            out.append(np.asarray(self.run(params, x).addressable_data(0))[: total - start])
        return np.concatenate(out).astype(np.float32)

    def __call__(self, params: dict, names: list[str]) -> dict[str, float]:
        """{"knn_top1": ..., "ridge_top1": ..., "evals_seconds": ...} for the evaluators `names`."""
        start = time.perf_counter()
        data = self._labelled()
        (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
        train_f, test_f = self._features(params, train_x), self._features(params, test_x)
        out = {}
        evals = self.config.evals
        if "knn" in names:
            e = evals.knn
            out["knn_top1"] = knn_top1(
                train_f, train_y, test_f, test_y, e.get("k", 20), e.get("temperature", 0.07)
            )
        if "ridge" in names:
            out["ridge_top1"] = ridge_top1(train_f, train_y, test_f, test_y, evals.ridge.get("l2", 1e-2))
        out["evals_seconds"] = time.perf_counter() - start
        return out
