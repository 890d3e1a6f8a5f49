"""Labelled text for fine-tuning: tfds builders of (text_a, text_b, label), tokenized when read.

Local builders (no network at prepare or read time):

  polarity       Pang & Lee's movie-review sentences in gensim's test data (pang_lee_polarity.cor):
                 200 sentences, 100 negative / 100 positive. Fixed split: every fifth sentence is
                 "test" (40), the rest "train" (160).
  reuters_grain  Reuters-21578 ModApte, "grain" against the rest (binary), from the ARFF files in
  reuters_corn   Debian's weka package (`apt-get download weka && dpkg-deb -x weka_*.deb DIR`, or
                 `apt-get install weka`): "train" 1,554 and "test" 604 news stories; grain has 103 / 57
                 positives, corn 45 / 24 (so F1 of the positive class, not accuracy, is the measure).
  jsonl          the user's files: ROOT/<split>.jsonl (one split per file, e.g. train.jsonl, test.jsonl),
                 one JSON object per line, {"text": ..., "label": ...} or {"text_a": ..., "text_b": ...,
                 "label": ...}; labels are ints or strings (class names, sorted). Lines that are not
                 JSON, lack a field, or have an empty text are skipped and counted (metadata "skipped").

Records: "text_a" and "text_b" (bytes; text_b is b"" for a single text), "label" int64.

Real tfds datasets the user has prepared (array_record) open under their own names, their text fields
mapped by `TFDS_FIELDS`: glue/sst2, glue/cola, glue/mrpc, glue/qqp, glue/mnli (eval_split
"validation_matched"), glue/qnli, glue/rte, imdb_reviews. (GLUE's test splits carry no labels.)

`encode(tokenizer, seq_length)` makes the per-example transform: [CLS] a [SEP] b [SEP] with segment ids
0/1 (BERT), or <s> a </s></s> b </s> with one segment (RoBERTa), the longer text truncated first
(transformers' "longest_first"), padded to seq_length.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from maskjax.data import image_datasets
from maskjax.data import tokenizers as tok_lib
from maskjax.data.pipeline import Source

log = logging.getLogger(__name__)

WEKA_DIRS = ("/usr/share/doc/weka/examples",)  # where `apt-get install weka` puts the ARFF files
# tfds name -> (first text field, second text field or None); labels are "label" in all of them.
TFDS_FIELDS: dict[str, tuple[str, str | None]] = {
    "glue/sst2": ("sentence", None),
    "glue/cola": ("sentence", None),
    "glue/mrpc": ("sentence1", "sentence2"),
    "glue/qqp": ("question1", "question2"),
    "glue/mnli": ("premise", "hypothesis"),
    "glue/qnli": ("question", "sentence"),
    "glue/rte": ("sentence1", "sentence2"),
    "imdb_reviews": ("text", None),
}


def _info(
    builder: tfds.core.DatasetBuilder, description: str, names: list[str] | None
) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=builder,
        description=description,
        features=tfds.features.FeaturesDict(
            {
                "text_a": tfds.features.Text(),
                "text_b": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=names),
            }
        ),
        metadata=tfds.core.MetadataDict(),
    )


class _Labelled(image_datasets._LocalBuilder, skip_registration=True):
    """Splits of (text_a, text_b, label) records held in memory at prepare time (small sets)."""

    NAMES: list[str] | None = None
    DESCRIPTION = ""

    def _records(self) -> dict[str, list[dict[str, Any]]]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return _info(self, self.DESCRIPTION, self.NAMES)

    def _split_generators(self, dl_manager):
        self.info.metadata.setdefault("skipped", {})
        return {split: self._generate_examples(records) for split, records in self._records().items()}

    def _generate_examples(self, records: list[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
        for i, r in enumerate(records):
            yield i, {"text_a": r["text_a"], "text_b": r.get("text_b", ""), "label": r["label"]}


def _gensim_file(name: str) -> Path:
    import gensim

    path = Path(gensim.__file__).parent / "test" / "test_data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: gensim's wheel carries it (pip install gensim)")
    return path


class Polarity(_Labelled):
    """gensim's pang_lee_polarity.cor (Windows-1252): "__label__neg text" / "__label__pos text" per line."""

    name = "polarity"
    NAMES = ["neg", "pos"]
    DESCRIPTION = "Pang & Lee movie-review sentences (gensim test data); every fifth is test."

    def _records(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
        lines = [
            ln
            for ln in _gensim_file("pang_lee_polarity.cor").read_text("cp1252", errors="replace").splitlines()
            if ln.strip()
        ]
        for i, line in enumerate(lines):
            tag, text = line.split(maxsplit=1)
            label = self.NAMES.index(tag.removeprefix("__label__"))
            out["test" if i % 5 == 4 else "train"].append({"text_a": text.strip(), "label": label})
        return out


def read_arff_strings(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(text, class) rows of an ARFF file whose attributes are one quoted string and one nominal class.

    Weka writes the string in single quotes with backslash escapes (\\n, \\', \\\\), as Python does."""
    text = Path(path).read_text(encoding="latin-1")
    lower = text.lower()
    start = lower.find("@data")
    if start < 0:
        raise ValueError(f"{path}: no @data section (not an ARFF file)")
    rows = []
    for line in text[start + len("@data") :].splitlines():
        line = line.strip()
        if not line or line.startswith("%"):
            continue
        value, _, cls = line.rpartition(",")
        if not value:
            raise ValueError(f"{path}: a row without a class: {line[:60]!r}")
        rows.append((ast.literal_eval(value) if value[:1] in "'\"" else value, cls.strip()))
    return rows


class Reuters(_Labelled):
    """Reuters-21578 ModApte one-topic-against-the-rest sets from weka's examples (ARFF)."""

    NAMES = ["0", "1"]
    TOPIC = ""

    def __init__(self, *, root: str | os.PathLike | None = None, **kwargs: Any):
        self._arff_dir = root
        super().__init__(**kwargs)

    def _folder(self) -> Path:
        dirs = [Path(self._arff_dir)] if self._arff_dir else [Path(d) for d in WEKA_DIRS]
        for d in dirs:
            if (d / f"Reuters{self.TOPIC}-train.arff").is_file():
                return d
        raise FileNotFoundError(
            f"Reuters{self.TOPIC}-train.arff not found in {', '.join(map(str, dirs))}: "
            "`apt-get install weka`, or `apt-get download weka && dpkg-deb -x weka_*.deb DIR` and set "
            "data.root=DIR/usr/share/doc/weka/examples"
        )

    def _records(self) -> dict[str, list[dict[str, Any]]]:
        folder = self._folder()
        out = {}
        for split in ("train", "test"):
            rows = read_arff_strings(folder / f"Reuters{self.TOPIC}-{split}.arff")
            out[split] = [{"text_a": " ".join(t.split()), "label": self.NAMES.index(c)} for t, c in rows]
        return out


class ReutersGrain(Reuters):
    name = "reuters_grain"
    TOPIC = "Grain"
    DESCRIPTION = "Reuters-21578 ModApte: grain (1) against the other stories (0), from weka's ARFF files."


class ReutersCorn(Reuters):
    name = "reuters_corn"
    TOPIC = "Corn"
    DESCRIPTION = "Reuters-21578 ModApte: corn (1) against the other stories (0), from weka's ARFF files."


class Jsonl(_Labelled):
    """ROOT/<split>.jsonl with {"text", "label"} or {"text_a", "text_b", "label"} per line."""

    name = "jsonl"
    DESCRIPTION = "The user's labelled text: one JSON object per line, one file per split."

    def __init__(self, *, root: str | os.PathLike | None = None, **kwargs: Any):
        self._root = Path(root) if root is not None else None
        self._parsed: tuple[dict, dict, list[str]] | None = None
        super().__init__(**kwargs)

    def _parse(self) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, int]], list[str]]:
        """(records per split, skipped counts per split, class names); labels as read, not yet ids."""
        if self._parsed is not None:
            return self._parsed
        if self._root is None or not self._root.is_dir():
            raise ValueError(
                f"dataset 'jsonl': give data.root=<folder of SPLIT.jsonl files>; got {self._root}"
            )
        files = sorted(self._root.glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"{self._root} has no *.jsonl files (one per split: train.jsonl, ...)")
        splits, skipped, labels = {}, {}, set()
        for f in files:
            records, bad = [], {"not_json": 0, "missing_field": 0, "empty": 0}
            for line in f.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    bad["not_json"] += 1
                    continue
                a = row.get("text_a", row.get("text")) if isinstance(row, dict) else None
                if a is None or "label" not in row or not isinstance(row["label"], int | str):
                    bad["missing_field"] += 1
                    continue
                if not str(a).strip():
                    bad["empty"] += 1
                    continue
                records.append(
                    {"text_a": str(a), "text_b": str(row.get("text_b") or ""), "label": row["label"]}
                )
                labels.add(row["label"])
            splits[f.stem], skipped[f.stem] = records, bad
        if len({type(x) for x in labels}) > 1:
            raise ValueError(f"{self._root}: labels mix ints and strings; use one kind")
        self._parsed = splits, skipped, [str(x) for x in sorted(labels)]
        return self._parsed

    def _info(self) -> tfds.core.DatasetInfo:
        names = self._parse()[2] if self._root is not None else None
        return _info(self, self.DESCRIPTION, names)

    def _records(self) -> dict[str, list[dict[str, Any]]]:
        splits, skipped, names = self._parse()
        self.info.metadata["skipped"] = skipped
        ids = {n: i for i, n in enumerate(names)}
        return {s: [{**r, "label": ids[str(r["label"])]} for r in rs] for s, rs in splits.items()}


BUILDERS: dict[str, type[tfds.core.DatasetBuilder]] = {
    "polarity": Polarity,
    "reuters_grain": ReutersGrain,
    "reuters_corn": ReutersCorn,
    "jsonl": Jsonl,
}


def digest_name(prefix: str, root: str | os.PathLike, pattern: str) -> str:
    """prefix_<digest of the files `pattern` matches in root (absolute paths, sizes, modification
    times)>: the tfds name of a user's folder, so another folder, or an edited file, is prepared anew."""
    files = sorted(Path(root).resolve().glob(pattern))
    stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return f"{prefix}_{hashlib.sha1(repr(stamp).encode()).hexdigest()[:12]}"


def stored_name(name: str, root: str | os.PathLike | None = None) -> str:
    """The tfds name set `name` is prepared under (jsonl's: `digest_name`)."""
    return digest_name("jsonl", root, "*.jsonl") if name == "jsonl" and root is not None else name


def prepare(name: str, data_dir: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """Prepare local labelled set `name` under data_dir (a no-op when it is there); `root` is jsonl's
    folder, or the folder of weka's ARFF files. Returns the name it is stored under (`stored_name`)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown local labelled text set {name!r}; choose one of {sorted(BUILDERS)}")
    stored, cls = stored_name(name, root), BUILDERS[name]
    if stored != name:
        cls = type(cls.__name__, (cls,), {"name": stored}, skip_registration=True)
    kwargs = {"root": root} if root is not None else {}
    builder = cls(data_dir=os.fspath(data_dir), **kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return stored


class _Fields:
    """A prepared tfds dataset's records with its text fields renamed to text_a / text_b."""

    def __init__(self, source: Source, a: str, b: str | None):
        self.source, self.a, self.b = source, a, b

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.source[index]
        return {"text_a": r[self.a], "text_b": r[self.b] if self.b else b"", "label": r["label"]}


def open_source(name: str, split: str, data_dir: str | os.PathLike | None = None) -> Source:
    """Split `split` of a prepared labelled set as records {"text_a", "text_b", "label"}; never downloads."""
    source = image_datasets.open_source(name, split, data_dir)
    if name in BUILDERS or name.startswith("jsonl_"):
        return source
    base = name.split(":")[0]
    if base not in TFDS_FIELDS:
        raise ValueError(
            f"data.dataset={name!r}: a labelled text set is one of {sorted(BUILDERS)} or a prepared tfds "
            f"dataset among {sorted(TFDS_FIELDS)}"
        )
    return _Fields(source, *TFDS_FIELDS[base])


def num_classes(name: str, data_dir: str | os.PathLike | None = None) -> int:
    return image_datasets.dataset_info(name, data_dir).features["label"].num_classes


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def longest_first(n_a: int, n_b: int, budget: int) -> tuple[int, int]:
    """Lengths the two texts keep within `budget` tokens, as HF tokenizers' "longest_first" cuts them:
    the shorter text whole if the longer still gets as much, else ⌊budget/2⌋ for the shorter and
    ⌈budget/2⌉ for the longer. (BERT's run_classifier.py popped from the longer one token at a time,
    which can leave the pair one token apart from this.)"""
    if n_a + n_b <= budget:
        return n_a, n_b
    short, long_ = sorted((n_a, n_b))
    long_ = short if short > budget else max(short, budget - short)
    if short + long_ > budget:
        short, long_ = budget // 2, budget // 2 + budget % 2
    return (long_, short) if n_a > n_b else (short, long_)


def encode(tokenizer: tok_lib.Tokenizer, seq_length: int):
    """The transform record -> {"input_ids", "token_type_ids", "attention_mask" (T,) int32, "label"}.

    BERT (a "[CLS]" token): [CLS] a [SEP] (b [SEP]), segments 0 then 1. RoBERTa ("<s>"): <s> a </s>
    (</s> b </s>), one segment. Tokens beyond seq_length are cut as `longest_first` says."""
    roberta = tokenizer.cls_id is not None and tokenizer.id_to_token(tokenizer.cls_id) == "<s>"
    cls, sep, pad = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id
    if cls is None or sep is None or pad is None:
        raise ValueError(
            "the tokenizer has no [CLS]/<s>, [SEP]/</s> or pad token: it cannot encode text pairs"
        )

    def transform(record: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        a, b = tokenizer.encode(_text(record["text_a"])), tokenizer.encode(_text(record["text_b"]))
        pair = bool(b)
        budget = seq_length - (2 if not pair else 4 if roberta else 3)
        n_a, n_b = longest_first(len(a), len(b), budget)
        a, b = a[:n_a], b[:n_b]
        if not pair:
            ids, types = [cls, *a, sep], [0] * (len(a) + 2)
        elif roberta:
            ids, types = [cls, *a, sep, sep, *b, sep], [0] * (len(a) + len(b) + 4)
        else:
            ids, types = [cls, *a, sep, *b, sep], [0] * (len(a) + 2) + [1] * (len(b) + 1)
        n = len(ids)
        out = np.full(seq_length, pad, np.int32)
        out[:n] = ids
        type_ids = np.zeros(seq_length, np.int32)
        type_ids[:n] = types
        mask = (np.arange(seq_length) < n).astype(np.int32)
        return {
            "input_ids": out,
            "token_type_ids": type_ids,
            "attention_mask": mask,
            "label": np.int32(record["label"]),
        }

    return transform
