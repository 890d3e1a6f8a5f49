"""Masking strategies: pure functions of ``(key, arrays, static config)`` with static output shapes.

Every strategy is batch-level: inputs are ``(B, T)`` token ids (or ``B`` images of ``N`` patches) and
row ``b`` is masked with the key ``fold_in(key, b)``, so a row's mask does not depend on the batch
size or on how the batch is sharded, and the same key always gives the same mask. All functions jit
and vmap; nothing branches in Python on traced values.

Token strategies return :class:`MlmMask`: the corrupted ``inputs`` (B, T) plus a fixed number ``P``
of prediction slots (``positions``/``targets``/``weights``, each (B, P)), so the model computes
vocabulary logits at the masked positions only (:func:`gather_positions`). Unused slots hold position
0, target 0 and weight 0.0, as BERT's ``write_instance_to_example_files`` pads them.

Example (BERT-base: T=128, max_predictions_per_seq=20; BERT README, "Pre-training with BERT")::

    key = step_key(seed=0, step=step)                # a fresh mask every step (RoBERTa Sec. 4.1)
    m = bert_mlm(key, ids, vocab_size=30522, mask_id=103, special_ids=(101, 102), pad_id=0,
                 max_predictions=20)
    hidden = encoder(m.inputs)                       # (B, T, D)
    logits = head(gather_positions(hidden, m.positions))   # (B, 20, vocab)
    loss = losses.masked_cross_entropy(logits, m.targets, m.weights)
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "MlmMask",
    "CausalLm",
    "MaeMask",
    "BeitBlocks",
    "SpanPlan",
    "bert_mlm",
    "whole_word_mlm",
    "span_mlm",
    "roberta_mlm",
    "step_key",
    "causal_lm",
    "causal_segment_mask",
    "mae_num_keep",
    "mae_mask_from_noise",
    "mae_random_mask",
    "beit_block_mask",
    "beit_block_mask_with_blocks",
    "random_token_mask",
    "contiguous_block_mask",
    "gather_positions",
    "bert_num_to_predict",
    "span_length_probs",
]

# What happens to a chosen token: BERT Sec. 3.1 "Task #1": 80% [MASK], 10% random token, 10% unchanged.
MASK, RANDOM, KEEP = 0, 1, 2


class MlmMask(NamedTuple):
    """Masked-LM batch. inputs (B, T) corrupted ids; positions (B, P) int32 ascending (unused: 0);
    targets (B, P) original ids (unused: 0); weights (B, P) float32 (1.0 real slot, 0.0 unused)."""

    inputs: jax.Array
    positions: jax.Array
    targets: jax.Array
    weights: jax.Array


class CausalLm(NamedTuple):
    """Next-token batch. inputs (B, T); targets (B, T) = inputs shifted left by one; weights (B, T)
    float32; attention_mask (B, 1, T, T) bool, True = query may attend to key."""

    inputs: jax.Array
    targets: jax.Array
    weights: jax.Array
    attention_mask: jax.Array


class MaeMask(NamedTuple):
    """MAE shuffle. ids_keep (B, K) visible patch indices; mask (B, N) float32, 1 = removed, 0 = kept;
    ids_restore (B, N) the inverse permutation that unshuffles [kept; removed] back to patch order."""

    ids_keep: jax.Array
    mask: jax.Array
    ids_restore: jax.Array


class BeitBlocks(NamedTuple):
    """BEiT mask with the blocks that made it. mask (B, N) bool; blocks (B, A, 4) int32 rows
    (top, left, height, width); accepted (B, A) bool; fallback (B, N) bool patches added outside any
    block (see :func:`beit_block_mask_with_blocks`)."""

    mask: jax.Array
    blocks: jax.Array
    accepted: jax.Array
    fallback: jax.Array


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
# Shared pieces


# Randomness is drawn as raw 32-bit words, as few calls as possible: every jax.random call site
# compiles its own threefry hash, which dominated compile time when each draw had its own call.


def _row_keys(key: jax.Array, batch: int) -> jax.Array:
    """One key per row: fold_in(key, b), independent of the batch size."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch, dtype=jnp.uint32))


def _row_bits(key: jax.Array, batch: int, n: int) -> jax.Array:
    """(batch, n) uint32 random words, row b drawn from fold_in(key, b)."""
    return jax.vmap(lambda k: jax.random.bits(k, (n,), jnp.uint32))(_row_keys(key, batch))


def _unit(bits: jax.Array) -> jax.Array:
    """uint32 -> float32 uniform on [0, 1) with 24 random bits (exact in float32)."""
    return (bits >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def _scores(bits: jax.Array, valid: jax.Array) -> jax.Array:
    """31-bit random int32 ranking scores; invalid entries get -1 so they rank last."""
    return jnp.where(valid, (bits >> 1).astype(jnp.int32), -1)


def _is_any(ids: jax.Array, values: tuple[int, ...]) -> jax.Array:
    out = jnp.zeros(ids.shape, bool)
    for v in values:
        out = out | (ids == v)
    return out


def _excluded(vocab_size: int, special_ids: tuple[int, ...], pad_id: int | None, mask_id: int) -> np.ndarray:
    ex = set(int(s) for s in special_ids) | {int(mask_id)}
    if pad_id is not None:
        ex.add(int(pad_id))
    ex = np.array(sorted(s for s in ex if 0 <= s < vocab_size), np.int64)
    if len(ex) >= vocab_size:
        raise ValueError(f"vocab_size={vocab_size} leaves no non-special token to draw from")
    return ex


def _random_tokens(bits: jax.Array, vocab_size: int, excluded: np.ndarray, dtype) -> jax.Array:
    """Uniform over the vocabulary minus `excluded` (sorted). r = bits mod (V - #excluded) (bias
    below V / 2^32), and the r-th allowed id is r + #{i : excluded[i] - i <= r}."""
    r = (bits % jnp.uint32(vocab_size - len(excluded))).astype(jnp.int32)
    if len(excluded):
        f = jnp.asarray(excluded - np.arange(len(excluded)), jnp.int32)
        r = r + jnp.searchsorted(f, r, side="right").astype(r.dtype)
    return r.astype(dtype)


def _decide(u: jax.Array, random_prob: float, keep_prob: float) -> jax.Array:
    """u ~ U[0,1) -> MASK with prob 1-random-keep, RANDOM with random_prob, KEEP with keep_prob.
    Same distribution as BERT's two draws (0.8, then 0.5/0.5; create_pretraining_data.py)."""
    m = 1.0 - random_prob - keep_prob
    return jnp.where(u < m, MASK, jnp.where(u < m + random_prob, RANDOM, KEEP)).astype(jnp.int32)


def _check_probs(random_prob: float, keep_prob: float) -> None:
    if not (0.0 <= random_prob and 0.0 <= keep_prob and random_prob + keep_prob <= 1.0):
        raise ValueError(f"need random_prob, keep_prob >= 0, sum <= 1; got {random_prob}, {keep_prob}")


def _check_p(max_predictions: int, seq_len: int) -> None:
    if not (1 <= max_predictions <= seq_len):
        raise ValueError(f"max_predictions must be in [1, seq_len={seq_len}], got {max_predictions}")


def _finish_row(
    tok_bits: jax.Array,
    ids: jax.Array,
    chosen: jax.Array,
    decision: jax.Array,
    *,
    max_predictions: int,
    vocab_size: int | None,
    mask_id: int,
    excluded: np.ndarray | None = None,
) -> MlmMask:
    """chosen (T,) bool with at most P True, decision (T,) -> corrupted inputs and P sorted slots.
    vocab_size None: every chosen token becomes mask_id (no random draw)."""
    (T,) = ids.shape
    inputs = jnp.where(chosen & (decision == MASK), jnp.asarray(mask_id, ids.dtype), ids)
    if vocab_size is not None:
        rand = _random_tokens(tok_bits, vocab_size, excluded, ids.dtype)
        inputs = jnp.where(chosen & (decision == RANDOM), rand, inputs)
    # Chosen positions first in ascending order, then T as a sentinel for unused slots.
    idx = jnp.sort(jnp.where(chosen, jnp.arange(T, dtype=jnp.int32), T))[:max_predictions]
    used = idx < T
    positions = jnp.where(used, idx, 0)
    targets = jnp.where(used, ids[positions], jnp.zeros((), ids.dtype))
    return MlmMask(inputs, positions, targets, used.astype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# BERT


@lru_cache(maxsize=64)
def _bert_table(seq_len: int, mask_prob: float, max_predictions: int) -> np.ndarray:
    counts = [bert_num_to_predict(n, mask_prob, max_predictions) for n in range(seq_len + 1)]
    return np.array(counts, np.int32)


def bert_num_to_predict(num_tokens: int, mask_prob: float, max_predictions: int) -> int:
    """min(max_predictions, max(1, round(num_tokens * mask_prob))), with num_tokens counting [CLS] and
    [SEP] (BERT create_pretraining_data.py, create_masked_lm_predictions: len(tokens) before padding).
    Python 3's round (half to even), evaluated in float64 exactly as the reference script does."""
    return min(max_predictions, max(1, int(round(num_tokens * mask_prob))))


def _candidates(ids: jax.Array, special_ids: tuple[int, ...], pad_id: int | None):
    real = jnp.ones(ids.shape, bool) if pad_id is None else ids != pad_id
    return real, real & ~_is_any(ids, tuple(special_ids))


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
    B, T = ids.shape
    _check_p(max_predictions, T)
    table = jnp.asarray(_bert_table(T, float(mask_prob), max_predictions))
    excluded = _excluded(vocab_size, special_ids, pad_id, mask_id)

    def row(bits, x):
        real, cand = _candidates(x, special_ids, pad_id)
        n = jnp.minimum(table[real.sum()], cand.sum())
        # A uniformly random n-subset of the candidates: the n largest of iid random scores.
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

    return jax.vmap(row)(_row_bits(key, B, 3 * T).reshape(B, 3, T), ids)


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
    B, T = ids.shape
    if max_predictions is None:
        max_predictions = max(1, math.ceil(mask_prob * T - 1e-9))
    _check_p(max_predictions, T)
    excluded = _excluded(vocab_size, special_ids, pad_id, mask_id)

    def row(bits, x):
        real, cand = _candidates(x, () if mask_specials else special_ids, pad_id)
        num = jnp.floor(mask_prob * real.sum() + _unit(bits[3, 0])).astype(jnp.int32)
        n = jnp.minimum(jnp.minimum(num, cand.sum()), max_predictions)
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

    return jax.vmap(row)(_row_bits(key, B, 4 * T).reshape(B, 4, T), ids)


# ---------------------------------------------------------------------------------------------
# GPT


def _valid(ids: jax.Array, pad_id: int | None, valid: jax.Array | None) -> jax.Array:
    if valid is not None:
        return valid.astype(bool)
    if pad_id is not None:
        return ids != pad_id
    return jnp.ones(ids.shape, bool)


def causal_segment_mask(segment_ids: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """(B, T) segment ids -> (B, 1, T, T) bool: key k <= query q, same segment, both real.

    Packed sequences hold several documents; a token must not attend to an earlier document.
    Rows of padding queries are all False (layers.attention then gives them a uniform, unused mix).
    """
    B, T = segment_ids.shape
    causal = jnp.tril(jnp.ones((T, T), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    m = causal[None] & same
    if valid is not None:
        v = valid.astype(bool)
        m = m & v[:, :, None] & v[:, None, :]
    return m[:, None]


def causal_lm(
    ids: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    pad_id: int | None = None,
    valid: jax.Array | None = None,
) -> CausalLm:
    """Next-token prediction (GPT: Radford et al. 2018 Sec. 3.1, L1 = sum_i log P(u_i | u_<i)).

    ids (B, T); segment_ids (B, T) document index of each token in a packed row (None = one
    document); padding from `valid` (B, T) bool or `pad_id`. targets[t] = ids[t+1] (the last
    column gets pad_id or 0); weights[t] = 1 only where t and t+1 are real and in the same
    document, so the last token of each document and padding predict nothing.
    """
    B, T = ids.shape
    v = _valid(ids, pad_id, valid)
    seg = jnp.zeros_like(ids) if segment_ids is None else segment_ids
    fill = jnp.full((B, 1), 0 if pad_id is None else pad_id, ids.dtype)
    targets = jnp.concatenate([ids[:, 1:], fill], axis=1)
    nxt_ok = jnp.concatenate([v[:, 1:] & (seg[:, 1:] == seg[:, :-1]), jnp.zeros((B, 1), bool)], axis=1)
    weights = (v & nxt_ok).astype(jnp.float32)
    return CausalLm(ids, targets, weights, causal_segment_mask(seg, v))


# ---------------------------------------------------------------------------------------------
# MAE


def mae_num_keep(num_patches: int, mask_ratio: float) -> int:
    """K = int(N * (1 - mask_ratio)), truncating, as MAE's random_masking (models_mae.py) and HF's
    ViTMAEEmbeddings.random_masking compute len_keep. N=196, ratio 0.75 -> 49 (MAE Sec. 3, 75%)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    k = int(num_patches * (1 - mask_ratio))
    if k < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch of {num_patches}")
    return k


def mae_mask_from_noise(noise: jax.Array, mask_ratio: float) -> MaeMask:
    """MAE per-sample shuffle (He et al. 2022, Sec. 3 "Masking"; models_mae.py random_masking).

    noise (B, N): argsort ascending (small = keep), keep the first K = mae_num_keep(N, ratio),
    ids_restore = argsort(ids_shuffle). mask[i] = 1 iff patch i is removed; the reference builds
    [0]*K + [1]*(N-K) and gathers it with ids_restore, i.e. mask[i] = (ids_restore[i] >= K).
    """
    B, N = noise.shape
    K = mae_num_keep(N, mask_ratio)
    ids_shuffle = jnp.argsort(noise, axis=1, stable=True).astype(jnp.int32)
    ids_restore = jnp.argsort(ids_shuffle, axis=1, stable=True).astype(jnp.int32)
    mask = (ids_restore >= K).astype(jnp.float32)
    return MaeMask(ids_shuffle[:, :K], mask, ids_restore)


def mae_random_mask(key: jax.Array, batch: int, num_patches: int, mask_ratio: float) -> MaeMask:
    """:func:`mae_mask_from_noise` on uniform noise, one key per row."""
    noise = _unit(_row_bits(key, batch, num_patches))
    return mae_mask_from_noise(noise, mask_ratio)


# ---------------------------------------------------------------------------------------------
# BEiT


@lru_cache(maxsize=64)
def _beit_legal(grid: tuple[int, int], min_block: int, aspect: tuple[float, float]) -> np.ndarray:
    """legal[h, w]: the integer block obeys the rules exactly (1e-9 slack for float64 ratios)."""
    H, W = grid
    lo, hi = aspect
    h = np.arange(H + 1)[:, None]
    w = np.arange(W + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = h / w
    fits = (h >= 1) & (w >= 1) & (h < H) & (w < W)
    return fits & (h * w >= min_block) & (r >= lo - 1e-9) & (r <= hi + 1e-9)


def beit_block_mask_with_blocks(
    key: jax.Array,
    batch: int,
    grid: tuple[int, int] = (14, 14),
    num_masked: int = 75,
    min_block: int = 16,
    max_block: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    max_attempts: int = 2048,
    proposals_per_step: int = 64,
) -> BeitBlocks:
    """BEiT blockwise masking (Bao et al. 2022, Sec. 2.3 and Algorithm 1), with the blocks placed.

    Algorithm 1 repeats: block area s ~ U[16, budget left], aspect r in [0.3, 1/0.3], a = sqrt(s r),
    b = sqrt(s / r), random top-left, add the block; BEiT masks 75 patches of 14x14 (the reference's
    --num_mask_patches 75, about 40%). As in the reference (unilm beit/masking_generator.py): r is
    log-uniform, h = round(sqrt(s r)), w = round(sqrt(s / r)), h < H and w < W, top/left uniform,
    and a block is accepted only if it adds between 1 and min(budget left, max_block) new patches.

    Our rules, applied to every accepted block (these are what the tests check): the integer
    rectangle has h * w >= min_block and aspect[0] <= h / w <= aspect[1] exactly (proposals whose
    rounding breaks this are rejected instead of kept), h < H, w < W. When the budget left is below
    min_block, s = min_block (the block must then overlap the mask to add few new patches).

    Exact count: the reference gives up after 10 failed proposals and can return fewer patches.
    We keep proposing (up to max_attempts, `proposals_per_step` at a time; the first acceptable
    one in each step is taken, the same law as proposing one at a time). Sometimes no legal block
    can add the last 1-3 patches at all. Then, and only then, the fallback masks the missing
    patches among the unmasked ones that touch the mask (4-neighbours), chosen at random, else any
    unmasked patch; they are reported in `fallback` (on 14x14/75/16, ~3% of images, ~1.4 patches).
    """
    H, W = grid
    N = H * W
    max_block = num_masked if max_block is None else max_block
    if not (1 <= num_masked <= N and 1 <= min_block <= max(min_block, num_masked)):
        raise ValueError(f"need 1 <= num_masked <= {N}, got num_masked={num_masked}, min_block={min_block}")
    legal_np = _beit_legal((H, W), int(min_block), (float(aspect[0]), float(aspect[1])))
    if not legal_np.any():
        raise ValueError(f"no block of area >= {min_block} and aspect in {aspect} fits a {H}x{W} grid")
    legal = jnp.asarray(legal_np)
    steps = max(1, math.ceil(max_attempts / proposals_per_step))
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    rows = jnp.arange(H)[:, None]
    cols = jnp.arange(W)[None, :]
    M = proposals_per_step

    def row(k):
        def step(carry, i):
            mask, count = carry
            u = _unit(jax.random.bits(jax.random.fold_in(k, i), (4, M), jnp.uint32))
            rem = num_masked - count
            cap = jnp.minimum(rem, max_block)
            s = min_block + u[0] * (jnp.maximum(min_block, cap) - min_block)
            r = jnp.exp(log_lo + u[1] * (log_hi - log_lo))
            h = jnp.round(jnp.sqrt(s * r)).astype(jnp.int32)
            w = jnp.round(jnp.sqrt(s / r)).astype(jnp.int32)
            hc, wc = jnp.clip(h, 0, H), jnp.clip(w, 0, W)
            ok = legal[hc, wc]
            t = jnp.floor(u[2] * (H - hc + 1)).astype(jnp.int32)
            left = jnp.floor(u[3] * (W - wc + 1)).astype(jnp.int32)
            t, left = jnp.clip(t, 0, H - hc), jnp.clip(left, 0, W - wc)
            # Masked patches inside each proposal from the integral image S[i, j] = sum mask[:i, :j].
            S = jnp.pad(jnp.cumsum(jnp.cumsum(mask.astype(jnp.int32), 0), 1), ((1, 0), (1, 0)))
            inside = S[t + hc, left + wc] - S[t, left + wc] - S[t + hc, left] + S[t, left]
            new = hc * wc - inside
            ok = ok & (new > 0) & (new <= cap) & (rem > 0)
            i = jnp.argmax(ok)
            hit = ok[i]
            block = jnp.stack([t[i], left[i], hc[i], wc[i]])
            rect = (rows >= t[i]) & (rows < t[i] + hc[i]) & (cols >= left[i]) & (cols < left[i] + wc[i])
            mask = mask | (rect & hit)
            return (mask, count + jnp.where(hit, new[i], 0)), (block, hit)

        init = (jnp.zeros((H, W), bool), jnp.zeros((), jnp.int32))
        (mask, count), (blocks, accepted) = lax.scan(step, init, jnp.arange(steps, dtype=jnp.uint32))
        # Fallback for the rare rows no legal block can finish: the missing patches, preferring
        # unmasked patches next to the mask so the result stays block-shaped.
        rem = num_masked - count
        pad = jnp.pad(mask, 1)
        touch = pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:]
        u_fill = _unit(jax.random.bits(jax.random.fold_in(k, steps), (H, W), jnp.uint32))
        score = jnp.where(mask, -1.0, u_fill + touch.astype(jnp.float32))
        rank = jnp.argsort(jnp.argsort(-score.reshape(N)))
        fill = (rank < rem) & ~mask.reshape(N)
        return BeitBlocks(mask.reshape(N) | fill, blocks, accepted, fill)

    return jax.vmap(row)(_row_keys(key, batch))


def beit_block_mask(
    key: jax.Array,
    batch: int,
    grid: tuple[int, int] = (14, 14),
    num_masked: int = 75,
    min_block: int = 16,
    max_block: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    max_attempts: int = 2048,
    proposals_per_step: int = 64,
) -> jax.Array:
    """(B, N) bool BEiT mask with exactly `num_masked` True per row, N = H * W in row-major
    order. See :func:`beit_block_mask_with_blocks` for the rules and the fallback."""
    return beit_block_mask_with_blocks(
        key, batch, grid, num_masked, min_block, max_block, aspect, max_attempts, proposals_per_step
    ).mask


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
