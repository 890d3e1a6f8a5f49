"""Extractive question answering (SQuAD v1.1): examples, doc-stride windows, and EM / F1.

Sources:
  squad_json   the user's SQuAD-format files: ROOT/<split>.json (e.g. train.json, dev.json), as
               {"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
               "answers": [{"text", "answer_start"}, ...]}]}]}]}. A question whose first answer's text
               is not at its answer_start in the context is skipped and counted ("misaligned").
  squad        tfds' squad (v1.1) once prepared as array_record (`tfds build squad
               --file_format=array_record`); eval_split "validation".
Records: "id", "question", "context" (bytes), "answers" (bytes, several joined by "\x1f"),
"answer_starts" (the character offsets, the same way).

Windows (Devlin et al. 2019, Sec. 4.2, and the release's run_squad.py): [CLS] question [SEP] context
window [SEP], the question cut to max_query_length tokens, the context split into windows of the
remaining length whose starts are doc_stride tokens apart. A training window whose answer is not
wholly inside it points at [CLS] (start = end = 0). At evaluation a token's span is taken from the
window where it has the most context on both sides (run_squad.py's "max context" rule).

`answer_text` reads a predicted token span back as the context's own characters, via the tokenizer's
offsets; `exact_match` and `f1` are the official SQuAD v1.1 script's (normalised: lower case, no
punctuation, no articles a/an/the, single spaces), maximised over the reference answers.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import string
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from maskjax.data import image_datasets
from maskjax.data import tokenizers as tok_lib
from maskjax.data.pipeline import Source

SEP = "\x1f"  # joins several answers in one Text feature


class SquadJson(image_datasets._LocalBuilder, skip_registration=True):
    """ROOT/<split>.json in SQuAD's format, one split per file."""

    name = "squad_json"

    def __init__(self, *, root: str | os.PathLike | None = None, **kwargs: Any):
        self._root = Path(root) if root is not None else None
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description="The user's SQuAD-format question answering files.",
            features=tfds.features.FeaturesDict(
                {"id": text, "question": text, "context": text, "answers": text, "answer_starts": text}
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        if self._root is None or not self._root.is_dir():
            raise ValueError(
                f"dataset 'squad_json': give data.root=<folder of SPLIT.json files>; got {self._root}"
            )
        files = sorted(self._root.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"{self._root} has no *.json files (SQuAD format, one per split)")
        self.info.metadata["skipped"] = {}
        return {f.stem: self._generate_examples(f) for f in files}

    def _generate_examples(self, path: Path) -> Iterator[tuple[str, dict[str, str]]]:
        skipped = {"misaligned": 0, "no_answer": 0}
        for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
            for paragraph in article["paragraphs"]:
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    answers = qa.get("answers") or []
                    if not answers:
                        skipped["no_answer"] += 1
                        continue
                    first = answers[0]
                    if (
                        context[first["answer_start"] : first["answer_start"] + len(first["text"])]
                        != first["text"]
                    ):
                        skipped["misaligned"] += 1
                        continue
                    yield (
                        qa["id"],
                        {
                            "id": qa["id"],
                            "question": qa["question"],
                            "context": context,
                            "answers": SEP.join(a["text"] for a in answers),
                            "answer_starts": SEP.join(str(a["answer_start"]) for a in answers),
                        },
                    )
        self.info.metadata["skipped"][path.stem] = skipped


def stored_name(name: str, root: str | os.PathLike | None) -> str:
    """squad_json's tfds name carries a digest of its files, as labelled_text's jsonl does."""
    from maskjax.data import labelled_text

    if name != "squad_json" or root is None:
        return name
    return labelled_text.digest_name("squad_json", root, "*.json")


def prepare(name: str, data_dir: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    if name != "squad_json":
        raise ValueError(f"unknown local QA set {name!r}; the local one is 'squad_json'")
    stored = stored_name(name, root)
    cls = type("SquadJson", (SquadJson,), {"name": stored}, skip_registration=True)
    cls(data_dir=os.fspath(data_dir), root=root).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return stored


class _TfdsSquad:
    """tfds' squad records ({"answers": {"text": [...], "answer_start": [...]}}) in this module's form."""

    def __init__(self, source: Source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.source[index]
        texts = [t.decode() if isinstance(t, bytes) else str(t) for t in r["answers"]["text"]]
        return {
            "id": r["id"],
            "question": r["question"],
            "context": r["context"],
            "answers": SEP.join(texts),
            "answer_starts": SEP.join(str(int(s)) for s in r["answers"]["answer_start"]),
        }


def open_source(name: str, split: str, data_dir: str | os.PathLike | None = None) -> Source:
    source = image_datasets.open_source(name, split, data_dir)
    if name.startswith("squad_json"):
        return source
    if name.split(":")[0] != "squad":
        raise ValueError(
            f"data.dataset={name!r}: a QA set is 'squad_json' (your files) or a prepared 'squad'"
        )
    return _TfdsSquad(source)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class Window:
    """One model input: example `example`'s question and context tokens [start, start + length)."""

    example: int
    start: int
    length: int


@dataclasses.dataclass
class Example:
    id: str
    context: str
    question_ids: list[int]
    context_ids: list[int]
    offsets: list[tuple[int, int]]  # each context token's characters
    answers: list[str]
    start_token: int  # the first answer's tokens (training), -1 if it has none
    end_token: int


def _example(record: dict[str, Any], tokenizer: tok_lib.Tokenizer, max_query: int) -> Example:
    context = _text(record["context"])
    encoding = tokenizer.hf.encode(context, add_special_tokens=False)
    offsets = [tuple(o) for o in encoding.offsets]
    answers = _text(record["answers"]).split(SEP)
    starts = [int(s) for s in _text(record["answer_starts"]).split(SEP)]
    char_start, char_end = starts[0], starts[0] + len(answers[0])
    inside = [i for i, (a, b) in enumerate(offsets) if a < char_end and b > char_start and b > a]
    return Example(
        id=_text(record["id"]),
        context=context,
        question_ids=tokenizer.encode(_text(record["question"]))[:max_query],
        context_ids=list(encoding.ids),
        offsets=offsets,
        answers=answers,
        start_token=inside[0] if inside else -1,
        end_token=inside[-1] if inside else -1,
    )


def windows(example: Example, index: int, budget: int, doc_stride: int) -> list[Window]:
    """The context windows of at most `budget` tokens, their starts doc_stride apart (run_squad.py)."""
    out, start, n = [], 0, len(example.context_ids)
    while True:
        length = min(budget, n - start)
        out.append(Window(index, start, length))
        if start + length >= n:
            return out
        start += min(length, doc_stride)


def max_context(windows_of_example: Sequence[Window], window: Window, position: int) -> bool:
    """Whether context token `position` has its most context in `window`: the score min(left, right)
    + 0.01·length, best over the windows that hold it (run_squad.py's _check_is_max_context)."""

    def score(w: Window) -> float:
        return min(position - w.start, w.start + w.length - 1 - position) + 0.01 * w.length

    holding = [w for w in windows_of_example if w.start <= position < w.start + w.length]
    return max(holding, key=score) == window


class Windows:
    """Random-access model inputs of a QA split: every window of every example, tokenized once.

    Each record: "input_ids", "token_type_ids", "attention_mask" (T,) int32 and "start_positions",
    "end_positions" int32 (0, the [CLS], when the window lacks the answer)."""

    def __init__(
        self,
        source: Source,
        tokenizer: tok_lib.Tokenizer,
        seq_length: int,
        doc_stride: int,
        max_query_length: int,
    ):
        if tokenizer.cls_id is None or tokenizer.sep_id is None or tokenizer.pad_id is None:
            raise ValueError("the tokenizer has no [CLS], [SEP] or pad token: it cannot encode QA inputs")
        self.tokenizer, self.seq_length = tokenizer, seq_length
        self.roberta = tokenizer.id_to_token(tokenizer.cls_id) == "<s>"
        self.examples = [_example(source[i], tokenizer, max_query_length) for i in range(len(source))]
        self.windows: list[Window] = []
        self.by_example: dict[int, list[Window]] = {}
        for i, ex in enumerate(self.examples):
            budget = seq_length - len(ex.question_ids) - (4 if self.roberta else 3)
            if budget < 1:
                raise ValueError(f"seq_length={seq_length} leaves no room for the context after the question")
            self.by_example[i] = windows(ex, i, budget, doc_stride)
            self.windows += self.by_example[i]

    def __len__(self) -> int:
        return len(self.windows)

    def context_offset(self, window: Window) -> int:
        """Position of the window's first context token in the model input."""
        q = len(self.examples[window.example].question_ids)
        return q + (3 if self.roberta else 2)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        w = self.windows[index]
        ex, tok = self.examples[w.example], self.tokenizer
        cls, sep = tok.cls_id, tok.sep_id
        context = ex.context_ids[w.start : w.start + w.length]
        middle = [sep, sep] if self.roberta else [sep]
        ids = [cls, *ex.question_ids, *middle, *context, sep]
        first = len(ex.question_ids) + len(middle) + 1
        types = [0] * first + ([0] if self.roberta else [1]) * (len(context) + 1)
        n, t = len(ids), self.seq_length
        start = end = 0
        if w.start <= ex.start_token and ex.end_token < w.start + w.length:
            start, end = ex.start_token - w.start + first, ex.end_token - w.start + first
        out = {
            "input_ids": np.full(t, tok.pad_id, np.int32),
            "token_type_ids": np.zeros(t, np.int32),
            "attention_mask": (np.arange(t) < n).astype(np.int32),
            "start_positions": np.int32(start),
            "end_positions": np.int32(end),
        }
        out["input_ids"][:n] = ids
        out["token_type_ids"][:n] = types
        return out


def best_spans(
    data: Windows, start_logits: np.ndarray, end_logits: np.ndarray, *, n_best: int = 20, max_answer: int = 30
) -> dict[int, str]:
    """{example: predicted answer text} from the (windows, T) logits of every window, in order.

    Candidates: the n_best starts × n_best ends of each window that lie in its context, start ≤ end,
    at most max_answer tokens, the start in its max-context window; the best start + end logit wins."""
    best: dict[int, tuple[float, int, int]] = {}
    for k, w in enumerate(data.windows):
        offset = data.context_offset(w)
        starts = np.argsort(start_logits[k])[::-1][:n_best]
        ends = np.argsort(end_logits[k])[::-1][:n_best]
        for s in starts:
            for e in ends:
                cs, ce = int(s) - offset, int(e) - offset
                if not (0 <= cs < w.length and 0 <= ce < w.length) or ce < cs or ce - cs + 1 > max_answer:
                    continue
                if not max_context(data.by_example[w.example], w, w.start + cs):
                    continue
                score = float(start_logits[k][s] + end_logits[k][e])
                if w.example not in best or score > best[w.example][0]:
                    best[w.example] = (score, w.start + cs, w.start + ce)
    out = {}
    for i, ex in enumerate(data.examples):
        if i in best:
            _, a, b = best[i]
            out[i] = ex.context[ex.offsets[a][0] : ex.offsets[b][1]]
        else:
            out[i] = ""
    return out


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's normalisation: lower case, punctuation and the articles a/an/the removed,
    whitespace collapsed."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def scores(predictions: dict[int, str], examples: Sequence[Example]) -> dict[str, float]:
    """{"exact_match", "f1"} in percent, each the best over an example's reference answers."""
    em = [max(exact_match(predictions[i], a) for a in ex.answers) for i, ex in enumerate(examples)]
    f = [max(f1(predictions[i], a) for a in ex.answers) for i, ex in enumerate(examples)]
    return {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f))}
