"""Token masking for masked-LM pre-training: BERT, whole-word, SpanBERT, RoBERTa, and two simple
strategies for teaching and ablations.

Each returns :class:`MlmMask`: the corrupted ``inputs`` (B, T) plus a fixed number ``P`` of prediction
slots (``positions``/``targets``/``weights``, each (B, P)), so the model computes vocabulary logits at
the masked positions only (:func:`gather_positions`). Unused slots hold position 0, target 0 and
weight 0.0, as BERT's ``write_instance_to_example_files`` pads them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from maskjax.masking._rows import (
    MASK,
    MlmMask,
    _candidates,
    _check_p,
    _check_probs,
    _decide,
    _excluded,
    _finish_row,
    _row_bits,
    _row_keys,
    _scores,
    _unit,
)


class SpanPlan(NamedTuple):
    """What span masking decided, for tests and inspection. chosen (B, T) bool; decision (B, T) int32
    (MASK/RANDOM/KEEP, per span); span_of (B, T) int32 index of the span that masked a token (-1 if
    none); lengths (B, K) sampled span lengths in words; words (B, K) words the span actually covered;
    active (B, K) whether step k placed a span."""

    chosen: jax.Array
    decision: jax.Array
    span_of: jax.Array
    lengths: jax.Array
    words: jax.Array
    active: jax.Array


# ---------------------------------------------------------------------------------------------
# BERT (and the row routine RoBERTa shares with it)


@lru_cache(maxsize=64)
def _bert_table(seq_len: int, mask_prob: float, max_predictions: int) -> np.ndarray:
    counts = [bert_num_to_predict(n, mask_prob, max_predictions) for n in range(seq_len + 1)]
    return np.array(counts, np.int32)


def bert_num_to_predict(num_tokens: int, mask_prob: float, max_predictions: int) -> int:
    """min(max_predictions, max(1, round(num_tokens * mask_prob))), with num_tokens counting [CLS] and
    [SEP] (BERT create_pretraining_data.py, create_masked_lm_predictions: len(tokens) before padding).
    Python 3's round (half to even), evaluated in float64 exactly as the reference script does."""
    return min(max_predictions, max(1, int(round(num_tokens * mask_prob))))


def _subset_mlm(
    key: jax.Array,
    ids: jax.Array,
    count: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    draws: int,
    candidate_specials: tuple[int, ...],
    pad_id: int | None,
    vocab_size: int,
    mask_id: int,
    excluded: np.ndarray,
    max_predictions: int,
    random_prob: float,
    keep_prob: float,
) -> MlmMask:
    """The row routine BERT and RoBERTa share: a uniform subset of the candidates, 80/10/10 per token.

    ids (B, T). Row b draws (draws, T) words from fold_in(key, b): [0] ranks the candidates, [1] the
    80/10/10 decision, [2] the random tokens, [3:] are free for `count`. count(num_real, bits) -> ()
    int32 is how many tokens the row wants (num_real: its non-padding length); it gets
    min(that, #candidates, P), the n largest of iid random scores (top_k), so a uniform n-subset.
    Candidates: non-padding tokens not in `candidate_specials`.
    """
    B, T = ids.shape

    def row(bits, x):
        real, cand = _candidates(x, candidate_specials, pad_id)
        n = jnp.minimum(jnp.minimum(count(real.sum(), bits), cand.sum()), max_predictions)
        _, top = lax.top_k(_scores(bits[0], cand), max_predictions)
        chosen = jnp.zeros((T,), bool).at[top].set(jnp.arange(max_predictions) < n)
        dec = _decide(_unit(bits[1]), random_prob, keep_prob)
        return _finish_row(
            bits[2],
            x,
            chosen,
            dec,
            max_predictions=max_predictions,
            vocab_size=vocab_size,
            mask_id=mask_id,
            excluded=excluded,
        )

    return jax.vmap(row)(_row_bits(key, B, draws * T).reshape(B, draws, T), ids)


def bert_mlm(
    key: jax.Array,
    ids: jax.Array,
    *,
    vocab_size: int,
    mask_id: int,
    special_ids: tuple[int, ...],
    pad_id: int,
    max_predictions: int,
    mask_prob: float = 0.15,
    random_prob: float = 0.1,
    keep_prob: float = 0.1,
) -> MlmMask:
    """BERT's masked LM (Devlin et al. 2019, Sec. 3.1; create_pretraining_data.py).

    ids (B, T). Candidates are tokens that are neither padding nor in `special_ids` (BERT skips
    [CLS]/[SEP]). Per row, n = min(P, max(1, round(L * mask_prob))) with L the non-padding length,
    and min(n, #candidates) of them are chosen uniformly without replacement (random scores +
    top_k). Each chosen token independently: [MASK] w.p. 1-random-keep (0.8), a random token w.p.
    random_prob (0.1), unchanged w.p. keep_prob (0.1) (BERT Sec. 3.1). The random token is uniform
    over the vocabulary minus special_ids, pad_id and mask_id: BERT's script draws from the whole
    vocabulary, fairseq's RoBERTa zeroes the specials' weight (mask_tokens_dataset.py); we take the
    latter so a corrupted input never shows [CLS]/[SEP]/[PAD]/[MASK] out of place.
    """
    _check_probs(random_prob, keep_prob)
    _, T = ids.shape
    _check_p(max_predictions, T)
    table = jnp.asarray(_bert_table(T, float(mask_prob), max_predictions))
    excluded = _excluded(vocab_size, special_ids, pad_id, mask_id)
    return _subset_mlm(
        key,
        ids,
        lambda num_real, bits: table[num_real],
        draws=3,
        candidate_specials=special_ids,
        pad_id=pad_id,
        vocab_size=vocab_size,
        mask_id=mask_id,
        excluded=excluded,
        max_predictions=max_predictions,
        random_prob=random_prob,
        keep_prob=keep_prob,
    )


# ---------------------------------------------------------------------------------------------
# Whole words


def _words(cand: jax.Array, word_starts: jax.Array):
    """Words over candidate tokens. A word starts at a candidate flagged in word_starts, or at a
    candidate that follows a non-candidate (so no word spans [CLS]/[SEP]/padding). Returns
    word_of (T,) word index of each token (only meaningful where cand), word_len (T,) tokens per
    word id, num_words, and run_of_word (T,): index of the maximal run of candidates the word is in."""
    (T,) = cand.shape
    prev = jnp.concatenate([jnp.zeros((1,), bool), cand[:-1]])
    start = cand & (word_starts | ~prev)
    word_of = jnp.cumsum(start) - 1
    num_words = start.sum()
    drop = jnp.where(cand, word_of, T)  # index T is dropped
    word_len = jnp.zeros((T,), jnp.int32).at[drop].add(1, mode="drop")
    run_of_tok = jnp.cumsum(cand & ~prev)
    run_of_word = jnp.zeros((T,), jnp.int32).at[drop].set(run_of_tok, mode="drop")
    return jnp.maximum(word_of, 0), word_len, num_words, run_of_word


def whole_word_mlm(
    key: jax.Array,
    ids: jax.Array,
    word_starts: jax.Array,
    *,
    vocab_size: int,
    mask_id: int,
    special_ids: tuple[int, ...],
    pad_id: int,
    max_predictions: int,
    mask_prob: float = 0.15,
    random_prob: float = 0.1,
    keep_prob: float = 0.1,
) -> MlmMask:
    """BERT whole-word masking (BERT README, "Whole Word Masking" release of 2019-05-31;
    create_pretraining_data.py with do_whole_word_mask).

    word_starts (B, T) bool marks the first piece of each word (False for "##" pieces). Same budget
    n as :func:`bert_mlm`. Words are visited in a uniformly random order; a word is skipped if
    adding all its pieces would exceed n, otherwise all its pieces are chosen (the reference's
    `continue` when len(masked) + len(word) > n). Implemented as a lax.scan over the T word slots
    in a random permutation. As in the release, "we still predict each masked WordPiece token
    independently": the 80/10/10 choice is drawn per token. The count can end below n when no
    remaining word fits, exactly as in the reference.
    """
    _check_probs(random_prob, keep_prob)
    B, T = ids.shape
    _check_p(max_predictions, T)
    table = jnp.asarray(_bert_table(T, float(mask_prob), max_predictions))
    excluded = _excluded(vocab_size, special_ids, pad_id, mask_id)

    def row(bits, x, ws):
        real, cand = _candidates(x, special_ids, pad_id)
        n = table[real.sum()]
        word_of, word_len, num_words, _ = _words(cand, ws)
        # Random order of the real words; empty word slots sort last and have length 0 anyway.
        order = jnp.argsort(-_scores(bits[0], jnp.arange(T) < num_words))

        def visit(count, w):
            length = word_len[w]
            take = (length > 0) & (count + length <= n)
            return count + jnp.where(take, length, 0), take

        _, takes = lax.scan(visit, jnp.zeros((), jnp.int32), order)
        picked = jnp.zeros((T,), bool).at[order].set(takes)
        chosen = cand & picked[word_of]
        dec = _decide(_unit(bits[1]), random_prob, keep_prob)
        return _finish_row(
            bits[2],
            x,
            chosen,
            dec,
            max_predictions=max_predictions,
            vocab_size=vocab_size,
            mask_id=mask_id,
            excluded=excluded,
        )

    bits = _row_bits(key, B, 3 * T).reshape(B, 3, T)
    return jax.vmap(row)(bits, ids, word_starts.astype(bool))


# ---------------------------------------------------------------------------------------------
# SpanBERT


def span_length_probs(p: float = 0.2, max_span: int = 10) -> np.ndarray:
    """P(len = l) for l = 1..max_span: Geometric(p) truncated at max_span and renormalised.

    SpanBERT Sec. 3.1: l ~ Geo(p), p = 0.2, clipped at l_max = 10, "mean span length 3.8". Only the
    renormalised truncation has mean 3.8 (clamping min(l, 10) would give 4.46); the reference code
    (SpanBERT pretraining/fairseq/data/masking.py, PairWithSpanMaskingScheme) renormalises too.
    """
    w = np.array([p * (1 - p) ** (i - 1) for i in range(1, max_span + 1)])
    return w / w.sum()


def _span_plan_row(key, cand, word_starts, n, *, steps, cdf, max_span, random_prob, keep_prob):
    (T,) = cand.shape
    word_of, word_len, num_words, run_of_word = _words(cand, word_starts)
    wlen_tok = word_len[word_of]
    j = jnp.arange(max_span)

    def step(carry, _):
        wmask, wdec, wspan, count, index = carry
        bits = jax.random.bits(jax.random.fold_in(key, index), (T + 2,), jnp.uint32)
        rem = n - count
        # Anchor: uniform over unmasked candidate tokens whose word fits the remaining budget, then
        # snapped to its word's start (the reference draws a token, skips it if already masked, and
        # walks left to the word start). Retrying until one fits == sampling from the eligible set.
        elig = cand & ~wmask[word_of] & (wlen_tok <= rem)
        active = elig.any()
        w = word_of[jnp.argmax(_scores(bits[:T], elig))]
        length = 1 + jnp.sum(_unit(bits[T]) >= cdf)  # inverse CDF: cdf holds P(len <= l), l < max
        wid = w + j
        in_range = (j < length) & (wid < num_words)
        wid_c = jnp.minimum(wid, T - 1)
        # A span covers `length` consecutive complete words ("we always sample a sequence of complete
        # words", SpanBERT Sec. 3.1) and stops at [SEP]/padding. Already masked words count as words
        # but add no tokens (the reference merges overlapping spans). Only the whole-word prefix that
        # fits the budget is kept; the reference instead cuts the last word at the budget.
        ok = in_range & (run_of_word[wid_c] == run_of_word[w])
        new = jnp.where(ok & ~wmask[wid_c], word_len[wid_c], 0)
        take = ok & (jnp.cumsum(new) <= rem) & active
        added = jnp.sum(jnp.where(take, new, 0))
        fresh = take & ~wmask[wid_c]
        # 80/10/10 per span: "we perform this replacement at the span level" (SpanBERT Sec. 3.1).
        dec = _decide(_unit(bits[T + 1]), random_prob, keep_prob)
        at = jnp.where(fresh, wid, T)
        wdec = wdec.at[at].set(dec, mode="drop")
        wspan = wspan.at[at].set(index, mode="drop")
        wmask = wmask.at[at].set(True, mode="drop")
        out = (length, take.sum(), active)
        return (wmask, wdec, wspan, count + added, index + 1), out

    init = (
        jnp.zeros((T,), bool),
        jnp.zeros((T,), jnp.int32),
        jnp.full((T,), -1, jnp.int32),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
    )
    (wmask, wdec, wspan, _, _), (lengths, words, active) = lax.scan(step, init, length=steps)
    chosen = cand & wmask[word_of]
    return SpanPlan(
        chosen=chosen,
        decision=jnp.where(chosen, wdec[word_of], MASK),
        span_of=jnp.where(chosen, wspan[word_of], -1),
        lengths=lengths.astype(jnp.int32),
        words=words.astype(jnp.int32),
        active=active,
    )


def _span_plan(
    key: jax.Array,
    ids: jax.Array,
    word_starts: jax.Array,
    *,
    special_ids: tuple[int, ...],
    pad_id: int,
    max_predictions: int,
    mask_prob: float = 0.15,
    random_prob: float = 0.1,
    keep_prob: float = 0.1,
    geometric_p: float = 0.2,
    max_span: int = 10,
) -> SpanPlan:
    """The span choices of :func:`span_mlm` (same key -> same plan), exposed for tests."""
    _check_probs(random_prob, keep_prob)
    B, T = ids.shape
    _check_p(max_predictions, T)
    cdf = jnp.asarray(np.cumsum(span_length_probs(geometric_p, max_span))[:-1], jnp.float32)
    # Budget: ceil(mask_prob * #tokens of the text block), the block being the text without
    # [CLS]/[SEP] (SpanBERT masking.py: mask_num = math.ceil(sent_length * mask_ratio), in float64).
    table = jnp.asarray([min(max_predictions, math.ceil(c * mask_prob)) for c in range(T + 1)], jnp.int32)

    def row(k, x, ws):
        _, cand = _candidates(x, special_ids, pad_id)
        n = table[cand.sum()]
        # Every active step adds >= 1 token and n <= P, so P steps always suffice.
        return _span_plan_row(
            k,
            cand,
            ws,
            n,
            steps=max_predictions,
            cdf=cdf,
            max_span=max_span,
            random_prob=random_prob,
            keep_prob=keep_prob,
        )

    return jax.vmap(row)(_row_keys(key, B), ids, word_starts.astype(bool))


def span_mlm(
    key: jax.Array,
    ids: jax.Array,
    word_starts: jax.Array,
    *,
    vocab_size: int,
    mask_id: int,
    special_ids: tuple[int, ...],
    pad_id: int,
    max_predictions: int,
    mask_prob: float = 0.15,
    random_prob: float = 0.1,
    keep_prob: float = 0.1,
    geometric_p: float = 0.2,
    max_span: int = 10,
) -> MlmMask:
    """SpanBERT span masking (Joshi et al. 2020, Sec. 3.1).

    Repeat until the budget n = min(P, ceil(mask_prob * #candidates)) is spent: draw a length l in
    words from Geo(0.2) truncated to [1, 10] (:func:`span_length_probs`); draw a start at a word
    start (a uniform unmasked token snapped to its word's start, as the reference code does, so
    longer words are likelier starts); mask the l complete words from there. The whole span gets
    one 80/10/10 decision (all [MASK], all random tokens, or all kept).

    Differences from the reference code, all to keep whole words: the last span is shortened to
    the whole words that fit, and a start whose word does not fit is never drawn; so a row can end
    a few tokens below n when no remaining word fits. Random tokens are uniform over the
    non-special vocabulary (the reference samples the corpus's unigram distribution). One lax.scan
    of P steps per row.
    """
    B, T = ids.shape
    plan = _span_plan(
        key,
        ids,
        word_starts,
        special_ids=special_ids,
        pad_id=pad_id,
        max_predictions=max_predictions,
        mask_prob=mask_prob,
        random_prob=random_prob,
        keep_prob=keep_prob,
        geometric_p=geometric_p,
        max_span=max_span,
    )
    excluded = _excluded(vocab_size, special_ids, pad_id, mask_id)

    def row(bits, x, chosen, dec):
        return _finish_row(
            bits,
            x,
            chosen,
            dec,
            max_predictions=max_predictions,
            vocab_size=vocab_size,
            mask_id=mask_id,
            excluded=excluded,
        )

    tok_bits = _row_bits(jax.random.fold_in(key, 1 << 30), B, T)
    return jax.vmap(row)(tok_bits, ids, plan.chosen, plan.decision)


# ---------------------------------------------------------------------------------------------
# RoBERTa


def step_key(seed: int | jax.Array, step: jax.Array | int, stream: int = 0) -> jax.Array:
    """The masking key for a training step: fold_in(fold_in(key(seed), stream), step).

    A pure function of (seed, step), so a resumed run draws the same masks, and every step draws a
    new one: RoBERTa's dynamic masking, "we generate the masking pattern every time we feed a
    sequence to the model" (Liu et al. 2019, Sec. 4.1). `seed` may be an int, an int array, or an
    existing key; `stream` separates independent uses (e.g. masking vs dropout) of one seed.
    """
    if isinstance(seed, int | np.integer):
        key = jax.random.key(int(seed))
    elif jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) or jnp.ndim(seed) > 0:
        key = seed  # a typed key, or a raw uint32 key from jax.random.PRNGKey
    else:
        key = jax.random.key(seed)
    return jax.random.fold_in(jax.random.fold_in(key, stream), step)


def roberta_mlm(
    key: jax.Array,
    ids: jax.Array,
    *,
    vocab_size: int,
    mask_id: int,
    pad_id: int,
    special_ids: tuple[int, ...],
    max_predictions: int | None = None,
    mask_prob: float = 0.15,
    random_prob: float = 0.1,
    keep_prob: float = 0.1,
    mask_specials: bool = True,
) -> MlmMask:
    """RoBERTa's masked LM as fairseq does it (Liu et al. 2019, Sec. 4.1; fairseq
    mask_tokens_dataset.py), to be called with a fresh :func:`step_key` every step.

    Per row of L non-padding tokens, num = floor(mask_prob * L + u), u ~ U[0,1) ("probabilistic
    rounding" in fairseq), positions drawn uniformly without replacement; 80/10/10 per token
    (leave_unmasked_prob = random_token_prob = 0.1); random tokens uniform over the vocabulary minus
    `special_ids` (<s>, <pad>, </s>, <unk> in fairseq: weights[:nspecial] = 0), pad_id and mask_id.
    fairseq can also pick <s> and </s> themselves; `mask_specials=False` excludes `special_ids`
    from the positions instead (as HF's DataCollatorForLanguageModeling does). RoBERTa predicts
    every masked token, so the default P = ceil(mask_prob * T) never drops one (num <= that).
    """
    _check_probs(random_prob, keep_prob)
    _, T = ids.shape
    if max_predictions is None:
        max_predictions = max(1, math.ceil(mask_prob * T - 1e-9))
    _check_p(max_predictions, T)
    excluded = _excluded(vocab_size, special_ids, pad_id, mask_id)

    def count(num_real, bits):
        # fairseq's probabilistic rounding, u from the row's fourth group of words.
        return jnp.floor(mask_prob * num_real + _unit(bits[3, 0])).astype(jnp.int32)

    return _subset_mlm(
        key,
        ids,
        count,
        draws=4,
        candidate_specials=() if mask_specials else special_ids,
        pad_id=pad_id,
        vocab_size=vocab_size,
        mask_id=mask_id,
        excluded=excluded,
        max_predictions=max_predictions,
        random_prob=random_prob,
        keep_prob=keep_prob,
    )


# ---------------------------------------------------------------------------------------------
# Simple strategies for teaching and ablations


def random_token_mask(
    key: jax.Array,
    ids: jax.Array,
    valid: jax.Array | None = None,
    *,
    ratio: float,
    mask_id: int,
) -> MlmMask:
    """Replace a fixed count k = max(1, round(ratio * T)) of valid tokens per row, chosen uniformly,
    by mask_id (no 80/10/10). P = k; rows with fewer valid tokens mask all of them."""
    B, T = ids.shape
    P = max(1, int(round(ratio * T)))
    _check_p(P, T)
    v = jnp.ones((B, T), bool) if valid is None else valid.astype(bool)

    def row(bits, x, vr):
        _, top = lax.top_k(_scores(bits, vr), P)
        chosen = jnp.zeros((T,), bool).at[top].set(vr[top])
        return _finish_row(
            bits,
            x,
            chosen,
            jnp.full((T,), MASK, jnp.int32),
            max_predictions=P,
            vocab_size=None,
            mask_id=mask_id,
        )

    return jax.vmap(row)(_row_bits(key, B, T), ids, v)


def contiguous_block_mask(
    key: jax.Array,
    ids: jax.Array,
    valid: jax.Array | None = None,
    *,
    length: int,
    mask_id: int,
) -> MlmMask:
    """Mask one contiguous run of `length` valid tokens per row, its start uniform over the starts
    whose whole run is valid (P = length). A row without such a run masks nothing."""
    B, T = ids.shape
    _check_p(length, T)
    v = jnp.ones((B, T), bool) if valid is None else valid.astype(bool)

    def row(bits, x, vr):
        c = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(vr.astype(jnp.int32))])
        starts = jnp.arange(T - length + 1)
        fits = (c[starts + length] - c[starts]) == length
        s = jnp.argmax(_scores(bits[: T - length + 1], fits))
        pos = jnp.arange(T)
        chosen = (pos >= s) & (pos < s + length) & fits.any()
        return _finish_row(
            bits,
            x,
            chosen,
            jnp.full((T,), MASK, jnp.int32),
            max_predictions=length,
            vocab_size=None,
            mask_id=mask_id,
        )

    return jax.vmap(row)(_row_bits(key, B, T), ids, v)


def gather_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x (B, T, ...) at positions (B, P) -> (B, P, ...): logits are then computed at P positions only
    (BERT's gather_indexes in run_pretraining.py)."""
    return jax.vmap(lambda xr, pr: xr[pr])(x, positions)
