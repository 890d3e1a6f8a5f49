"""Fixed-length text examples, built the way each paper built them (pure Python + numpy).

Input: tokenized documents. BERT and RoBERTa take documents as sentences of ids
(`list[list[list[int]]]`, docs -> sentences -> ids); GPT takes one id list per
document. Output: dicts of numpy arrays of one fixed length T, ready to be
written by tfds; masking happens later, on device.

  BERT     [CLS] A [SEP] B [SEP] [PAD]...     NSP pairs (Devlin et al. 2019, Sec. 3.1, A.2)
  RoBERTa  <s> s1 s2 </s> t1 t2 </s> <pad>... FULL-SENTENCES packing (Liu et al. 2019, Sec. 4.2)
  GPT      d1 d1 <eos> d2 d2 d2 <eos> d3 ...  contiguous token stream cut into windows

Record keys and dtypes (T = max_length):
  bert     input_ids (T,) int32, token_type_ids (T,) int32, attention_mask (T,) int32,
           word_starts (T,) bool, special_tokens_mask (T,) bool, next_sentence_label () int32
  roberta  input_ids, attention_mask (T,) int32, word_starts, special_tokens_mask (T,) bool
  gpt      input_ids (T,) int32, segment_ids (T,) int32

word_starts is True at the first piece of every word and at every special or
padding position (each is a one-token word), so word k spans
[start_k, start_{k+1}) and never crosses a separator; special_tokens_mask marks
[CLS]/[SEP]/<s>/</s>/[PAD] so the masking can leave them alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np

Example = dict[str, np.ndarray]
WordStartsFn = Callable[[np.ndarray], np.ndarray]

# Abbreviations after which a period does not end a sentence (lowercased, without the period).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt ft vs etc e.g i.e cf al approx no nos fig figs vol pp ed eds "
    "inc ltd co corp bros gen col lt sgt capt cmdr adm gov sen rep rev hon pres est dept univ "
    "jan feb mar apr jun jul aug sep sept oct nov dec ca c viz resp eq eqs ch sec".split()
)
_BOUNDARY = re.compile(r"[.!?]+[\"'’”»)\]]*\s+")
_OPENERS = "\"'“‘«(["


def split_sentences(text: str) -> list[str]:
    """Rule-based sentence split of one paragraph (no model, no download).

    A sentence ends at ".", "!" or "?" (possibly repeated and followed by closing
    quotes or brackets), then whitespace, then an upper-case letter, a digit or
    an opening quote/bracket, unless the word before the period is a known
    abbreviation ("Dr.", "e.g.", "Jan.") or a single letter ("J. R. R.").
    Whitespace is collapsed; empty sentences are dropped.
    """
    text = " ".join(text.split())
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        nxt = text[m.end() : m.end() + 2]
        if not nxt or not (nxt[0].isupper() or nxt[0].isdigit() or (nxt[0] in _OPENERS)):
            continue
        if text[m.start()] == ".":
            word = text[start : m.start()].rsplit(" ", 1)[-1].lstrip(_OPENERS).lower()
            if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue
        sentences.append(text[start : m.end()].strip())
        start = m.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def _word_starts(ids: list[int], special: np.ndarray, word_starts_fn: WordStartsFn | None) -> np.ndarray:
    """word_starts_fn (None: every token is a word), then every special token and the token after one."""
    ids_arr = np.asarray(ids, np.int64)
    if word_starts_fn is None:
        return np.ones(ids_arr.shape, bool)
    starts = np.asarray(word_starts_fn(ids_arr), bool).copy()
    starts |= special
    starts[1:] |= special[:-1]
    if starts.size:
        starts[0] = True
    return starts


def _pad(values: np.ndarray, length: int, fill) -> np.ndarray:
    out = np.full((length,), fill, values.dtype)
    out[: values.size] = values
    return out


def _truncate_seq_pair(a: list[int], b: list[int], max_num_tokens: int, rng: np.random.Generator) -> None:
    """Drop one token at a time from the longer segment, from its front or back at random.

    As in Google BERT's create_pretraining_data.py `truncate_seq_pair`.
    """
    while len(a) + len(b) > max_num_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def bert_examples(
    documents: Sequence[Sequence[Sequence[int]]],
    *,
    max_length: int,
    rng: np.random.Generator,
    cls_id: int,
    sep_id: int,
    pad_id: int,
    word_starts_fn: WordStartsFn | None = None,
    short_seq_prob: float = 0.1,
    nsp: bool = True,
    dupe_factor: int = 1,
) -> Iterator[Example]:
    """BERT pre-training pairs, following Google BERT's create_pretraining_data.py.

    Per document: a target length of max_length - 3 tokens, or with probability
    short_seq_prob a uniform one in [2, max_length - 3] (the script's default
    0.1: some short inputs lessen the mismatch with fine-tuning). Whole sentences are
    gathered until the target is reached; a random prefix of them (>= 1
    sentence) is segment A. With nsp, half of the time (and always when the
    chunk is a single sentence) B is taken from a random other document
    starting at a random sentence, up to the remaining target length, and the
    unused sentences go back to the document; otherwise B is the rest of the
    chunk. The longer segment then loses tokens from its front or back at random
    until both fit. Layout (T = max_length):

        input_ids       [CLS] a1 .. an [SEP] b1 .. bm [SEP] [PAD] ..     n + m + 3 <= T
        token_type_ids    0   0 ..  0   0    1  ..  1   1     0   ..
        attention_mask    1   1 ..  1   1    1  ..  1   1     0   ..
        next_sentence_label  0 = B continues A, 1 = B is random (transformers' BertForPreTraining)

    nsp=False: B is always the actual continuation (label 0); a one-sentence
    chunk gives `[CLS] A [SEP]` alone. Documents with no tokens are ignored.
    `dupe_factor` repeats the whole pass with fresh randomness, as the
    original script did (there, also to vary its static masks). word_starts_fn
    None: every token is its own word (no whole-word masking).
    """
    if max_length < 5:
        raise ValueError(f"max_length must be >= 5 for [CLS] A [SEP] B [SEP]; got {max_length}")
    docs = [[list(s) for s in doc if len(s)] for doc in documents]
    docs = [d for d in docs if d]
    for _ in range(dupe_factor):
        for index in range(len(docs)):
            yield from _bert_document(
                docs, index, max_length, rng, cls_id, sep_id, pad_id, word_starts_fn, short_seq_prob, nsp
            )


def _bert_document(docs, index, max_length, rng, cls_id, sep_id, pad_id, word_starts_fn, short_seq_prob, nsp):
    """create_instances_from_document: the pairs of one document (see `bert_examples`)."""
    document = docs[index]
    max_num_tokens = max_length - 3
    target = max_num_tokens
    if rng.random() < short_seq_prob:
        target = int(rng.integers(2, max_num_tokens + 1))
    chunk: list[list[int]] = []
    chunk_len = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        chunk_len += len(document[i])
        if i == len(document) - 1 or chunk_len >= target:
            a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
            tokens_a = [t for s in chunk[:a_end] for t in s]
            tokens_b: list[int] = []
            random_next = False
            if nsp and (len(chunk) == 1 or rng.random() < 0.5):
                random_next = True
                target_b = target - len(tokens_a)
                # Ten tries at another document; with a one-document corpus it may be this one.
                for _ in range(10):
                    other = int(rng.integers(0, len(docs)))
                    if other != index:
                        break
                random_doc = docs[other]
                for sentence in random_doc[int(rng.integers(0, len(random_doc))) :]:
                    tokens_b.extend(sentence)
                    if len(tokens_b) >= target_b:
                        break
                i -= len(chunk) - a_end  # the unused sentences start the next chunk
            else:
                tokens_b = [t for s in chunk[a_end:] for t in s]
            _truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
            yield _bert_record(
                tokens_a, tokens_b, random_next, max_length, cls_id, sep_id, pad_id, word_starts_fn
            )
            chunk, chunk_len = [], 0
        i += 1


def _bert_record(a, b, random_next, max_length, cls_id, sep_id, pad_id, word_starts_fn) -> Example:
    ids = [cls_id, *a, sep_id] + ([*b, sep_id] if b else [])
    types = [0] * (len(a) + 2) + [1] * (len(b) + 1 if b else 0)
    special = np.zeros(len(ids), bool)
    special[[0, len(a) + 1, len(ids) - 1]] = True
    n = len(ids)
    return {
        "input_ids": _pad(np.asarray(ids, np.int32), max_length, pad_id),
        "token_type_ids": _pad(np.asarray(types, np.int32), max_length, 0),
        "attention_mask": _pad(np.ones(n, np.int32), max_length, 0),
        "word_starts": _pad(_word_starts(ids, special, word_starts_fn), max_length, True),
        "special_tokens_mask": _pad(special, max_length, True),
        "next_sentence_label": np.asarray(int(random_next), np.int32),
    }


def roberta_full_sentences(
    documents: Sequence[Sequence[Sequence[int]]],
    *,
    max_length: int = 512,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    word_starts_fn: WordStartsFn | None = None,
) -> Iterator[Example]:
    """RoBERTa's FULL-SENTENCES inputs (Liu et al. 2019, Sec. 4.2), no NSP.

    "Each input is packed with full sentences sampled contiguously from one or
    more documents, such that the total length is at most 512 tokens. Inputs
    may cross document boundaries. When we reach the end of one document, we
    begin sampling sentences from the next document and add an extra separator
    token between documents." Layout (T = max_length):

        input_ids       <s> s1 s2 .. </s> t1 t2 .. </s> <pad> ..   (s = doc 1's sentences, t = doc 2's)
        attention_mask   1  1  1  ..  1   1  1  ..  1    0   ..

    Sentences are never split across inputs; the next input starts with the
    sentence that did not fit. The separator between documents and the closing
    separator are both </s>; when an input ends exactly at a document's end, a
    single </s> closes it. A sentence longer than T - 2 tokens is cut into
    pieces of T - 2 (the only case where a sentence is split).
    """
    capacity = max_length - 2
    if capacity < 1:
        raise ValueError(f"max_length must be >= 3 for <s> x </s>; got {max_length}")
    block: list[int] = []
    separators: list[int] = []  # positions in `block` of the between-documents </s>

    def emit() -> Example:
        ids = [bos_id, *block, eos_id]
        special = np.zeros(len(ids), bool)
        special[[0, len(ids) - 1, *(p + 1 for p in separators)]] = True
        return {
            "input_ids": _pad(np.asarray(ids, np.int32), max_length, pad_id),
            "attention_mask": _pad(np.ones(len(ids), np.int32), max_length, 0),
            "word_starts": _pad(_word_starts(ids, special, word_starts_fn), max_length, True),
            "special_tokens_mask": _pad(special, max_length, True),
        }

    for doc in documents:
        sentences = [list(s) for s in doc if len(s)]
        if not sentences:
            continue
        if block:  # a new document inside a partly filled input: separator first
            if len(block) + 1 >= capacity:
                yield emit()
                block, separators = [], []
            else:
                separators.append(len(block))
                block.append(eos_id)
        for sentence in sentences:
            pieces = [sentence[k : k + capacity] for k in range(0, len(sentence), capacity)]
            for piece in pieces:
                if len(block) + len(piece) > capacity:
                    if separators and separators[-1] == len(block) - 1:  # trailing separator: </s> closes
                        block.pop()
                        separators.pop()
                    yield emit()
                    block, separators = [], []
                block.extend(piece)
    if block:
        yield emit()


def gpt_packed(
    documents: Sequence[Sequence[int]],
    *,
    length: int,
    eos_id: int,
    pad_id: int | None = None,
    drop_remainder: bool = False,
) -> Iterator[Example]:
    """GPT inputs: all documents as one stream, each followed by <eos>, cut into windows of `length`.

    GPT-2 trains on contiguous 1,024-token windows (Radford et al. 2019, Sec.
    2.3) of documents delimited by an end-of-text token (Brown et al. 2020,
    Sec. 2.3; "<|endoftext|>" in GPT-2's released encoder). segment_ids number the
    documents inside each window from 1 (0 = padding), so attention can stay
    within a document while the loss covers every next token of the stream
    (`masking.causal_lm`). Layout:

        input_ids     d1 d1 d1 <eos> d2 d2 <eos> d3 | d3 d3 <eos> <pad> <pad>
        segment_ids    1  1  1   1    2  2   2    3 |  1  1   1     0     0

    Windows do not overlap; the model predicts input_ids[t + 1] from
    input_ids[:t + 1] inside the window. The last, partial window is padded
    with pad_id (default eos_id) unless drop_remainder.
    """
    pad_id = eos_id if pad_id is None else pad_id
    docs = [list(d) for d in documents if len(d)]
    if not docs:
        return
    stream = np.concatenate([np.asarray([*d, eos_id], np.int32) for d in docs])
    doc_index = np.concatenate([np.full(len(d) + 1, k, np.int32) for k, d in enumerate(docs)])
    for start in range(0, stream.size, length):
        ids, seg = stream[start : start + length], doc_index[start : start + length]
        if ids.size < length and drop_remainder:
            break
        yield {
            "input_ids": _pad(ids, length, pad_id),
            "segment_ids": _pad(seg - seg[0] + 1, length, 0),
        }
