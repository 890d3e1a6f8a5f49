"""Masking strategies against their papers' rules and reference algorithms.

Statistical checks use fixed keys and binomial / chi-square bounds at about 5 sigma (p > 1e-6), so
they are deterministic here yet fail for any real bias. Reference algorithms (BERT's whole-word
masking loop, BEiT's block proposal loop) are re-implemented below in plain Python from the
papers/scripts, and HF's ViTMAE is the MAE reference.
"""

from __future__ import annotations

import math
import random
from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from maskjax import masking as M

PAD, CLS, SEP, MASK_ID, UNK = 0, 1, 2, 3, 4
SPECIALS = (CLS, SEP)
EXCLUDED = {PAD, CLS, SEP, MASK_ID}  # never drawn as a random replacement
V = 64
Z = 5.0  # sigma bound for binomial / mean tests

hyp = settings(max_examples=15, deadline=None, derandomize=True)


def assert_binomial(k: int, n: int, p: float, what: str = "") -> None:
    sd = math.sqrt(n * p * (1 - p))
    assert abs(k - n * p) <= Z * sd, f"{what}: {k}/{n}, expected p={p:.4f} (z={(k - n * p) / sd:.2f})"


def assert_mean(xs, mean: float, var: float, what: str = "") -> None:
    xs = np.asarray(xs, np.float64)
    sd = math.sqrt(var / len(xs))
    z = (xs.mean() - mean) / sd
    assert abs(z) <= Z, f"{what}: mean {xs.mean():.4f}, expected {mean:.4f} (z={z:.2f})"


def bert_rows(rng: np.random.Generator, B: int, T: int, vocab: int = V, full: bool = False) -> np.ndarray:
    """[CLS] a [SEP] b [SEP] [PAD]... with random lengths; text tokens in [UNK, vocab)."""
    ids = np.full((B, T), PAD, np.int32)
    for b in range(B):
        L = T if full else int(rng.integers(3, T + 1))
        a = int(rng.integers(1, L - 1))
        row = rng.integers(UNK, vocab, L)
        row[0], row[a], row[L - 1] = CLS, SEP, SEP
        ids[b, :L] = row
    return ids


def check_mlm_contract(m: M.MlmMask, ids: np.ndarray, n_expected: np.ndarray, *, vocab: int = V):
    """Contract shared by all token strategies; returns the chosen (B, T) bool."""
    inputs, pos, tgt, w = (np.asarray(a) for a in m)
    B, T = ids.shape
    chosen = np.zeros((B, T), bool)
    for b in range(B):
        k = int(w[b].sum())
        assert k == n_expected[b], (b, k, n_expected[b])
        assert np.all(w[b, :k] == 1.0) and np.all(w[b, k:] == 0.0)
        assert np.all(np.diff(pos[b, :k]) > 0), "positions must be strictly ascending"
        assert np.all(pos[b, k:] == 0) and np.all(tgt[b, k:] == 0)
        np.testing.assert_array_equal(tgt[b, :k], ids[b, pos[b, :k]])
        chosen[b, pos[b, :k]] = True
    real = ids != PAD
    cand = real & ~np.isin(ids, SPECIALS)
    assert not np.any(chosen & ~cand), "a special token or padding was chosen"
    np.testing.assert_array_equal(inputs[~chosen], ids[~chosen])
    changed = chosen & (inputs != ids) & (inputs != MASK_ID)
    assert not np.isin(inputs[changed], list(EXCLUDED)).any(), "random replacement drew a special token"
    assert np.all((inputs[changed] >= 0) & (inputs[changed] < vocab))
    return chosen


def words_of(cand: np.ndarray, starts: np.ndarray) -> list[list[int]]:
    """Words of one row: a word starts at a flagged candidate or right after a non-candidate."""
    words: list[list[int]] = []
    for t in range(len(cand)):
        if not cand[t]:
            continue
        if starts[t] or t == 0 or not cand[t - 1]:
            words.append([t])
        else:
            words[-1].append(t)
    return words


# ---------------------------------------------------------------------------------------------
# Jitted strategies, compiled once per shape and shared by the tests.

BERT_KW = dict(vocab_size=V, mask_id=MASK_ID, special_ids=SPECIALS, pad_id=PAD)


@cache
def bert_fn(P: int, vocab: int = V):
    return jax.jit(partial(M.bert_mlm, **{**BERT_KW, "vocab_size": vocab}, max_predictions=P))


@cache
def wwm_fn(P: int):
    return jax.jit(partial(M.whole_word_mlm, **BERT_KW, max_predictions=P))


@cache
def span_plan_fn(P: int):
    return jax.jit(partial(M._span_plan, special_ids=SPECIALS, pad_id=PAD, max_predictions=P))


@cache
def span_fn(P: int):
    return jax.jit(partial(M.span_mlm, **BERT_KW, max_predictions=P))


@cache
def roberta_fn(mask_specials: bool):
    return jax.jit(partial(M.roberta_mlm, **BERT_KW, mask_specials=mask_specials))


@cache
def beit_fn(batch: int):
    return jax.jit(partial(M.beit_block_mask_with_blocks, batch=batch))


mae_fn = jax.jit(partial(M.mae_random_mask, batch=8, num_patches=196, mask_ratio=0.75))
random_fn = jax.jit(partial(M.random_token_mask, ratio=0.15, mask_id=MASK_ID))
block_fn = jax.jit(partial(M.contiguous_block_mask, length=5, mask_id=MASK_ID))


# ---------------------------------------------------------------------------------------------
# BERT


def test_bert_num_to_predict_follows_the_reference_rounding():
    # create_masked_lm_predictions: min(max_pred, max(1, int(round(len(tokens) * 0.15)))), Python 3 round.
    for n in range(0, 600):
        assert M.bert_num_to_predict(n, 0.15, 80) == min(80, max(1, int(round(n * 0.15))))
    # Half-way cases round to even; tiny rows still predict one token; the cap binds.
    assert [M.bert_num_to_predict(n, 0.15, 80) for n in (3, 10, 30, 50, 70)] == [1, 2, 4, 8, 10]
    assert M.bert_num_to_predict(512, 0.15, 76) == 76 and M.bert_num_to_predict(512, 0.15, 80) == 77


def test_bert_counts_from_the_real_function():
    T = 80
    ids = np.full((5, T), PAD, np.int32)
    for b, L in enumerate((3, 10, 30, 50, 70)):
        ids[b, :L] = np.arange(L) % 50 + UNK
        ids[b, 0], ids[b, L - 1] = CLS, SEP
    m = bert_fn(12)(jax.random.key(0), jnp.asarray(ids))
    check_mlm_contract(m, ids, np.array([1, 2, 4, 8, 10]))


@hyp
@given(seed=st.integers(0, 2**31 - 1))
def test_bert_contract(seed):
    rng = np.random.default_rng(seed)
    B, T, P = 4, 32, 4
    ids = bert_rows(rng, B, T)
    m = bert_fn(P)(jax.random.key(seed), jnp.asarray(ids))
    L = (ids != PAD).sum(1)
    c = ((ids != PAD) & ~np.isin(ids, SPECIALS)).sum(1)
    n = np.minimum([min(P, max(1, int(round(x * 0.15)))) for x in L], c)
    check_mlm_contract(m, ids, n)


def test_bert_80_10_10_and_uniform_choice():
    B, T, vocab = 1024, 64, 1000
    ids = bert_rows(np.random.default_rng(0), B, T, vocab=vocab, full=True)
    m = bert_fn(10, vocab)(jax.random.key(1), jnp.asarray(ids))
    chosen = check_mlm_contract(m, ids, np.full(B, 10), vocab=vocab)  # round(64 * 0.15) = 10
    inputs = np.asarray(m.inputs)
    n = int(chosen.sum())
    masked = int((inputs[chosen] == MASK_ID).sum())
    same = int((inputs[chosen] == ids[chosen]).sum())
    vns = vocab - len(EXCLUDED)  # a random draw can hit the original token: 1 / vns of the 10%
    assert_binomial(masked, n, 0.8, "[MASK]")
    assert_binomial(same, n, 0.1 + 0.1 / vns, "unchanged")
    assert_binomial(n - masked - same, n, 0.1 * (1 - 1 / vns), "random")
    # The random tokens are uniform over the non-special ids 4..999: check their mean.
    rand = inputs[chosen & (inputs != MASK_ID) & (inputs != ids)]
    assert rand.min() >= UNK and rand.max() < vocab
    assert_mean(rand, (UNK + vocab - 1) / 2, (vns**2 - 1) / 12, "random token id")
    # Every non-special position is equally likely to be chosen (chi-square over positions 1..62).
    counts = chosen.sum(0)
    assert counts[0] == 0 and counts[-1] == 0
    assert stats.chisquare(counts[1:-1]).pvalue > 1e-6


def test_bert_never_picks_specials_and_padding_even_when_listed():
    # Extra special ids (e.g. [UNK] listed as special) are excluded from choice and replacement.
    ids = bert_rows(np.random.default_rng(3), 64, 32)
    f = jax.jit(partial(M.bert_mlm, **{**BERT_KW, "special_ids": (CLS, SEP, UNK)}, max_predictions=5))
    m = f(jax.random.key(0), jnp.asarray(ids))
    inputs, pos, w = np.asarray(m.inputs), np.asarray(m.positions), np.asarray(m.weights)
    assert not np.isin(np.take_along_axis(ids, pos, 1)[w > 0], (PAD, CLS, SEP, UNK)).any()
    changed = (inputs != ids) & (inputs != MASK_ID)
    assert not np.isin(inputs[changed], (PAD, CLS, SEP, UNK, MASK_ID)).any()


# ---------------------------------------------------------------------------------------------
# Determinism, jit, vmap, dynamic masking


def test_same_key_same_mask_different_key_different_mask():
    ids = jnp.asarray(bert_rows(np.random.default_rng(0), 4, 32))
    f = bert_fn(4)
    a, b, c = f(jax.random.key(7), ids), f(jax.random.key(7), ids), f(jax.random.key(8), ids)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.positions, c.positions)


def test_rows_do_not_depend_on_batch_size():
    ids = bert_rows(np.random.default_rng(0), 8, 32)
    big = bert_fn(4)(jax.random.key(3), jnp.asarray(ids[:4]))
    small = bert_fn(4)(jax.random.key(3), jnp.asarray(ids[:2]))
    np.testing.assert_array_equal(big.positions[:2], small.positions)


def test_step_key_gives_a_fresh_mask_per_step():
    ids = jnp.asarray(bert_rows(np.random.default_rng(0), 2, 32, full=True))
    f = jax.jit(lambda step: M.roberta_mlm(M.step_key(0, step), ids, **BERT_KW).positions)
    masks = [np.asarray(f(jnp.int32(s))) for s in range(6)]
    assert all(not np.array_equal(masks[i], masks[j]) for i in range(6) for j in range(i))
    np.testing.assert_array_equal(f(jnp.int32(3)), masks[3])
    # seed as an int, a traced int, or a key: same derivation; streams are independent.
    k1, k2 = M.step_key(5, 9), M.step_key(jnp.int32(5), jnp.int32(9))
    assert np.array_equal(jax.random.key_data(k1), jax.random.key_data(k2))
    k3 = M.step_key(jax.random.key(5), 9)
    assert np.array_equal(jax.random.key_data(k1), jax.random.key_data(k3))
    assert not np.array_equal(jax.random.key_data(M.step_key(5, 9, stream=1)), jax.random.key_data(k1))


def _leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _inputs(B, T, seed=1):
    rng = np.random.default_rng(seed)
    ids = bert_rows(rng, B, T)
    return jnp.asarray(ids), jnp.asarray(rng.random((B, T)) < 0.6), jnp.asarray(ids != PAD)


# name -> (the jitted single-key function other tests also use, its non-key arguments)
STRATEGIES = {
    "bert": lambda: (bert_fn(4), _inputs(4, 32)[:1]),
    "roberta": lambda: (roberta_fn(True), _inputs(4, 32)[:1]),
    "wwm": lambda: (wwm_fn(6), _inputs(4, 32)[:2]),
    "span": lambda: (span_fn(8), _inputs(4, 48)[:2]),
    "random": lambda: (random_fn, _inputs(16, 40)[::2]),
    "block": lambda: (block_fn, _inputs(32, 40)[::2]),
    "mae": lambda: (mae_fn, ()),
    "beit": lambda: (beit_fn(256), ()),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_jit_and_vmap_over_keys(name):
    one, args = STRATEGIES[name]()
    keys = jax.random.split(jax.random.key(0), 2)
    both = jax.jit(jax.vmap(one, in_axes=(0,) + (None,) * len(args)))(keys, *args)
    first, second = one(keys[0], *args), one(keys[1], *args)
    _leaves_equal(jax.tree.map(lambda x: x[0], both), first)
    _leaves_equal(jax.tree.map(lambda x: x[1], both), second)
    leaves = zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True)
    assert any(not np.array_equal(x, y) for x, y in leaves)


# ---------------------------------------------------------------------------------------------
# RoBERTa


def test_roberta_probabilistic_rounding_and_specials():
    # fairseq: num_mask = int(0.15 * L + U[0,1)), so E[num] = 0.15 L exactly. L = 37: 5 or 6, mean 5.55.
    B, T = 2000, 40
    ids = np.full((B, T), PAD, np.int32)
    ids[:, :37] = np.random.default_rng(0).integers(UNK, V, (B, 37))
    ids[:, 0], ids[:, 36] = CLS, SEP
    m = roberta_fn(True)(jax.random.key(0), jnp.asarray(ids))
    counts = np.asarray(m.weights).sum(1)
    assert set(np.unique(counts)) == {5.0, 6.0}
    assert_mean(counts, 0.15 * 37, 0.55 * 0.45, "roberta num_mask")
    # fairseq may mask <s> and </s> themselves (positions drawn over the whole item).
    pos, w = np.asarray(m.positions), np.asarray(m.weights)
    assert_binomial(int(((pos == 0) & (w > 0)).sum()), B, 5.55 / 37, "<s> chosen")
    assert not np.any((pos >= 37) & (w > 0)), "padding chosen"
    m2 = roberta_fn(False)(jax.random.key(0), jnp.asarray(ids))
    pos2, w2 = np.asarray(m2.positions), np.asarray(m2.weights)
    assert not np.any(((pos2 == 0) | (pos2 >= 36)) & (w2 > 0))


# ---------------------------------------------------------------------------------------------
# Whole-word masking


@hyp
@given(seed=st.integers(0, 2**31 - 1))
def test_whole_word_never_splits_and_is_greedy(seed):
    rng = np.random.default_rng(seed)
    B, T, P = 4, 32, 6
    ids = bert_rows(rng, B, T)
    starts = rng.random((B, T)) < 0.5
    m = wwm_fn(P)(jax.random.key(seed), jnp.asarray(ids), jnp.asarray(starts))
    w = np.asarray(m.weights)
    n = np.array([min(P, max(1, int(round((r != PAD).sum() * 0.15)))) for r in ids])
    chosen = check_mlm_contract(m, ids, w.sum(1).astype(int))
    cand = (ids != PAD) & ~np.isin(ids, SPECIALS)
    for b in range(B):
        count = int(chosen[b].sum())
        assert count <= n[b]
        for word in words_of(cand[b], starts[b]):
            picked = chosen[b, word]
            assert picked.all() or not picked.any(), "a word was split"
            # Greedy with skip: a word left out is one that did not fit when it was visited,
            # and the budget left only shrinks, so it still does not fit at the end.
            if not picked.any():
                assert len(word) > n[b] - count


def _bert_wwm_reference(words: list[list[int]], n: int, rng: random.Random) -> set[int]:
    """BERT create_pretraining_data.py with do_whole_word_mask: shuffle words, skip what overflows."""
    order = list(words)
    rng.shuffle(order)
    out: set[int] = set()
    for word in order:
        if len(out) >= n:
            break
        if len(out) + len(word) > n:
            continue
        out.update(word)
    return out


def test_whole_word_matches_bert_reference_distribution():
    lengths = [3, 1, 2, 1, 3, 2, 1, 2, 3]  # 18 text tokens; with [CLS]/[SEP] L = 20, n = round(3.0) = 3
    row = [CLS] + [UNK + i for i in range(18)] + [SEP]
    starts = [False] + [i == 0 for ln in lengths for i in range(ln)] + [False]
    B, T = 4000, 20
    ids = np.tile(np.array(row, np.int32), (B, 1))
    ws = np.tile(np.array(starts), (B, 1))
    m = wwm_fn(3)(jax.random.key(0), jnp.asarray(ids), jnp.asarray(ws))
    ours = np.zeros(T)
    for b, k in zip(np.asarray(m.positions), np.asarray(m.weights), strict=True):
        ours[b[k > 0]] += 1
    words = words_of(np.array([False] + [True] * 18 + [False]), np.array(starts))
    rng, ref = random.Random(0), np.zeros(T)
    for _ in range(B):
        for t in _bert_wwm_reference(words, 3, rng):
            ref[t] += 1
    # Two-sample test per position: P(chosen) is the same in both (pooled binomial z).
    p = (ours + ref) / (2 * B)
    sd = np.sqrt(np.maximum(p * (1 - p) * 2 / B, 1e-12))
    z = (ours - ref) / B / sd
    assert np.all(np.abs(z) < Z), z
    # The budget skip matters here: a 3-piece word is picked less often than a 1-piece one.
    assert ours[1] / B < ours[4] / B


# ---------------------------------------------------------------------------------------------
# SpanBERT


def _truncated_geometric(p=0.2, lmax=10):
    pmf = np.array([(1 - p) ** (k - 1) * p for k in range(1, lmax + 1)])
    return pmf / pmf.sum()


@cache
def span_stats():
    rng = np.random.default_rng(1)
    B, T, P = 512, 96, 15
    ids = bert_rows(rng, B, T, full=True)
    starts = rng.random((B, T)) < 0.6
    plan = span_plan_fn(P)(jax.random.key(2), jnp.asarray(ids), jnp.asarray(starts))
    return jax.tree.map(np.asarray, plan)


def test_span_length_distribution_is_the_papers():
    pmf = _truncated_geometric()
    mean = float((np.arange(1, 11) * pmf).sum())
    assert round(mean, 1) == 3.8  # SpanBERT Sec. 3.1: "mean span length 3.8"
    np.testing.assert_allclose(M.span_length_probs(0.2, 10), pmf)
    plan = span_stats()
    active, lengths, words = plan.active, plan.lengths, plan.words
    drawn = lengths[active]
    assert len(drawn) > 500
    var = float((np.arange(1, 11) ** 2 * pmf).sum()) - mean**2
    assert_mean(drawn, mean, var, "span length")
    hist = np.bincount(drawn, minlength=11)[1:]
    assert stats.chisquare(hist, pmf * len(drawn)).pvalue > 1e-6
    # A placed span covers between 1 and its drawn number of words.
    assert np.all((words[active] >= 1) & (words[active] <= lengths[active]))
    assert np.all(words[~active] == 0)


@hyp
@given(seed=st.integers(0, 2**31 - 1))
def test_span_whole_words_budget_and_per_span_replacement(seed):
    rng = np.random.default_rng(seed)
    B, T, P = 4, 48, 8
    ids = bert_rows(rng, B, T)
    starts = rng.random((B, T)) < 0.6
    key = jax.random.key(seed)
    plan = span_plan_fn(P)(key, jnp.asarray(ids), jnp.asarray(starts))
    m = span_fn(P)(key, jnp.asarray(ids), jnp.asarray(starts))
    chosen = check_mlm_contract(m, ids, np.asarray(plan.chosen).sum(1))
    np.testing.assert_array_equal(chosen, plan.chosen)
    inputs, dec, span_of = np.asarray(m.inputs), np.asarray(plan.decision), np.asarray(plan.span_of)
    cand = (ids != PAD) & ~np.isin(ids, SPECIALS)
    for b in range(B):
        n = min(P, math.ceil(cand[b].sum() * 0.15))  # SpanBERT masking.py: ceil(len * ratio)
        count = int(chosen[b].sum())
        assert count <= n
        for word in words_of(cand[b], starts[b]):
            picked = chosen[b, word]
            assert picked.all() or not picked.any(), "a word was split"
            if not picked.any():
                assert len(word) > n - count, "stopped while a word still fitted"
        for s in set(span_of[b][chosen[b]]):
            where = np.nonzero(span_of[b] == s)[0]
            assert len(set(dec[b, where])) == 1, "one replacement decision per span"
            # A span is contiguous in the text, except where it ran over already masked words.
            assert chosen[b, where.min() : where.max() + 1].all()
            d = dec[b, where[0]]
            if d == M.MASK:
                assert np.all(inputs[b, where] == MASK_ID)
            elif d == M.KEEP:
                np.testing.assert_array_equal(inputs[b, where], ids[b, where])
            else:
                assert not np.isin(inputs[b, where], list(EXCLUDED)).any()


def test_span_replacement_is_80_10_10_per_span():
    plan = span_stats()
    dec, span_of = plan.decision, plan.span_of
    per_span = {}
    for b in range(len(dec)):
        for t in np.nonzero(span_of[b] >= 0)[0]:
            per_span[(b, span_of[b, t])] = dec[b, t]
    d = np.array(list(per_span.values()))
    assert_binomial(int((d == M.MASK).sum()), len(d), 0.8, "span [MASK]")
    assert_binomial(int((d == M.RANDOM).sum()), len(d), 0.1, "span random")
    assert_binomial(int((d == M.KEEP).sum()), len(d), 0.1, "span keep")


# ---------------------------------------------------------------------------------------------
# GPT


@st.composite
def packed_rows(draw):
    B, T = 3, 16
    seg = np.zeros((B, T), np.int32)
    valid = np.zeros((B, T), bool)
    for b in range(B):
        L = draw(st.integers(0, T))
        cuts = sorted(draw(st.lists(st.integers(1, T - 1), max_size=4)))
        for c in cuts:
            seg[b, c:] += 1
        valid[b, :L] = True
    ids = np.where(valid, np.arange(B * T).reshape(B, T) % 50 + 5, PAD).astype(np.int32)
    return ids, seg, valid


@jax.jit
def causal_fn(ids, seg, valid):
    return (
        M.causal_lm(ids, seg, pad_id=PAD),
        M.causal_lm(ids, seg, valid=valid, pad_id=PAD),
        M.causal_segment_mask(seg, valid),
    )


@hyp
@given(packed_rows())
def test_causal_lm_targets_the_whole_stream_and_attends_within_documents(rows):
    """GPT-2 trains on every next token of its stream, the first token after <|endoftext|> included;
    attention never reaches an earlier document."""
    ids, seg, valid = rows
    out, by_valid, seg_mask = causal_fn(jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(valid))
    out = M.CausalLm(*(np.asarray(a) for a in out))
    B, T = ids.shape
    for b in range(B):
        for t in range(T):
            want_t = ids[b, t + 1] if t + 1 < T else PAD
            assert out.targets[b, t] == want_t
            real_next = t + 1 < T and valid[b, t] and valid[b, t + 1]
            assert out.weights[b, t] == float(real_next)
            for s in range(T):
                want = s <= t and seg[b, s] == seg[b, t] and valid[b, s] and valid[b, t]
                assert bool(out.attention_mask[b, 0, t, s]) == want
    np.testing.assert_array_equal(out.attention_mask, seg_mask)
    np.testing.assert_array_equal(out.inputs, ids)
    # The same through an explicit valid mask.
    for x, y in zip(by_valid, out, strict=True):
        np.testing.assert_array_equal(x, y)


def test_causal_lm_vmaps_over_stacked_batches():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(5, 50, (2, 3, 16)), jnp.int32)
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (2, 3, 16)), axis=-1), jnp.int32)
    valid = jnp.asarray(np.arange(16) < rng.integers(4, 17, (2, 3, 1)))
    both = jax.jit(jax.vmap(causal_fn))(ids, seg, valid)
    for i in range(2):
        _leaves_equal(jax.tree.map(lambda x, i=i: x[i], both), causal_fn(ids[i], seg[i], valid[i]))


# ---------------------------------------------------------------------------------------------
# MAE


@pytest.mark.parametrize("n,ratio", [(196, 0.75), (10, 0.75), (49, 0.6)])
def test_mae_matches_hf_vitmae_random_masking(n, ratio):
    torch = pytest.importorskip("torch")
    from transformers import ViTMAEConfig
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEEmbeddings

    emb = ViTMAEEmbeddings(ViTMAEConfig(hidden_size=4, mask_ratio=ratio))
    g = torch.Generator().manual_seed(n)
    noise, x = torch.rand(3, n, generator=g), torch.randn(3, n, 4, generator=g)
    x_hf, mask_hf, restore_hf = emb.random_masking(x, noise=noise)
    ours = M.mae_mask_from_noise(jnp.asarray(noise.numpy()), ratio)
    assert ours.ids_keep.shape == (3, int(n * (1 - ratio)))
    np.testing.assert_array_equal(ours.mask, mask_hf.numpy())
    np.testing.assert_array_equal(ours.ids_restore, restore_hf.numpy())
    kept = np.take_along_axis(x.numpy(), np.asarray(ours.ids_keep)[..., None], 1)
    np.testing.assert_array_equal(kept, x_hf)


def test_mae_restore_of_shuffle_is_identity():
    B, N = 8, 196
    m = mae_fn(jax.random.key(0))
    K = 49
    keep, mask, restore = (np.asarray(a) for a in m)
    assert keep.shape == (B, K)
    x = np.random.default_rng(0).normal(size=(B, N, 3))
    for b in range(B):
        assert sorted(restore[b]) == list(range(N))
        assert len(set(keep[b])) == K and mask[b].sum() == N - K
        assert np.all(mask[b, keep[b]] == 0)
        # The MAE decoder path: [visible tokens; mask tokens] unshuffled by ids_restore.
        shuffled = np.concatenate([x[b, keep[b]], np.full((N - K, 3), np.nan)])
        restored = shuffled[restore[b]]
        np.testing.assert_array_equal(restored[mask[b] == 0], x[b, mask[b] == 0])
        assert np.isnan(restored[mask[b] == 1]).all()
    with pytest.raises(ValueError):
        M.mae_num_keep(10, 1.0)


# ---------------------------------------------------------------------------------------------
# BEiT


def _legal(h: int, w: int, H=14, W=14, min_block=16, lo=0.3, hi=1 / 0.3) -> bool:
    """The rule tested for every block: integer rectangle with area >= 16 and 0.3 <= h/w <= 1/0.3
    (1e-9 slack only for float division), strictly smaller than the grid (the reference's w < width)."""
    return 1 <= h < H and 1 <= w < W and h * w >= min_block and lo - 1e-9 <= h / w <= hi + 1e-9


def _beit_reference(rng: random.Random, H=14, W=14, n=75, min_block=16, attempts=2048):
    """unilm beit/masking_generator.py with the rules above, retrying instead of giving up.
    Returns the accepted (top, left, h, w) blocks and the final count."""
    mask = np.zeros((H, W), bool)
    count, blocks = 0, []
    for _ in range(attempts):
        rem = n - count
        if rem == 0:
            break
        s = rng.uniform(min_block, max(min_block, rem))
        r = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        h, w = int(round(math.sqrt(s * r))), int(round(math.sqrt(s / r)))
        if not _legal(h, w):
            continue
        t, left = rng.randint(0, H - h), rng.randint(0, W - w)
        new = h * w - mask[t : t + h, left : left + w].sum()
        if 0 < new <= rem:
            mask[t : t + h, left : left + w] = True
            count += new
            blocks.append((t, left, h, w))
    return blocks, count


def test_beit_blocks_obey_the_rules_and_count_is_exact():
    B = 256
    out = beit_fn(B)(jax.random.key(0))
    mask, blocks, acc, fb = (np.asarray(a) for a in out)
    assert mask.shape == (B, 196) and mask.dtype == bool
    assert np.all(mask.sum(1) == 75), "exactly 75 masked patches per image"
    rows_with_fallback = 0
    for b in range(B):
        union = np.zeros((14, 14), bool)
        for t, left, h, w in blocks[b][acc[b]]:
            assert _legal(int(h), int(w)), (h, w)
            assert 0 <= t <= 14 - h and 0 <= left <= 14 - w
            union[t : t + h, left : left + w] = True
        union = union.reshape(-1)
        assert not np.any(union & fb[b]), "fallback patches are new patches"
        np.testing.assert_array_equal(union | fb[b], mask[b])
        rows_with_fallback += bool(fb[b].any())
    # The fallback is for the rare image no legal block can finish (~3% here, 1-3 patches each).
    assert rows_with_fallback <= 0.08 * B
    assert fb.sum() <= 0.005 * mask.sum()
    assert acc.sum(1).min() >= 1


def test_beit_block_statistics_match_the_reference_loop():
    B = 256
    out = beit_fn(B)(jax.random.key(1))
    blocks, acc = np.asarray(out.blocks), np.asarray(out.accepted)
    rng = random.Random(0)
    ref = [_beit_reference(rng) for _ in range(B)]
    ours_first = np.array([blocks[b][acc[b]][0] for b in range(B)])
    ref_first = np.array([r[0][0] for r in ref])

    def two_sample(a, b, what):
        z = (a.mean() - b.mean()) / math.sqrt(a.var() / len(a) + b.var() / len(b) + 1e-12)
        assert abs(z) < Z, f"{what}: ours {a.mean():.3f} vs reference {b.mean():.3f} (z={z:.2f})"

    oh, ow, rh, rw = ours_first[:, 2], ours_first[:, 3], ref_first[:, 2], ref_first[:, 3]
    two_sample(oh * ow, rh * rw, "first block area")
    two_sample(np.log(oh / ow), np.log(rh / rw), "log aspect")
    two_sample(ours_first[:, 0] + oh / 2, ref_first[:, 0] + rh / 2, "block centre row")
    two_sample(acc.sum(1).astype(float), np.array([len(r[0]) for r in ref], float), "blocks per image")


def _unilm_generator(rng: random.Random, H=14, W=14, n=75, min_block=16, lo=0.3):
    """unilm beit/masking_generator.py MaskingGenerator.__call__ as released: up to 10 tries per
    block, stop for good after 10 failures; random.uniform(16, m) also when m < 16. Returns the mask
    (N,) and the number of blocks placed."""
    mask = np.zeros((H, W), int)
    count = blocks = 0
    while count < n:
        most = n - count
        delta = 0
        for _ in range(10):
            s = rng.uniform(min_block, most)
            r = math.exp(rng.uniform(math.log(lo), math.log(1 / lo)))
            h, w = int(round(math.sqrt(s * r))), int(round(math.sqrt(s / r)))
            if w < W and h < H:
                t, left = rng.randint(0, H - h), rng.randint(0, W - w)
                new = h * w - mask[t : t + h, left : left + w].sum()
                if 0 < new <= most:
                    mask[t : t + h, left : left + w] = 1
                    delta = new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
        blocks += 1
    return mask.reshape(-1).astype(bool), blocks


def test_beit_unilm_sampler_has_the_released_generators_law():
    """The on-device sampler against the released Python loop: same law of the masked count (which
    falls short of 75 in about a third of the images), of blocks per image, of connected components,
    and of where patches are masked."""
    from scipy import ndimage, stats

    B = 2048
    masks, blocks = jax.jit(lambda k: M.beit_unilm_blocks(k, B))(jax.random.key(5))
    masks, blocks = np.asarray(masks), np.asarray(blocks)
    rng = random.Random(0)
    ref = [_unilm_generator(rng) for _ in range(B)]
    ref_masks, ref_blocks = np.stack([r[0] for r in ref]), np.array([r[1] for r in ref])
    assert masks.shape == (B, 196) and masks.sum(1).max() == 75
    components = lambda ms: np.array([ndimage.label(m.reshape(14, 14))[1] for m in ms])  # noqa: E731
    for ours, theirs, what in (
        (masks.sum(1), ref_masks.sum(1), "masked count"),
        (blocks, ref_blocks, "blocks per image"),
        (components(masks), components(ref_masks), "4-connected components"),
    ):
        assert stats.ks_2samp(ours, theirs).pvalue > 1e-3, (what, ours.mean(), theirs.mean())
    assert 0.5 < (masks.sum(1) == 75).mean() < 0.85  # short of the count in a real share of images
    # Where: the per-patch masking rate, ~0.38 on average, agrees patch by patch within 5 sigma.
    p, q = masks.mean(0), ref_masks.mean(0)
    sigma = np.sqrt((p * (1 - p) + q * (1 - q)) / B)
    assert np.all(np.abs(p - q) < 5 * sigma + 1e-9)


# ---------------------------------------------------------------------------------------------
# Simple strategies and gather


def test_random_token_mask_fixed_count():
    rng = np.random.default_rng(0)
    ids = bert_rows(rng, 16, 40)
    valid = ids != PAD
    m = random_fn(jax.random.key(0), jnp.asarray(ids), jnp.asarray(valid))
    k = round(0.15 * 40)
    assert m.positions.shape == (16, k)
    inputs, pos, w = np.asarray(m.inputs), np.asarray(m.positions), np.asarray(m.weights)
    for b in range(16):
        used = pos[b][w[b] > 0]
        assert len(used) == min(k, valid[b].sum())
        assert valid[b, used].all() and np.all(inputs[b, used] == MASK_ID)
        assert (inputs[b] == MASK_ID).sum() == len(used)


def test_contiguous_block_mask_one_run_inside_valid():
    rng = np.random.default_rng(0)
    ids = bert_rows(rng, 32, 40)
    ids[0, 3:] = PAD  # too short for a run of 5: masks nothing
    valid = ids != PAD
    m = block_fn(jax.random.key(0), jnp.asarray(ids), jnp.asarray(valid))
    inputs, pos, w = np.asarray(m.inputs), np.asarray(m.positions), np.asarray(m.weights)
    assert w[0].sum() == 0 and np.array_equal(inputs[0], ids[0])
    starts = []
    for b in range(1, 32):
        if valid[b].sum() < 5:
            assert w[b].sum() == 0
            continue
        assert w[b].sum() == 5
        assert np.array_equal(pos[b], pos[b, 0] + np.arange(5)) and valid[b, pos[b]].all()
        assert np.all(inputs[b, pos[b]] == MASK_ID)
        starts.append(pos[b, 0])
    assert len(set(starts)) > 5


def test_gather_positions():
    x = jnp.arange(2 * 6 * 3).reshape(2, 6, 3)
    pos = jnp.array([[5, 0], [2, 2]])
    np.testing.assert_array_equal(M.gather_positions(x, pos), np.asarray(x)[np.arange(2)[:, None], pos])
    np.testing.assert_array_equal(M.gather_positions(x[..., 0], pos), np.asarray(x[..., 0])[[[0], [1]], pos])
