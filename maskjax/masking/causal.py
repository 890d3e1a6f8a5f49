"""Next-token prediction: GPT's shifted targets and a causal attention mask that also stops at
document boundaries in packed rows. No randomness, no key."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class CausalLm(NamedTuple):
    """Next-token batch. inputs (B, T); targets (B, T) = inputs shifted left by one; weights (B, T)
    float32; attention_mask (B, 1, T, T) bool, True = query may attend to key."""

    inputs: jax.Array
    targets: jax.Array
    weights: jax.Array
    attention_mask: jax.Array


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
    column gets pad_id or 0); weights[t] = 1 wherever t and t+1 are real tokens. That includes the
    step from a document's closing <|endoftext|> to the next document's first token, as in the
    GPTs' packed training sequences ("documents within a sequence are delimited with a special end
    of text token", Brown et al. 2020, Sec. 2.3; GPT-2's released encoder has the token), so the
    model learns how a text starts. Attention still stops at the document boundary (the
    <|endoftext|> sees its own document), and only padding predicts nothing.
    """
    B, T = ids.shape
    v = _valid(ids, pad_id, valid)
    seg = jnp.zeros_like(ids) if segment_ids is None else segment_ids
    fill = jnp.full((B, 1), 0 if pad_id is None else pad_id, ids.dtype)
    targets = jnp.concatenate([ids[:, 1:], fill], axis=1)
    nxt_ok = jnp.concatenate([v[:, 1:], jnp.zeros((B, 1), bool)], axis=1)
    weights = (v & nxt_ok).astype(jnp.float32)
    return CausalLm(ids, targets, weights, causal_segment_mask(seg, v))
