"""Tokenizers of the papers: BERT's WordPiece and the byte-level BPE of GPT-2 / RoBERTa.

A thin `Tokenizer` over the HF `tokenizers` library (Rust, multi-threaded) that
adds what the example builders need: the special ids, whole-word markers, and
loading the files exactly as the papers released them.

  WordPiece  vocab.txt (one token per line, id = line number), BERT's basic
             tokenizer: clean text, split CJK, optional lowercase + accent strip,
             split on whitespace and punctuation, then greedy longest-match pieces
             with "##" continuations (Devlin et al. 2019, Sec. 3; Wu et al. 2016).
  BPE        vocab.json + merges.txt over bytes mapped to printable characters
             ("Ġ" = space), GPT-2's pre-tokenizer regex, merges applied by rank
             (Radford et al. 2019, Sec. 2.2). RoBERTa uses the same BPE (Liu et al.
             2019, Sec. 4.4).

`encode` never turns text into special ids: "[SEP]" or "</s>" written in a
corpus stays ordinary text, so only the example builders place separators.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers

# Names of the special tokens in BERT's vocab.txt and in RoBERTa's / GPT-2's vocab.json.
_SPECIAL_NAMES = {
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
    "mask": ("[MASK]", "<mask>"),
    "bos": ("<s>", "<|endoftext|>"),
    "eos": ("</s>", "<|endoftext|>"),
}
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0..3 as in RoBERTa's dictionary
GPT2_SPECIALS = ("<|endoftext|>",)
# The files a tokenizer is read from (`load`); a transformers directory holds them beside its weights.
FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt")
# sha256 of whisper/assets/gpt2.tiktoken (openai-whisper 20250625): GPT-2's 50,256 BPE ranks.
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
_WHITESPACE_BYTES = frozenset(b" \t\n\r\x0b\x0c")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (Radford et al. 2019, Sec. 2.2).

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls,
    space, ...) map to chr(256 + k) in byte order, so space (0x20) is "Ġ".
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Tokenizer:
    """An HF `tokenizers.Tokenizer` plus the ids the example builders need.

    kind: "wordpiece" or "bpe". Special ids are None where the vocabulary has no
    such token (GPT-2 has no pad, cls, sep or mask; BERT no bos/eos).
    """

    def __init__(self, hf: tokenizers.Tokenizer):
        self.hf = hf
        model = json.loads(hf.to_str())["model"]["type"]
        if model not in ("WordPiece", "BPE"):
            raise ValueError(f"tokenizer model must be WordPiece or BPE; got {model}")
        self.kind = "wordpiece" if model == "WordPiece" else "bpe"
        # Special tokens in raw text are encoded as text, never as separators.
        hf.encode_special_tokens = True
        vocab = hf.get_vocab(with_added_tokens=True)
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        for role, names in _SPECIAL_NAMES.items():
            ids = [vocab[n] for n in names if n in vocab]
            setattr(self, f"{role}_id", ids[0] if ids else None)
        self.pad_id: int | None
        self.unk_id: int | None
        self.cls_id: int | None
        self.sep_id: int | None
        self.mask_id: int | None
        self.bos_id: int | None
        self.eos_id: int | None
        self._tables()

    def _tables(self) -> None:
        """Per-id lookup tables: is the token special, does it begin / end with whitespace."""
        n = self.vocab_size
        self._special = np.zeros(n, bool)
        for i in self.special_ids:
            self._special[i] = True
        self._continues = np.zeros(n, bool)  # WordPiece: "##x"; BPE: no leading whitespace
        self._ends_space = np.zeros(n, bool)  # BPE: token ends with whitespace (e.g. "Ċ")
        if self.kind == "wordpiece":
            for token, i in self.hf.get_vocab().items():
                self._continues[i] = token.startswith("##")
        else:
            inverse = {c: b for b, c in bytes_to_unicode().items()}
            for token, i in self.hf.get_vocab().items():
                if self._special[i] or any(c not in inverse for c in token):
                    continue
                raw = bytes(inverse[c] for c in token)
                self._continues[i] = bool(raw) and raw[0] not in _WHITESPACE_BYTES
                self._ends_space[i] = bool(raw) and raw[-1] in _WHITESPACE_BYTES

    @property
    def special_ids(self) -> list[int]:
        ids = {self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id, self.bos_id, self.eos_id}
        return sorted(i for i in ids if i is not None)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts at once, in parallel threads."""
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(int(i))

    def is_special(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """(T,) bool: which ids are special tokens (pad, cls, sep, mask, bos, eos, unk)."""
        return self._special[np.asarray(ids, np.int64)]

    def word_starts(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """(T,) bool: True where a new word begins, for whole-word masking.

        WordPiece: every token not starting with "##". Byte-level BPE: a token
        whose text starts with whitespace ("Ġ", "Ċ", ...) or follows a token that
        ends with it. The first token and every special token (and the token after
        one) always start a word, so words never straddle a separator.
        """
        ids = np.asarray(ids, np.int64)
        if ids.size == 0:
            return np.zeros(0, bool)
        starts = ~self._continues[ids] | self._special[ids]
        follows = np.zeros_like(starts)
        follows[1:] = self._special[ids[:-1]] | self._ends_space[ids[:-1]]
        starts |= follows
        starts[0] = True
        return starts

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` (all of it) and the native files (vocab.txt, or vocab.json + merges.txt)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / "tokenizer.json"))
        if self.kind == "wordpiece":
            vocab = self.hf.get_vocab()
            tokens = sorted(vocab, key=vocab.get)
            (directory / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
        else:
            self.hf.model.save(str(directory))
        return directory


def _wordpiece_pipeline(tok: tokenizers.Tokenizer, lowercase: bool) -> tokenizers.Tokenizer:
    # strip_accents=None: accents are stripped exactly when lowercasing, as in BERT's uncased models.
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _bpe_pipeline(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    # GPT-2's regex split, then bytes -> printable characters; no prefix space (GPT-2 and RoBERTa default).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _register_specials(tok: tokenizers.Tokenizer, names: Iterable[str]) -> None:
    vocab = tok.get_vocab()
    present = [n for n in names if n in vocab]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in present])


def load_wordpiece(vocab_txt: str | os.PathLike, *, lowercase: bool = True) -> Tokenizer:
    """BERT's WordPiece from a released `vocab.txt` (uncased: lowercase=True; cased: False)."""
    lines = Path(vocab_txt).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    vocab: dict[str, int] = {}
    for i, token in enumerate(lines):
        vocab.setdefault(token, i)
    # max_input_chars_per_word=100: BERT's tokenization.py maps longer words to [UNK].
    tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    _register_specials(_wordpiece_pipeline(tok, lowercase), WORDPIECE_SPECIALS)
    return Tokenizer(tok)


def load_bpe(vocab_json: str | os.PathLike, merges_txt: str | os.PathLike) -> Tokenizer:
    """A byte-level BPE (GPT-2, RoBERTa) from `vocab.json` + `merges.txt`."""
    vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
    merges = []
    for line in Path(merges_txt).read_text(encoding="utf-8").split("\n"):
        if line and not line.startswith("#version"):
            left, right = line.split(" ")
            merges.append((left, right))
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    _register_specials(_bpe_pipeline(tok), (*ROBERTA_SPECIALS, *GPT2_SPECIALS))
    return Tokenizer(tok)


def load(path: str | os.PathLike, *, lowercase: bool = True) -> Tokenizer:
    """A tokenizer from a directory or file: tokenizer.json, else vocab.txt, else vocab.json + merges.txt.

    `lowercase` applies to a bare vocab.txt only (tokenizer.json records its own normalizer).
    """
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".json") and path.name != "vocab.json":
            return Tokenizer(tokenizers.Tokenizer.from_file(str(path)))
        if path.suffix == ".txt" and path.name != "merges.txt":
            return load_wordpiece(path, lowercase=lowercase)
        path = path.parent
    if (path / "tokenizer.json").is_file():
        return Tokenizer(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")))
    if (path / "vocab.txt").is_file():
        return load_wordpiece(path / "vocab.txt", lowercase=lowercase)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return load_bpe(path / "vocab.json", path / "merges.txt")
    raise FileNotFoundError(f"{path}: no tokenizer.json, vocab.txt, or vocab.json + merges.txt")


def train_wordpiece(
    texts: Iterable[str], vocab_size: int = 30522, *, lowercase: bool = True, min_frequency: int = 2
) -> Tokenizer:
    """Train a BERT WordPiece on `texts`; [PAD] [UNK] [CLS] [SEP] [MASK] get ids 0..4.

    BERT used a 30,000-token WordPiece (Devlin et al. 2019, Sec. 3); the
    released vocab.txt has 30,522 entries, hence the default.

    Deterministic: tokenizers 0.23 gives "##c" pieces ids in hash-map order and
    breaks ties between equally frequent merges by id, so two runs can learn
    different vocabularies (huggingface/tokenizers#1794). Registering every
    "##c" up front, in sorted order, fixes their ids; they are then made
    ordinary vocabulary entries again.
    """
    texts = list(texts)
    tok = _wordpiece_pipeline(tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]")), lowercase)
    continuations: set[str] = set()
    for text in texts:
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
            continuations.update(word[1:])
    pieces = ["##" + c for c in sorted(continuations)]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[*WORDPIECE_SPECIALS, *pieces],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] in WORDPIECE_SPECIALS]
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))


def train_bpe(
    texts: Iterable[str],
    vocab_size: int = 50265,
    *,
    special_tokens: Sequence[str] = ROBERTA_SPECIALS,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE on `texts`; the special tokens take ids 0..len-1.

    All 256 byte symbols are in the initial alphabet, so nothing is ever
    unknown (Radford et al. 2019, Sec. 2.2). Defaults: RoBERTa's specials and
    its 50K vocabulary (Liu et al. 2019, Sec. 4.4); GPT-2's is GPT2_SPECIALS.
    """
    tok = _bpe_pipeline(tokenizers.Tokenizer(models.BPE(fuse_unk=False)))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    _register_specials(tok, special_tokens)
    return Tokenizer(tok)


def read_tiktoken(path: str | os.PathLike) -> dict[bytes, int]:
    """Ranks from a `.tiktoken` file: one "<base64 token bytes> <rank>" per line."""
    ranks = {}
    for line in Path(path).read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge created `token`: run rank-ordered BPE on its bytes, using only lower ranks.

    BPE learns merges in order, so the merge that made the token of rank r is
    the last step of encoding its bytes with the merges of rank < r; it ends
    with exactly two parts.
    """
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, where = limit, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], limit)
            if rank < best:
                best, where = rank, i
        if where < 0:
            break
        parts[where : where + 2] = [parts[where] + parts[where + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) is not one merge of two lower-ranked tokens")
    return parts[0], parts[1]


def gpt2_files_from_tiktoken(
    tiktoken_path: str | os.PathLike, out_dir: str | os.PathLike, *, check_sha256: bool = True
) -> tuple[Path, Path]:
    """Write GPT-2's `vocab.json` (50,257 entries) + `merges.txt` (50,000 merges) from its tiktoken ranks.

    Token rank = GPT-2 id; ranks 0..255 are the bytes, rank 256 + k is merge k,
    and "<|endoftext|>" is id 50256. `check_sha256` insists on the exact file
    shipped in openai-whisper (whisper/assets/gpt2.tiktoken).
    """
    data = Path(tiktoken_path).read_bytes()
    if check_sha256 and hashlib.sha256(data).hexdigest() != GPT2_TIKTOKEN_SHA256:
        raise ValueError(f"{tiktoken_path} is not GPT-2's gpt2.tiktoken (sha256 differs)")
    ranks = read_tiktoken(tiktoken_path)
    encode = bytes_to_unicode()
    text = lambda b: "".join(encode[x] for x in b)
    by_rank = sorted(ranks, key=ranks.get)
    if [ranks[t] for t in by_rank] != list(range(len(by_rank))):
        raise ValueError("tiktoken ranks must be 0..N-1 without gaps")
    vocab = {text(t): r for t, r in ranks.items()}
    vocab[GPT2_SPECIALS[0]] = len(ranks)
    merges = [_merge_of(t, ranks) for t in by_rank if len(t) > 1]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{text(a)} {text(b)}" for a, b in merges)]
    merges_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return vocab_path, merges_path
