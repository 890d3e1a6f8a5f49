"""Local text corpora -> a tokenizer + tfds datasets of fixed-length examples (`maskjax prepare-text`).

Any folder or glob of UTF-8 text files goes through the same path as a large
corpus would: read documents, skip and count bad ones, split train /
validation by document, train (or load) a tokenizer, build the examples of one
layout (`maskjax.data.text`: "bert", "roberta", "gpt") and write them with tfds
as array_record, read back as random-access data sources of numpy dicts.

Documents. `documents="file"`: each file is one document. `"blank_line"`: a
file holds many documents separated by blank lines (BERT's own input format).
Inside a document, consecutive lines form a paragraph (hard-wrapped text is
joined), blank lines separate paragraphs, and `split_sentences` cuts paragraphs
into sentences for BERT and RoBERTa. GPT tokenizes each document's text whole.

Bad records are skipped and counted, never a crash:
  non_utf8     a document that is not strict UTF-8, or contains NUL (binary, UTF-16)
  empty        a document with no text (or no tokens) left
  long_lines   a line longer than max_line_chars: that line is dropped
  unreadable   a file that cannot be read (permissions, vanished)

Output folder:
  out_dir/tokenizer/                        tokenizer.json (+ vocab.txt or vocab.json, merges.txt)
  out_dir/tfds/local_text_corpus/<layout>_<T>/1.0.0/   one tfds dataset per max_length (train, validation)
  out_dir/prepare.json                      what `prepare_text` returned: paths, settings, counts
"""

from __future__ import annotations

import bz2
import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from maskjax.data import text as text_examples
from maskjax.data import tokenizers as tok_lib

LAYOUTS = ("bert", "roberta", "gpt")
SPLITS = ("train", "validation")
_SPLIT_SEED = {"train": 0, "validation": 1}
_BLANK_LINES = re.compile(rb"\n[ \t\r\f\v]*\n")


@dataclasses.dataclass
class Document:
    """One document: `key` names it stably ("path" or "path#k"); paragraphs are single-spaced lines."""

    key: str
    text: str
    paragraphs: list[str]


def _counters() -> dict[str, int]:
    return {"non_utf8": 0, "empty": 0, "long_lines": 0, "unreadable": 0}


def resolve_inputs(inputs: str | os.PathLike) -> tuple[list[Path], Path]:
    """Files named by a folder (recursively, hidden names skipped), a file, or a glob; and their root."""
    path = Path(inputs)
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        root = path
    elif path.is_file():
        files, root = [path], path.parent
    else:
        files = sorted(Path(p) for p in glob.glob(str(inputs), recursive=True) if Path(p).is_file())
        root = Path(os.path.commonpath([str(p.parent) for p in files])) if files else Path(".")
    if not files:
        raise FileNotFoundError(f"inputs={str(inputs)!r}: no files (give a folder, a file or a glob)")
    return files, root


def _document(key: str, raw: bytes, max_line_chars: int, counts: dict[str, int]) -> Document | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        counts["non_utf8"] += 1
        return None
    if "\x00" in text:
        counts["non_utf8"] += 1
        return None
    lines = []
    for line in text.lstrip("\ufeff").splitlines():
        if len(line) > max_line_chars:
            counts["long_lines"] += 1
            continue
        lines.append(line.rstrip())
    kept = "\n".join(lines).strip()
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", kept)]
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        counts["empty"] += 1
        return None
    return Document(key, kept, paragraphs)


def read_documents(
    files: Sequence[Path],
    root: Path,
    *,
    documents: str = "file",
    max_line_chars: int = 20_000,
) -> tuple[list[Document], dict[str, int]]:
    """The documents of `files` and the counts of what was skipped (see the module doc)."""
    if documents not in ("file", "blank_line"):
        raise ValueError(f"documents must be 'file' or 'blank_line'; got {documents!r}")
    counts = _counters()
    out: list[Document] = []
    for path in files:
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
        try:
            raw = path.read_bytes()
        except OSError:
            counts["unreadable"] += 1
            continue
        # Blank lines are ASCII, so splitting the bytes first lets one bad document not spoil the file.
        parts = [raw] if documents == "file" else [p for p in _BLANK_LINES.split(raw) if p.strip()]
        if not parts:
            counts["empty"] += 1
        for k, part in enumerate(parts):
            doc = _document(name if documents == "file" else f"{name}#{k}", part, max_line_chars, counts)
            if doc is not None:
                out.append(doc)
    return out, counts


def split_documents(
    docs: Sequence[Document], validation_fraction: float, seed: int
) -> dict[str, list[Document]]:
    """Deterministic train / validation split by document.

    Documents are ordered by sha256(seed, key), so the split does not depend on
    the order files are listed in; the first round(fraction * n) go to
    validation (at least one when 0 < fraction and n >= 2, never all of them).
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1); got {validation_fraction}")
    order = sorted(docs, key=lambda d: hashlib.sha256(f"{seed}:{d.key}".encode()).hexdigest())
    n_val = round(validation_fraction * len(order))
    if validation_fraction > 0 and len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)
    val = {d.key for d in order[:n_val]}
    return {
        "train": [d for d in docs if d.key not in val],
        "validation": [d for d in docs if d.key in val],
    }


def tokenize_documents(docs: Sequence[Document], tokenizer: tok_lib.Tokenizer, layout: str) -> list:
    """bert / roberta: docs -> sentences -> ids; gpt: docs -> ids of the whole text.

    With byte-level BPE every sentence after a document's first is encoded
    with its leading space, so packed sentences decode to the running text.
    """
    if layout == "gpt":
        return tokenizer.encode_batch([d.text for d in docs])
    space = " " if tokenizer.kind == "bpe" else ""
    sentences, owner = [], []
    for k, doc in enumerate(docs):
        for j, s in enumerate(s for p in doc.paragraphs for s in text_examples.split_sentences(p)):
            sentences.append(s if j == 0 else space + s)
            owner.append(k)
    out: list[list[list[int]]] = [[] for _ in docs]
    for k, ids in zip(owner, tokenizer.encode_batch(sentences), strict=True):
        if ids:
            out[k].append(ids)
    return out


def _features(layout: str, length: int) -> tfds.features.FeaturesDict:
    vec = lambda dtype: tfds.features.Tensor(shape=(length,), dtype=dtype)
    if layout == "bert":
        spec = {
            "input_ids": vec(np.int32),
            "token_type_ids": vec(np.int32),
            "attention_mask": vec(np.int32),
            "word_starts": vec(np.bool_),
            "special_tokens_mask": vec(np.bool_),
            "next_sentence_label": tfds.features.Tensor(shape=(), dtype=np.int32),
        }
    elif layout == "roberta":
        spec = {
            "input_ids": vec(np.int32),
            "attention_mask": vec(np.int32),
            "word_starts": vec(np.bool_),
            "special_tokens_mask": vec(np.bool_),
        }
    else:
        spec = {"input_ids": vec(np.int32), "segment_ids": vec(np.int32)}
    return tfds.features.FeaturesDict(spec)


def check_tokenizer(tokenizer: tok_lib.Tokenizer, layout: str) -> None:
    """Refuse a tokenizer that lacks a special token the layout places."""
    needs = {"bert": ("cls", "sep", "pad", "mask"), "roberta": ("bos", "eos", "pad", "mask"), "gpt": ("eos",)}
    missing = [f"{r}_id" for r in needs[layout] if getattr(tokenizer, f"{r}_id") is None]
    if missing:
        raise ValueError(f"layout={layout!r} needs a tokenizer with {', '.join(missing)}; this one has none")


def build_examples(
    layout: str,
    token_docs: list,
    tokenizer: tok_lib.Tokenizer,
    *,
    max_length: int,
    rng: np.random.Generator,
    short_seq_prob: float = 0.1,
    nsp: bool = True,
    dupe_factor: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """The examples of one layout from `tokenize_documents` output, with the tokenizer's special ids."""
    check_tokenizer(tokenizer, layout)
    t = tokenizer
    if layout == "bert":
        return text_examples.bert_examples(
            token_docs,
            max_length=max_length,
            rng=rng,
            cls_id=t.cls_id,
            sep_id=t.sep_id,
            pad_id=t.pad_id,
            word_starts_fn=t.word_starts,
            short_seq_prob=short_seq_prob,
            nsp=nsp,
            dupe_factor=dupe_factor,
        )
    if layout == "roberta":
        return text_examples.roberta_full_sentences(
            token_docs,
            max_length=max_length,
            bos_id=t.bos_id,
            eos_id=t.eos_id,
            pad_id=t.pad_id,
            word_starts_fn=t.word_starts,
        )
    if layout == "gpt":
        return text_examples.gpt_packed(token_docs, length=max_length, eos_id=t.eos_id, pad_id=t.pad_id)
    raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")


@dataclasses.dataclass
class TextCorpusConfig(tfds.core.BuilderConfig):
    layout: str = "bert"
    max_length: int = 128


class LocalTextCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Fixed-length examples of one layout from local documents; splits train and validation.

    Generation needs `splits` (documents per split) and `tokenizer`; reading
    needs neither (`tfds.builder_from_directory`). Example order in each split
    is a deterministic function of (seed, split, max_length).
    """

    VERSION = tfds.core.Version("1.0.0")

    def __init__(
        self,
        *,
        splits: dict[str, list[Document]] | None = None,
        tokenizer: tok_lib.Tokenizer | None = None,
        seed: int = 0,
        short_seq_prob: float = 0.1,
        nsp: bool = True,
        dupe_factor: int = 1,
        **kwargs: Any,
    ):
        self._splits = splits or {}
        self._tokenizer = tokenizer
        self._seed = seed
        self._options = {"short_seq_prob": short_seq_prob, "nsp": nsp, "dupe_factor": dupe_factor}
        self.empty_after_tokenizing = 0
        super().__init__(file_format="array_record", **kwargs)

    # tfds looks for a download-checksums file beside the builder's code through `importlib_resources`,
    # a backport it does not install on Python >= 3.9; a local corpus downloads nothing.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{cfg.layout} examples of {cfg.max_length} tokens from a local text corpus",
            features=_features(cfg.layout, cfg.max_length),
        )

    def _split_generators(self, dl_manager):
        if self._tokenizer is None or not self._splits:
            raise ValueError("LocalTextCorpus needs splits= and tokenizer= to generate (use prepare_text)")
        # A split without documents (one-document corpus, validation_fraction=0) is left out.
        return {name: self._generate_examples(name) for name, docs in self._splits.items() if docs}

    def _generate_examples(self, split: str):
        cfg = self.builder_config
        token_docs = tokenize_documents(self._splits[split], self._tokenizer, cfg.layout)
        self.empty_after_tokenizing += sum(1 for d in token_docs if not d)
        rng = np.random.default_rng([self._seed, _SPLIT_SEED[split], cfg.max_length])
        examples = build_examples(
            cfg.layout, token_docs, self._tokenizer, max_length=cfg.max_length, rng=rng, **self._options
        )
        yield from enumerate(examples)


def _default_vocab_size(layout: str, kind: str) -> int:
    # BERT's vocab.txt: 30,522; RoBERTa: 50,265 (GPT-2's 50,257 + fairseq's specials); GPT-2: 50,257.
    if kind == "wordpiece":
        return 30522
    return 50257 if layout == "gpt" else 50265


def prepare_text(
    inputs: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    layout: str = "bert",
    max_length: int | Sequence[int] = 128,
    tokenizer: str | os.PathLike | None = None,
    tokenizer_kind: str | None = None,
    vocab_size: int | None = None,
    lowercase: bool = True,
    documents: str = "file",
    seed: int = 0,
    validation_fraction: float = 0.05,
    short_seq_prob: float = 0.1,
    nsp: bool = True,
    dupe_factor: int = 1,
    max_line_chars: int = 20_000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prepare a local corpus for pre-training: tokenizer + one tfds dataset per max_length.

    inputs: folder, file or glob. tokenizer: an existing one (see
    `tokenizers.load`), else one is trained on the train split —
    tokenizer_kind "wordpiece" (default for bert) or "bpe" (roberta, gpt) with
    vocab_size entries. max_length may list several lengths, e.g. (128, 512)
    for BERT's two phases (Devlin et al. 2019, A.2: 128 tokens for 90% of the
    steps, 512 for the rest); every length reads the same documents.
    Returns (and writes to out_dir/prepare.json) the paths, settings and counts.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    lengths = sorted({int(max_length)} if isinstance(max_length, int) else {int(x) for x in max_length})
    if not lengths or lengths[0] < 8:
        raise ValueError(f"max_length must be >= 8; got {max_length}")
    kind = tokenizer_kind or ("wordpiece" if layout == "bert" else "bpe")
    if kind not in ("wordpiece", "bpe"):
        raise ValueError(f"tokenizer_kind must be 'wordpiece' or 'bpe'; got {tokenizer_kind!r}")
    out = Path(out_dir)
    if (out / "prepare.json").exists() or (out / "tfds").exists():
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds a prepared dataset (pass overwrite=True to replace it)"
            )
        for name in ("tfds", "tokenizer", "prepare.json"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    files, root = resolve_inputs(inputs)
    docs, skipped = read_documents(files, root, documents=documents, max_line_chars=max_line_chars)
    if not docs:
        raise ValueError(
            f"inputs={str(inputs)!r}: no usable document in {len(files)} files (skipped: {skipped})"
        )
    splits = split_documents(docs, validation_fraction, seed)

    if tokenizer is not None:
        tok = tok_lib.load(tokenizer, lowercase=lowercase)
    else:
        texts = (d.text for d in splits["train"])
        size = vocab_size or _default_vocab_size(layout, kind)
        if kind == "wordpiece":
            tok = tok_lib.train_wordpiece(texts, size, lowercase=lowercase)
        else:
            specials = tok_lib.GPT2_SPECIALS if layout == "gpt" else tok_lib.ROBERTA_SPECIALS
            tok = tok_lib.train_bpe(texts, size, special_tokens=specials)
    check_tokenizer(tok, layout)
    tok.save(out / "tokenizer")

    datasets, empty_after = {}, 0
    for length in lengths:
        builder = LocalTextCorpus(
            data_dir=str(out / "tfds"),
            config=TextCorpusConfig(name=f"{layout}_{length}", layout=layout, max_length=length),
            splits=splits,
            tokenizer=tok,
            seed=seed,
            short_seq_prob=short_seq_prob,
            nsp=nsp,
            dupe_factor=dupe_factor,
        )
        builder.download_and_prepare(download_dir=str(out / "tfds" / "downloads"))
        empty_after = max(empty_after, builder.empty_after_tokenizing)
        datasets[str(length)] = {
            "path": Path(builder.data_dir).relative_to(out).as_posix(),
            **{s: int(builder.info.splits[s].num_examples) if splits[s] else 0 for s in splits},
        }
    skipped["empty"] += empty_after
    result = {
        "layout": layout,
        "max_lengths": lengths,
        "tokenizer": {
            "path": "tokenizer",
            "kind": tok.kind,
            "vocab_size": tok.vocab_size,
            **{
                f"{r}_id": getattr(tok, f"{r}_id") for r in ("pad", "unk", "cls", "sep", "mask", "bos", "eos")
            },
        },
        "datasets": datasets,
        "files": len(files),
        "documents": {s: len(splits[s]) for s in splits},
        "skipped": skipped,
        "settings": {
            "inputs": str(inputs),
            "documents": documents,
            "seed": seed,
            "validation_fraction": validation_fraction,
            "short_seq_prob": short_seq_prob,
            "nsp": nsp,
            "dupe_factor": dupe_factor,
            "max_line_chars": max_line_chars,
            "lowercase": lowercase,
        },
    }
    (out / "prepare.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return {**result, "out_dir": str(out)}


class TextSource:
    """A tfds data source whose records keep their feature dtypes.

    tfds returns scalar features as Python ints; `next_sentence_label` must stay int32 when stacked.
    """

    def __init__(self, source: Any, features: tfds.features.FeaturesDict):
        self.source = source
        self.dtypes = {k: np.dtype(f.np_dtype) for k, f in features.items()}

    def __len__(self) -> int:
        return len(self.source)

    def _typed(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, self.dtypes[k]) for k, v in record.items()}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._typed(self.source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        return [self._typed(r) for r in self.source.__getitems__(list(indices))]


def open_text_dataset(
    out_dir: str | os.PathLike, split: str = "train", *, max_length: int | None = None
) -> tuple[Any, tok_lib.Tokenizer]:
    """(`TextSource` of example dicts, tokenizer) of a `prepare_text` folder.

    max_length picks among several prepared lengths (required when there are several).
    """
    out = Path(out_dir)
    meta_path = out / "prepare.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{out}: no prepare.json (run `maskjax prepare-text` first)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    available = [int(k) for k in meta["datasets"]]
    if max_length is None:
        if len(available) != 1:
            raise ValueError(f"{out} holds max_length {available}: pass max_length=")
        max_length = available[0]
    if max_length not in available:
        raise ValueError(f"max_length must be one of {available} for {out}; got {max_length}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    if not meta["documents"].get(split):
        raise ValueError(f"{out} has no {split} split: no document went to it ({meta['documents']})")
    builder = tfds.builder_from_directory(str(out / meta["datasets"][str(max_length)]["path"]))
    source = TextSource(builder.as_data_source(split), builder.info.features)
    return source, tok_lib.load(out / meta["tokenizer"]["path"])


# ------------------------------------------------------------------------------------------------
# Demo corpora: real text that installs with pip, written as one file per document.

_WIKI_SAMPLE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_HEADING = re.compile(r"^=+.*=+$")
_EMPHASIS = re.compile(r"'{2,}")


def _clean_wiki_paragraphs(text: str) -> list[str]:
    """Text passages only: BERT "ignore[s] lists, tables, and headers" (Devlin et al. 2019, Sec. 3.1).

    On gensim's `filter_wiki` output: drop headings, list items, gallery /
    caption lines (with "|" or no closing punctuation) and short lines; strip
    bold / italic quotes.
    """
    paragraphs = []
    for line in text.splitlines():
        line = _EMPHASIS.sub("", line).strip()
        if not line or _HEADING.match(line) or line[0] in "*#:;{|!" or "|" in line:
            continue
        if len(line.split()) < 8 or line[-1] not in ".!?\"')":
            continue
        paragraphs.append(" ".join(line.split()))
    return paragraphs


def _slug(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", title).strip("_")[:60] or "untitled"


def demo_corpus(dest_dir: str | os.PathLike, source: str = "wikipedia", *, min_chars: int = 1000) -> Path:
    """Write a real English corpus as text files (one document per file) under dest_dir/<source>; return it.

    "wikipedia": the 100-odd real Wikipedia articles (~2.7 MB of text
    passages) in gensim's wheel (`pip install gensim`), BERT's own domain;
    markup removed by gensim's `filter_wiki`, then lists, tables and headers
    dropped as BERT did. "python-docs": the 79 topics of the Python language
    reference that ship with CPython (`pydoc_data`, ~0.45 MB), nothing to
    install. Articles shorter than min_chars (redirects, stubs) are left out.
    """
    dest = Path(dest_dir) / source
    if source == "wikipedia":
        spec = importlib.util.find_spec("gensim")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("demo_corpus('wikipedia') needs gensim's wheel: pip install gensim")
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki

        sample = Path(next(iter(spec.submodule_search_locations))) / _WIKI_SAMPLE
        docs = []
        with bz2.open(sample) as stream:
            for title, markup, _ in extract_pages(stream):
                paragraphs = _clean_wiki_paragraphs(filter_wiki(markup))
                if sum(len(p) for p in paragraphs) >= min_chars:
                    docs.append((title, paragraphs))
    elif source == "python-docs":
        from pydoc_data.topics import topics

        docs = [(name, [topics[name].strip()]) for name in sorted(topics) if len(topics[name]) >= min_chars]
    else:
        raise ValueError(f"source must be 'wikipedia' or 'python-docs'; got {source!r}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for k, (title, paragraphs) in enumerate(docs):
        (dest / f"{k:04d}_{_slug(title)}.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return dest
