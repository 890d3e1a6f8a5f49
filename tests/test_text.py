"""Text examples (BERT pairs, RoBERTa FULL-SENTENCES, GPT packing) and `prepare_text` end to end.

Synthetic documents carry their provenance in every id (document, sentence,
position), so each example can be traced back to where its tokens came from.
"""

from __future__ import annotations

import importlib.util
import itertools
import json

import numpy as np
import pytest

from maskjax.data import text as tx
from maskjax.data import text_datasets as td

PAD, CLS, SEP = 0, 1, 2


def _docs(n_docs: int, sentences: tuple[int, int], length: tuple[int, int], seed: int = 0):
    """docs -> sentences -> ids, id = 100000·(d+1) + 100·s + p: unique and traceable."""
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(n_docs):
        n = int(rng.integers(*sentences))
        docs.append(
            [[100000 * (d + 1) + 100 * s + p for p in range(int(rng.integers(*length)))] for s in range(n)]
        )
    return docs


def _where(docs):
    """id -> (doc, position in the document's token stream, sentence start?, sentence end?)."""
    out = {}
    for d, doc in enumerate(docs):
        pos = 0
        for s in doc:
            for k, t in enumerate(s):
                out[t] = (d, pos, k == 0, k == len(s) - 1)
                pos += 1
    return out


def _any_word_starts(ids: np.ndarray) -> np.ndarray:
    return ids % 3 != 1


# ---------------------------------------------------------------------------------------------
# Sentence splitting.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("It rained. We stayed in! Did you? Yes.", ["It rained.", "We stayed in!", "Did you?", "Yes."]),
        (
            "Dr. Smith met J. R. R. Tolkien in Jan. 1950. They talked.",
            ["Dr. Smith met J. R. R. Tolkien in Jan. 1950.", "They talked."],
        ),
        (
            'He said "Stop." She left (quietly.) Then 3 more came.',
            ['He said "Stop."', "She left (quietly.)", "Then 3 more came."],
        ),
        (
            "Use e.g. lists, i.e. sequences. version 3.11 is out. Fine",
            ["Use e.g. lists, i.e. sequences. version 3.11 is out.", "Fine"],
        ),
        ("  spread\n over   lines.  ", ["spread over lines."]),
        ("", []),
    ],
)
def test_split_sentences(text, expected):
    assert tx.split_sentences(text) == expected


# ---------------------------------------------------------------------------------------------
# BERT.


def _bert(docs, **kw):
    kw = {"max_length": 32, "rng": np.random.default_rng(0), "short_seq_prob": 0.1, **kw}
    return list(
        tx.bert_examples(docs, cls_id=CLS, sep_id=SEP, pad_id=PAD, word_starts_fn=_any_word_starts, **kw)
    )


def test_bert_exact_layout_of_a_tiny_document():
    docs = [[[10, 11], [12, 13, 14], [15]]]
    (ex,) = _bert(docs, max_length=12, nsp=False, short_seq_prob=0.0)
    # The chunk is the whole document; A is its first sentence or its first two.
    layouts = {
        (CLS, 10, 11, SEP, 12, 13, 14, 15, SEP, PAD, PAD, PAD): (0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0),
        (CLS, 10, 11, 12, 13, 14, SEP, 15, SEP, PAD, PAD, PAD): (0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0),
    }
    ids = tuple(ex["input_ids"].tolist())
    assert ids in layouts and tuple(ex["token_type_ids"].tolist()) == layouts[ids]
    assert ex["attention_mask"].tolist() == [1] * 9 + [0] * 3
    assert ex["special_tokens_mask"].tolist() == [i in (CLS, SEP, PAD) for i in ids]
    assert ex["next_sentence_label"] == 0 and ex["next_sentence_label"].shape == ()
    dtypes = {k: v.dtype for k, v in ex.items()}
    assert dtypes == {
        "input_ids": np.int32,
        "token_type_ids": np.int32,
        "attention_mask": np.int32,
        "word_starts": np.bool_,
        "special_tokens_mask": np.bool_,
        "next_sentence_label": np.int32,
    }


def test_bert_pairs_trace_back_to_their_documents():
    docs = _docs(8, (3, 30), (1, 14))
    where = _where(docs)
    T = 32
    examples = _bert(docs, max_length=T, dupe_factor=2)
    assert len(examples) > 50
    labels = []
    for ex in examples:
        ids, types, att = ex["input_ids"], ex["token_type_ids"], ex["attention_mask"]
        n = int(att.sum())
        assert att.tolist() == [1] * n + [0] * (T - n) and 5 <= n <= T
        seps = np.flatnonzero(ids[:n] == SEP).tolist()
        assert ids[0] == CLS and len(seps) == 2 and seps[1] == n - 1
        a, b = ids[1 : seps[0]].tolist(), ids[seps[0] + 1 : n - 1].tolist()
        assert a and b and (ids[n:] == PAD).all()
        assert types.tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * (T - n)
        # Word starts: the builder's function, plus every special / padding position and the token after one.
        expected = _any_word_starts(ids) | ex["special_tokens_mask"]
        expected[[1, seps[0] + 1]] = True
        assert (ex["word_starts"] == expected).all()
        assert ex["special_tokens_mask"].tolist() == [k in (0, seps[0], n - 1) or k >= n for k in range(T)]
        # A: contiguous tokens of one document; B: of the same document after A (label 0) or of another (1).
        da, pa = zip(*[where[t][:2] for t in a], strict=True)
        db, pb = zip(*[where[t][:2] for t in b], strict=True)
        assert len(set(da)) == 1 and list(pa) == list(range(pa[0], pa[0] + len(a)))
        assert list(pb) == list(range(pb[0], pb[0] + len(b)))
        label = int(ex["next_sentence_label"])
        labels.append(label)
        if label == 0:
            assert db[0] == da[0] and pb[0] > pa[-1]
            if n < T:  # not truncated: whole sentences, B right after A
                assert pb[0] == pa[-1] + 1 and where[a[0]][2] and where[b[-1]][3]
        else:
            assert db[0] != da[0]  # 10 tries at another of 8 documents
    assert 0 < sum(labels) < len(labels)


def test_bert_nsp_is_balanced():
    # Many short sentences: every chunk has >= 2 sentences but (rarely) a document's last one.
    docs = _docs(30, (150, 200), (2, 5), seed=1)
    labels = [
        int(ex["next_sentence_label"]) for ex in _bert(docs, max_length=48, short_seq_prob=0.0, dupe_factor=3)
    ]
    assert len(labels) > 1000
    assert abs(np.mean(labels) - 0.5) < 0.06  # 5 standard deviations + a few single-sentence chunks


def test_bert_lengths_follow_short_seq_prob_and_nsp_false_keeps_continuations():
    docs = _docs(12, (20, 40), (3, 12), seed=2)
    T = 40
    full = _bert(docs, max_length=T, short_seq_prob=0.0, nsp=False)
    # Without short sequences every chunk reaches the target and is cut to T, except each document's last.
    short = [ex for ex in full if ex["attention_mask"].sum() < T]
    assert len(short) <= len(docs) and len(full) > 3 * len(docs)
    assert all(int(ex["next_sentence_label"]) == 0 for ex in full)
    always = _bert(docs, max_length=T, short_seq_prob=1.0, nsp=False)
    assert np.mean([ex["attention_mask"].sum() for ex in always]) < 0.75 * T
    assert len(always) > len(full)


def test_bert_is_deterministic_in_the_rng():
    docs = _docs(5, (5, 20), (1, 10))
    a = _bert(docs, rng=np.random.default_rng(7))
    b = _bert(docs, rng=np.random.default_rng(7))
    assert len(a) == len(b) and all((x[k] == y[k]).all() for x, y in zip(a, b, strict=True) for k in x)


# ---------------------------------------------------------------------------------------------
# RoBERTa FULL-SENTENCES.

BOS, RPAD, EOS = 0, 1, 2


def _roberta(docs, max_length):
    return list(
        tx.roberta_full_sentences(
            docs, max_length=max_length, bos_id=BOS, eos_id=EOS, pad_id=RPAD, word_starts_fn=_any_word_starts
        )
    )


def test_roberta_exact_layout():
    s1, s2, t1, u1, u2 = [11, 12, 13], [14, 15], [21, 22, 23, 24], [31, 32], [33, 34, 35, 36, 37]
    examples = _roberta([[s1, s2], [t1], [u1, u2]], max_length=10)
    expected = [
        [BOS, *s1, *s2, EOS, RPAD, RPAD, RPAD],  # t1 does not fit: the doc separator becomes the closing </s>
        [BOS, *t1, EOS, *u1, EOS, RPAD],  # crosses a document boundary with a separator
        [BOS, *u2, EOS, RPAD, RPAD, RPAD],
    ]
    assert [ex["input_ids"].tolist() for ex in examples] == expected
    assert examples[1]["attention_mask"].tolist() == [1] * 9 + [0]
    assert examples[1]["special_tokens_mask"].tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 1, 1]
    assert {k: v.dtype for k, v in examples[0].items()} == {
        "input_ids": np.int32,
        "attention_mask": np.int32,
        "word_starts": np.bool_,
        "special_tokens_mask": np.bool_,
    }


def test_roberta_packs_full_sentences_greedily_across_documents():
    docs = _docs(20, (1, 8), (1, 30), seed=3) + [[list(range(5000000, 5000100))]]  # one sentence > T - 2
    where = _where(docs)
    T = 64
    examples = _roberta(docs, T)
    contents, stream = [], []
    for ex in examples:
        ids = ex["input_ids"]
        n = int(ex["attention_mask"].sum())
        assert ids[0] == BOS and ids[n - 1] == EOS and (ids[n:] == RPAD).all() and n <= T
        content = ids[1 : n - 1].tolist()
        inner = [k for k, t in enumerate(content) if t == EOS]
        for (
            k
        ) in inner:  # separators sit exactly between the last token of a document and the next one's first
            before, after = where[content[k - 1]], where[content[k + 1]]
            assert after[0] == before[0] + 1 and after[1] == 0
        tokens = [t for t in content if t != EOS]
        assert tokens and (where[tokens[0]][2] or tokens[0] >= 5000000)  # starts with a sentence
        assert where[tokens[-1]][3] or tokens[-1] >= 5000000  # ends with one
        docs_in = [where[t][0] for t in tokens]
        assert len(inner) == len(set(docs_in)) - 1
        contents.append(content)
        stream.extend(tokens)
    assert stream == [t for doc in docs for s in doc for t in s]  # nothing lost, repeated or reordered
    # Greedy: the next input's first sentence would not have fitted into this one.
    for cur, nxt in itertools.pairwise(contents):
        first = where[nxt[0]]
        sentence = 1
        while sentence < len(nxt) and nxt[sentence] != EOS and not where[nxt[sentence]][2]:
            sentence += 1
        new_doc = first[0] != where[cur[-1]][0]
        assert len(cur) + new_doc + sentence > T - 2 or nxt[0] >= 5000000


# ---------------------------------------------------------------------------------------------
# GPT packing.


def test_gpt_exact_layout():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    four = list(tx.gpt_packed(docs, length=4, eos_id=1))
    assert [ex["input_ids"].tolist() for ex in four] == [[5, 6, 7, 1], [8, 9, 1, 10], [11, 12, 13, 1]]
    assert [ex["segment_ids"].tolist() for ex in four] == [[1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 1, 1]]
    five = list(tx.gpt_packed(docs, length=5, eos_id=1, pad_id=0))
    assert [ex["input_ids"].tolist() for ex in five] == [
        [5, 6, 7, 1, 8],
        [9, 1, 10, 11, 12],
        [13, 1, 0, 0, 0],
    ]
    assert [ex["segment_ids"].tolist() for ex in five] == [[1, 1, 1, 1, 2], [1, 1, 2, 2, 2], [1, 1, 0, 0, 0]]
    assert len(list(tx.gpt_packed(docs, length=5, eos_id=1, drop_remainder=True))) == 2
    assert {k: v.dtype for k, v in five[0].items()} == {"input_ids": np.int32, "segment_ids": np.int32}


def test_gpt_stream_and_segments():
    rng = np.random.default_rng(4)
    docs = [rng.integers(10, 1000, int(rng.integers(1, 50))).tolist() for _ in range(40)]
    eos = 3
    windows = list(tx.gpt_packed(docs, length=16, eos_id=eos, pad_id=0))
    ids = np.concatenate([w["input_ids"] for w in windows])
    seg = np.concatenate([w["segment_ids"] for w in windows])
    assert ids[seg > 0].tolist() == [t for d in docs for t in [*d, eos]]
    for w in windows:
        s, i = w["segment_ids"], w["input_ids"]
        real = s > 0
        assert s[0] == 1 and (np.diff(s[real]) >= 0).all()
        # A new segment starts exactly after an <eos>.
        assert ((np.diff(s[real]) == 1) == (i[real][:-1] == eos)).all()


# ---------------------------------------------------------------------------------------------
# prepare_text end to end: real documents, bad files, tfds on disk, the loader.


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pydoc_data.topics import topics  # real English prose that ships with CPython

    root = tmp_path_factory.mktemp("corpus")
    names = ["assignment", "class", "for", "function", "if", "import", "try", "while"]
    for name in names:
        (root / f"{name}.txt").write_text(topics[name], encoding="utf-8")
    (root / "sub").mkdir()
    (root / "sub" / "empty.txt").write_bytes(b"")
    (root / "sub" / "blank.txt").write_text(" \n\n\t\n")
    (root / "latin1.txt").write_bytes("café au lait, naïve".encode("latin-1"))
    (root / "utf16.txt").write_bytes("Hello in UTF-16".encode("utf-16"))
    (root / "nul.txt").write_bytes(b"binary\x00data")
    long_line = "xylophonequartz " * 2000  # 32,000 characters
    (root / "long.txt").write_text("A fine first paragraph.\n" + long_line + "\nA fine last line.\n")
    (root / "only_long.txt").write_text(long_line)
    (root / ".hidden").write_text("never read")
    return root, len(names) + 1


def _check_bert_record(ex, T, tok):
    ids = ex["input_ids"]
    n = int(ex["attention_mask"].sum())
    assert ids.shape == (T,) and ids.dtype == np.int32 and ex["next_sentence_label"].dtype == np.int32
    assert ids[0] == tok.cls_id and ids[n - 1] == tok.sep_id and (ids[n:] == tok.pad_id).all()
    assert ((0 <= ids) & (ids < tok.vocab_size)).all()
    assert (ids[:n] == tok.sep_id).sum() == 2


def test_prepare_bert_counts_bad_records_and_reads_back(corpus, tmp_path):
    root, n_good = corpus
    out = tmp_path / "bert"
    result = td.prepare_text(
        root, out, layout="bert", max_length=(32, 64), vocab_size=1200, validation_fraction=0.2
    )
    assert result["skipped"] == {"non_utf8": 3, "empty": 3, "long_lines": 2, "unreadable": 0}
    assert result["documents"] == {"train": n_good - 2, "validation": 2} and result["files"] == 15
    assert json.loads((out / "prepare.json").read_text())["skipped"] == result["skipped"]
    for T in (32, 64):
        info = result["datasets"][str(T)]
        assert info["train"] > 20 and info["validation"] > 2
        with pytest.raises(ValueError, match="pass max_length"):
            td.open_text_dataset(out, "train")
        source, tok = td.open_text_dataset(out, "train", max_length=T)
        assert len(source) == info["train"] and tok.kind == "wordpiece"
        records = [source[i] for i in range(len(source))]
        for ex in records:
            _check_bert_record(ex, T, tok)
        labels = [int(ex["next_sentence_label"]) for ex in records]
        assert 0 < sum(labels) < len(labels)
        text = " ".join(tok.decode(ex["input_ids"]) for ex in records)
        assert "xylophonequartz" not in text and "statement" in text
    # The tokenizer saved beside the data is the one that made it.
    assert result["tokenizer"]["cls_id"] == tok.cls_id and (out / "tokenizer" / "vocab.txt").is_file()
    with pytest.raises(FileExistsError):
        td.prepare_text(root, out, layout="bert")


def test_prepare_is_deterministic_and_splits_by_document(corpus, tmp_path):
    root, _ = corpus
    runs = [
        td.prepare_text(root, tmp_path / str(k), layout="gpt", max_length=32, vocab_size=600)
        for k in range(2)
    ]
    assert runs[0]["datasets"] == runs[1]["datasets"]
    assert (tmp_path / "0/tokenizer/tokenizer.json").read_text() == (
        tmp_path / "1/tokenizer/tokenizer.json"
    ).read_text()
    for split in ("train", "validation"):
        a, _ = td.open_text_dataset(tmp_path / "0", split)
        b, _ = td.open_text_dataset(tmp_path / "1", split)
        assert all((a[i]["input_ids"] == b[i]["input_ids"]).all() for i in range(len(a)))
    files, base = td.resolve_inputs(root)
    docs, _ = td.read_documents(files, base)
    split = td.split_documents(docs, 0.3, seed=5)
    again = td.split_documents(list(reversed(docs)), 0.3, seed=5)
    keys = {s: {d.key for d in split[s]} for s in split}
    assert keys == {s: {d.key for d in again[s]} for s in again}
    assert not keys["train"] & keys["validation"] and len(keys["validation"]) == round(0.3 * len(docs))


def test_prepare_roberta_and_gpt_layouts(corpus, tmp_path):
    from maskjax.data.pipeline import Loader

    root, _ = corpus
    r = td.prepare_text(root, tmp_path / "r", layout="roberta", max_length=48, vocab_size=800)
    source, tok = td.open_text_dataset(tmp_path / "r", "train")
    assert tok.kind == "bpe" and (tok.bos_id, tok.pad_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 4)
    for i in range(len(source)):
        ids, n = source[i]["input_ids"], int(source[i]["attention_mask"].sum())
        assert ids[0] == tok.bos_id and ids[n - 1] == tok.eos_id and (ids[n:] == tok.pad_id).all()
    assert r["datasets"]["48"]["train"] == len(source)
    # Byte-level BPE keeps the text: an input decodes to running text of the corpus.
    first = tok.decode(source[0]["input_ids"])
    assert first.split(".")[0] and "\ufffd" not in first

    td.prepare_text(root, tmp_path / "g", layout="gpt", max_length=40, vocab_size=700)
    source, tok = td.open_text_dataset(tmp_path / "g", "validation")
    assert tok.eos_id == 0 and tok.pad_id is None
    loader = Loader(source, global_batch=4, seed=0)
    batch = next(loader)
    assert batch["input_ids"].shape == (4, 40) and batch["input_ids"].dtype == np.int32
    assert batch["segment_ids"].dtype == np.int32 and (batch["segment_ids"][:, 0] == 1).all()


def test_blank_line_documents_skip_only_the_bad_one(tmp_path):
    good = "The first document has a sentence. And another one.\nIt goes on."
    (tmp_path / "many.txt").write_bytes(
        good.encode() + b"\n\n  \n" + b"bad \xff\xfe bytes" + b"\n\n" + b"Third document here."
    )
    docs, counts = td.read_documents([tmp_path / "many.txt"], tmp_path, documents="blank_line")
    assert [d.key for d in docs] == ["many.txt#0", "many.txt#2"]
    assert counts["non_utf8"] == 1 and counts["empty"] == 0
    assert docs[0].paragraphs == [" ".join(good.split())]
    with pytest.raises(ValueError, match="documents must be"):
        td.read_documents([tmp_path / "many.txt"], tmp_path, documents="lines")
    with pytest.raises(FileNotFoundError, match="no files"):
        td.prepare_text(tmp_path / "nothing*.txt", tmp_path / "out")
    # Two documents, none held out: a train split only, and a clear error for the missing one.
    result = td.prepare_text(
        tmp_path / "many.txt",
        tmp_path / "out",
        layout="bert",
        max_length=16,
        documents="blank_line",
        vocab_size=200,
        validation_fraction=0.0,
    )
    assert result["documents"] == {"train": 2, "validation": 0} and result["skipped"]["non_utf8"] == 1
    assert result["datasets"]["16"]["validation"] == 0 and len(td.open_text_dataset(tmp_path / "out")[0]) > 0
    with pytest.raises(ValueError, match="no validation split"):
        td.open_text_dataset(tmp_path / "out", "validation")


def test_demo_corpora(tmp_path):
    docs_dir = td.demo_corpus(tmp_path, "python-docs")
    files = sorted(docs_dir.glob("*.txt"))
    assert len(files) > 40 and all(f.stat().st_size >= 1000 for f in files)
    if importlib.util.find_spec("gensim") is None:
        pytest.skip("the Wikipedia demo corpus needs `pip install gensim` (its wheel ships the sample)")
    wiki = sorted(td.demo_corpus(tmp_path, "wikipedia").glob("*.txt"))
    assert len(wiki) > 80 and sum(f.stat().st_size for f in wiki) > 2_000_000
    anarchism = next(f for f in wiki if f.name.endswith("_Anarchism.txt")).read_text(encoding="utf-8")
    assert anarchism.startswith("Anarchism is a political philosophy") and "==" not in anarchism
