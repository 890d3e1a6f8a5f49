"""What a checkpoint can do once trained: fill masks (BERT, RoBERTa) and generate text (GPT-2).

Both read a workdir — a training run's or an `import-hf`'s — through `checkpoint.load_params`
(verified like every restore) and its tokenizer in WORKDIR/tokenizer (written by `train` for text
runs and by `import-hf` when the transformers directory has one).

fill_mask(text): [CLS] text [SEP] (<s> text </s> for RoBERTa) through the encoder; at every mask,
    softmax over the vocabulary, the top k.
generate(prompt): GPT-2 with a key/value cache, in one jitted program per (prompt length, number of
    new tokens): the prompt in one pass fills the cache, then each new token is one step of a
    `fori_loop` that attends to the cache; nothing recompiles per token.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maskjax import checkpoint, models
from maskjax.data import tokenizers
from maskjax.models import layers


def tokenizer_of(workdir: str | os.PathLike, path: str | os.PathLike | None = None) -> tokenizers.Tokenizer:
    """The workdir's tokenizer (WORKDIR/tokenizer), or the one at `path`."""
    where = Path(path) if path else Path(workdir) / "tokenizer"
    if not where.exists():
        raise FileNotFoundError(
            f"no tokenizer at {where}: pass --tokenizer=DIR "
            "(a folder with tokenizer.json, vocab.txt, or vocab.json + merges.txt)"
        )
    return tokenizers.load(where)


def load(workdir: str | os.PathLike, families: tuple[str, ...], step: int | None = None) -> tuple[Any, Any]:
    """(model with the checkpoint's parameters, its config), refusing other families."""
    family, cfg, params = checkpoint.load_params(workdir, step)
    if family not in families:
        raise ValueError(
            f"{workdir} holds a {family!r} checkpoint; this command needs one of {list(families)}"
        )
    model = nnx.eval_shape(lambda: models.build(family, cfg))
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), cfg


# -- fill-mask ------------------------------------------------------------------------------------


def encode_with_masks(tok: tokenizers.Tokenizer, text: str) -> list[int]:
    """[CLS] ids [SEP] with the mask token's id wherever `text` has the mask token's string.

    The pieces between masks are encoded apart: maskjax's tokenizers encode special-token strings in
    raw text as text. Byte-level BPE (RoBERTa) also drops the space before a mask, as its <mask>
    token takes it (lstrip), so "The <mask> sat" is "The", <mask>, "Ġsat" as in transformers."""
    if tok.mask_id is None or tok.cls_id is None or tok.sep_id is None:
        raise ValueError("this tokenizer has no mask, cls or sep token: not a BERT or RoBERTa vocabulary")
    mask = tok.id_to_token(tok.mask_id)
    pieces = text.split(mask)
    if len(pieces) < 2:
        raise ValueError(f"the text has no {mask}: put {mask} where a token is to be filled in")
    ids = [tok.cls_id]
    for i, piece in enumerate(pieces):
        if i:
            ids.append(tok.mask_id)
        if tok.kind == "bpe" and i + 1 < len(pieces):
            piece = piece.rstrip()
        if piece:
            ids += tok.encode(piece)
    return [*ids, tok.sep_id]


@nnx.jit
def _mlm_probs(model: Any, ids: jax.Array) -> jax.Array:
    return jax.nn.softmax(model(ids)["mlm_logits"], axis=-1)


def fill_mask(model: Any, tok: tokenizers.Tokenizer, text: str, top_k: int = 5) -> list[list[dict]]:
    """For each mask of `text`, in order: the top_k {"token_id", "token", "score", "sequence"}."""
    ids = encode_with_masks(tok, text)
    if len(ids) > model.cfg.max_seq_len:
        raise ValueError(
            f"the text is {len(ids)} tokens with [CLS] and [SEP]; the model takes {model.cfg.max_seq_len}"
        )
    probs = np.asarray(_mlm_probs(model, jnp.asarray([ids], jnp.int32)))[0]
    positions = [i for i, t in enumerate(ids) if t == tok.mask_id]
    out = []
    for p in positions:
        best = np.argsort(-probs[p], kind="stable")[:top_k]
        rows = []
        for t in best:
            filled = list(ids)
            filled[p] = int(t)
            rows.append(
                {
                    "token_id": int(t),
                    "token": tok.decode([int(t)], skip_special_tokens=False).strip(),
                    "score": float(probs[p, t]),
                    "sequence": tok.decode(filled[1:-1], skip_special_tokens=False),
                }
            )
        out.append(rows)
    return out


# -- generate -------------------------------------------------------------------------------------


def _chunk(model: Any, ids: jax.Array, start: jax.Array, cache: tuple) -> tuple[jax.Array, tuple]:
    """Logits of `ids` (B, T) at positions start..start+T-1, attending to the cache and to each other;
    their keys and values written into the cache (L, B, S, N, H) at those positions."""
    length, size = ids.shape[1], cache[0].shape[2]
    positions = start + jnp.arange(length)
    x = model.token_embed(ids) + model.position_embed(positions[None])
    # query t may see cache slot s when s <= its position: (1, 1, T, S)
    mask = (jnp.arange(size)[None, :] <= positions[:, None])[None, None]
    graphdef, stacked = nnx.split(model.stack.blocks)

    def layer(x, scanned):
        state, keys, values = scanned
        block = nnx.merge(graphdef, state)
        h = block.ln1(x)
        q, k, v = block.attn.query(h), block.attn.key(h), block.attn.value(h)
        keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, start, 0, 0))
        values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, start, 0, 0))
        x = x + block.attn.out(layers.attention(q, keys, values, mask=mask))
        x = x + block.mlp(block.ln2(x))
        return x, (keys, values)

    x, cache = jax.lax.scan(layer, x, (stacked, *cache))
    logits = model.token_embed.attend(model.final_ln(x)).astype(jnp.float32)
    return logits, cache


def _pick(logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """(B,) next tokens from (B, V) logits: argmax at temperature 0, else a sample of
    softmax(logits / T) restricted to the top_k tokens (0: all) and to the smallest set whose
    probability reaches top_p (1: all)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
        before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the tokens ranked above
        keep_sorted = before < top_p  # the first token is always kept
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1)


@functools.partial(nnx.jit, static_argnames=("new_tokens", "temperature", "top_k", "top_p"))
def _generate(
    model: Any,
    prompt: jax.Array,
    key: jax.Array,
    *,
    new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
) -> jax.Array:
    cfg = model.cfg
    batch, length = prompt.shape
    size = length + new_tokens
    shape = (cfg.layers, batch, size, cfg.heads, cfg.head_dim)
    cache = (jnp.zeros(shape, jnp.dtype(cfg.dtype)), jnp.zeros(shape, jnp.dtype(cfg.dtype)))
    logits, cache = _chunk(model, prompt, jnp.int32(0), cache)
    first = _pick(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_k, top_p)
    out = jnp.zeros((batch, new_tokens), jnp.int32).at[:, 0].set(first)

    def step(i, carry):
        out, cache = carry
        previous = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
        logits, cache = _chunk(model, previous, length + i - 1, cache)
        token = _pick(logits[:, -1], jax.random.fold_in(key, i), temperature, top_k, top_p)
        return out.at[:, i].set(token), cache

    out, _ = jax.lax.fori_loop(1, new_tokens, step, (out, cache))
    return out


def generate(
    model: Any,
    prompt_ids: list[int],
    *,
    max_new_tokens: int = 50,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
) -> list[int]:
    """The new token ids after `prompt_ids` (at most max_new_tokens; up to and with eos_id if it comes)."""
    checks = {
        "max_new_tokens": (max_new_tokens >= 1, ">= 1"),
        "temperature": (temperature >= 0.0, ">= 0 (0: greedy)"),
        "top_k": (top_k >= 0, ">= 0 (0: no limit)"),
        "top_p": (0.0 < top_p <= 1.0, "in (0, 1]"),
    }
    for name, (ok, allowed) in checks.items():
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')}={locals()[name]!r} is invalid: must be {allowed}")
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token of text")
    if len(prompt_ids) + max_new_tokens > model.cfg.max_length:
        raise ValueError(
            f"{len(prompt_ids)} prompt tokens + --max-new-tokens={max_new_tokens} exceed the model's "
            f"context of {model.cfg.max_length}"
        )
    out = _generate(
        model,
        jnp.asarray([prompt_ids], jnp.int32),
        jax.random.key(seed),
        new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
    )
    ids = [int(t) for t in np.asarray(out)[0]]
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id) + 1]
    return ids
