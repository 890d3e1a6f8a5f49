"""Pieces every masking strategy shares: per-row keys and random words, ranking scores, the 80/10/10
decision, random replacement tokens, and `_finish_row`, which turns a chosen set into an `MlmMask`.

Randomness is drawn as raw 32-bit words in as few calls as possible: every jax.random call site
compiles its own threefry hash, which dominated compile time when each draw had its own call.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# What happens to a chosen token: BERT Sec. 3.1 "Task #1": 80% [MASK], 10% random token, 10% unchanged.
MASK, RANDOM, KEEP = 0, 1, 2


class MlmMask(NamedTuple):
    """Masked-LM batch. inputs (B, T) corrupted ids; positions (B, P) int32 ascending (unused: 0);
    targets (B, P) original ids (unused: 0); weights (B, P) float32 (1.0 real slot, 0.0 unused)."""

    inputs: jax.Array
    positions: jax.Array
    targets: jax.Array
    weights: jax.Array


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


def _candidates(ids: jax.Array, special_ids: tuple[int, ...], pad_id: int | None):
    """(real, cand), both like ids: real = not padding; cand = real and not in special_ids."""
    real = jnp.ones(ids.shape, bool) if pad_id is None else ids != pad_id
    return real, real & ~_is_any(ids, tuple(special_ids))


def _excluded(vocab_size: int, special_ids: tuple[int, ...], pad_id: int | None, mask_id: int) -> np.ndarray:
    """Sorted ids a random replacement token must never be (specials, padding, [MASK])."""
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
