"""From a training config's `data` section to this process's resumable loader.

  data.kind = "image": a tfds image dataset (local ones are prepared on first use)
                       + RandomResizedCrop / flip / normalise for training,
                       resize + centre crop for evaluation
  data.kind = "text":  a folder written by `maskjax prepare-text` (prepared on
                       first use from `data.corpus` when it is missing)
  data.kind = "labelled_text": (text_a, text_b, label) records (data/labelled_text.py), encoded
                       with `text_tokenizer(config)` (data.tokenizer, else the init's)
  data.kind = "span_qa": SQuAD-style questions as doc-stride windows (data/span_qa.py)

Datasets live under `data.data_dir`, default $MASKJAX_DATA_DIR or ~/.cache/maskjax.
`prepare(config)` is the explicit first step of a run (train, benchmark-input): it builds what
is missing, checks a text config against its tokenizer, and says where the data is. Opening a
loader afterwards only reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from maskjax.data import image_datasets, images, pipeline
from maskjax.errors import ConfigError

to_global = pipeline.to_global
KINDS = ("image", "text", "labelled_text", "span_qa")


def data_dir(data: ml_collections.ConfigDict) -> Path:
    default = os.environ.get("MASKJAX_DATA_DIR", str(Path.home() / ".cache" / "maskjax"))
    return Path(data.data_dir or default)


_PREPARED: set[str] = set()  # datasets this process has seen prepared by all: no second barrier


def _locked(key: str, prepare) -> None:
    """`prepare()` (quiet) holding an exclusive lock beside the dataset's folder `key`: two jobs started at
    once on one machine build it once; the second finds it built. Object stores (gs://) take no lock."""
    quiet = contextlib.redirect_stdout(io.StringIO())
    if "://" in key:
        with quiet:
            prepare()
        return
    folder = Path(key)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a") as lock, quiet:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            prepare()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _once(key: str, prepare) -> None:
    """Prepare on process 0 only; the other processes wait for it (one shared file system).

    Several processes meet at the barrier once per dataset: later calls (e.g. from a report that
    runs on process 0 alone) return at once instead of waiting for processes that never come.
    tfds prints its own banner to stdout when it builds; `prepare` below says where the data is.
    """
    if jax.process_count() == 1:
        _locked(key, prepare)
        return
    if key in _PREPARED:
        return
    if jax.process_index() == 0:
        _locked(key, prepare)
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("maskjax: dataset prepared")
    _PREPARED.add(key)


def _image_source(data: ml_collections.ConfigDict, split: str, train: bool) -> tuple[Any, tuple, tuple]:
    name, root = data.dataset, data_dir(data)
    if name in image_datasets.BUILDERS:
        _once(f"{root}/{name}", lambda: image_datasets.prepare(name, root, **data.get("builder_kwargs", {})))
    mean, std = image_datasets.normalization(name, root)
    source = image_datasets.open_source(name, split, root)
    fraction = data.get("label_fraction", 1.0)
    if train and fraction < 1.0:
        source = image_datasets.LabelledFraction(source, fraction)
    return source, mean, std


def _labelled_text_source(data: ml_collections.ConfigDict, split: str, train: bool) -> Any:
    from maskjax.data import labelled_text

    name, root = data.dataset, data_dir(data)
    if name in labelled_text.BUILDERS:
        _once(
            f"{root}/{labelled_text.stored_name(name, data.root)}",
            lambda: labelled_text.prepare(name, root, data.root),
        )
    source = labelled_text.open_source(labelled_text.stored_name(name, data.root), split, root)
    fraction = data.get("label_fraction", 1.0)
    return image_datasets.LabelledFraction(source, fraction) if train and fraction < 1.0 else source


def text_tokenizer(config: ml_collections.ConfigDict) -> Any:
    """The tokenizer a labelled-text run encodes with: data.tokenizer, else the one config.init carries
    (a maskjax workdir's tokenizer/ folder, or a transformers directory's own files)."""
    from maskjax.data import tokenizers

    where = config.data.get("tokenizer")
    if not where and config.get("init"):
        init = Path(config.init)
        where = init / "tokenizer" if (init / "tokenizer").is_dir() else init
    if not where:
        raise ConfigError(
            "data.tokenizer is not set and there is no config.init to take one from: give the tokenizer "
            "the encoder was pre-trained with (e.g. --config.data.tokenizer=PRETRAIN_WORKDIR/tokenizer)"
        )
    try:
        return tokenizers.load(where)
    except FileNotFoundError as e:
        raise ConfigError(f"data.tokenizer: {e}") from None


def _qa_source(data: ml_collections.ConfigDict, split: str) -> Any:
    from maskjax.data import span_qa

    name, root = data.dataset, data_dir(data)
    stored = span_qa.stored_name(name, data.root)
    if name == "squad_json":
        _once(f"{root}/{stored}", lambda: span_qa.prepare(name, root, data.root))
    return span_qa.open_source(stored, split, root)


def qa_windows(config: ml_collections.ConfigDict, split: str) -> Any:
    """`split` ("train" or "eval") of a span-QA config as `span_qa.Windows`: every doc-stride window."""
    from maskjax.data import span_qa

    d = config.data
    source = _qa_source(d, d.train_split if split == "train" else d.eval_split)
    return span_qa.Windows(source, text_tokenizer(config), d.seq_length, d.doc_stride, d.max_query_length)


def _check_fits(tok: Any, model: ml_collections.ConfigDict) -> None:
    if tok.vocab_size > model.vocab_size or tok.pad_id != model.pad_id:
        raise ConfigError(
            f"the tokenizer ({tok.vocab_size} entries, pad id {tok.pad_id}) does not fit the model "
            f"(model.vocab_size={model.vocab_size}, model.pad_id={model.pad_id})"
        )


def _text_dir(data: ml_collections.ConfigDict) -> Path:
    from maskjax.data import text_datasets

    out = data_dir(data) / data.name

    def prepare() -> None:
        if (out / "prepare.json").exists():
            return
        corpus = data.corpus or str(text_datasets.demo_corpus(data_dir(data) / "corpora" / data.name))
        lengths = list(data.get("prepare_lengths") or [data.seq_length])
        text_datasets.prepare_text(
            corpus,
            out,
            layout=data.layout,
            max_length=lengths if len(lengths) > 1 else lengths[0],
            tokenizer=data.get("tokenizer"),
            vocab_size=data.get("vocab_size"),
            seed=data.prepare_seed,
        )

    _once(str(out), prepare)
    return out


def prepare(config: ml_collections.ConfigDict) -> Path:
    """Build the config's dataset if it is not there yet (process 0; the others wait) and check it.

    Returns the dataset's folder (the caller says where the data is). A text config's vocabulary
    size and masking ids must be those of the prepared tokenizer (a mismatch is a ConfigError).
    """
    data = config.data
    if data.kind == "image":
        _image_source(data, data.train_split, train=False)
        where = data_dir(data) / data.dataset
    elif data.kind == "text":
        where = _text_dir(data)
        check_tokenizer(config)
    elif data.kind == "labelled_text":
        from maskjax.data import labelled_text

        _labelled_text_source(data, data.train_split, train=False)
        stored = labelled_text.stored_name(data.dataset, data.root)
        where = data_dir(data) / stored
        classes = labelled_text.num_classes(stored, data_dir(data))
        if config.model.num_labels != classes:
            raise ConfigError(
                f"model.num_labels={config.model.num_labels} but {data.dataset} has {classes} classes"
            )
        _check_fits(text_tokenizer(config), config.model)
    elif data.kind == "span_qa":
        from maskjax.data import span_qa

        _qa_source(data, data.train_split)
        where = data_dir(data) / span_qa.stored_name(data.dataset, data.root)
        _check_fits(text_tokenizer(config), config.model)
    else:
        raise ValueError(f"data.kind must be one of {', '.join(KINDS)}; got {data.kind!r}")
    return where


def source_and_transform(config: ml_collections.ConfigDict, split: str) -> tuple[Any, Any]:
    """The tfds data source of `split` ("train" or "eval") and its per-example transform."""
    data = config.data
    train = split == "train"
    split_name = data.train_split if train else data.eval_split
    if data.kind == "image":
        source, mean, std = _image_source(data, split_name, train)
        if train:
            transform = images.train_transform(
                data.image_size,
                mean,
                std,
                scale=tuple(data.scale),
                ratio=tuple(data.ratio),
                flip=data.flip,
                color_jitter_strengths=tuple(data.color_jitter),
                channels=data.channels,
            )
        else:
            transform = images.eval_transform(
                data.image_size,
                mean,
                std,
                crop_pct=data.crop_pct,
                channels=data.channels,
            )
        return source, transform
    if data.kind == "span_qa":
        return qa_windows(config, split), None
    if data.kind == "labelled_text":
        from maskjax.data import labelled_text

        source = _labelled_text_source(data, split_name, train)
        return source, labelled_text.encode(text_tokenizer(config), data.seq_length)
    if data.kind == "text":
        from maskjax.data import text_datasets

        return text_datasets.open_text_dataset(_text_dir(data), split_name, max_length=data.seq_length)[
            0
        ], None
    raise ValueError(f"data.kind must be one of {', '.join(KINDS)}; got {data.kind!r}")


def make(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> pipeline.Loader:
    """split "train": the shuffled, augmented, resumable stream; "eval": held-out data in a fixed order."""
    source, transform = source_and_transform(config, split)
    return pipeline.Loader(
        source,
        global_batch=config.global_batch_size,
        seed=config.seed,
        transform=transform,
        process_index=process_index,
        process_count=process_count,
        start_step=start_step,
        num_workers=config.data.num_workers,
        shuffle=split == "train",
    )


def check_tokenizer(config: ml_collections.ConfigDict) -> None:
    """A text config's masking ids and vocabulary must be those of its prepared tokenizer."""
    from maskjax.data import text_datasets

    tok = text_datasets.open_text_dataset(_text_dir(config.data), "train", max_length=config.data.seq_length)[
        1
    ]
    if config.model.vocab_size < tok.vocab_size:
        raise ConfigError(
            f"model.vocab_size={config.model.vocab_size} < the tokenizer's {tok.vocab_size} entries"
        )
    masking = config.get("masking", {})
    for field, actual in (("mask_id", tok.mask_id), ("pad_id", tok.pad_id)):
        if field in masking and masking[field] != actual:
            raise ConfigError(f"masking.{field}={masking[field]} but the tokenizer's is {actual}")


def first_batches(config: ml_collections.ConfigDict, split: str, n: int) -> dict[str, np.ndarray]:
    """`n` batches of `split` concatenated on the host (for reports and figures)."""
    loader = make(config, split, process_index=0, process_count=1)
    batches = [next(loader) for _ in range(n)]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
