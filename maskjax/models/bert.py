"""BERT and RoBERTa: a post-LN encoder with an MLM head and (BERT only) NSP.

The two differ only where the papers do, all in `BertConfig`:

  BERT     word + learned position (0..T-1) + segment embeddings; NSP head on the pooled [CLS].
  RoBERTa  no NSP, one segment, fairseq positions that start at pad_id + 1 and skip padding
           (position_offset = pad_id + 1), LayerNorm eps 1e-5.

    x = Dropout(LN(E_word[ids] + E_pos[positions] + E_type[types]))        (B, T, D)
    h = Stack(x, padding mask)                                              (B, T, D)
    pooled = tanh(h[:, 0]·Wp + bp)                                          (B, D)
    nsp    = pooled·Wn + bn                                                 (B, 2)
    mlm    = LN(gelu(h[:, P]·Wt + bt))·E_wordᵀ + b_vocab                    (B, P, V)

The MLM head gathers the `max_predictions_per_seq` masked positions *before*
the vocabulary projection, so the (D × V) matmul runs on P ≈ 0.15·T rows, not T
(never compute what is thrown away; DESIGN.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from maskjax.models import layers
from maskjax.sharding import constrain


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig(layers.TransformerConfig):
    """BERT / RoBERTa sizes; the paper presets are `bert_base()` ... `roberta_large()`."""

    vocab_size: int
    max_length: int = 512  # rows of the position table
    type_vocab_size: int = 2  # segments A/B; RoBERTa keeps a single row
    pad_id: int = 0
    # 0: positions 0..T-1 (BERT). pad_id + 1: fairseq/RoBERTa positions — real tokens get
    # pad_id + 1, pad_id + 2, ... counting only non-pad tokens, pads get row pad_id.
    position_offset: int = 0
    nsp: bool = True  # next-sentence-prediction head (BERT); needs the pooler
    pooler: bool = True  # dense + tanh on [CLS]; RobertaForMaskedLM and fairseq have none
    mlm_head: bool = True  # False: a task model (fine-tuning) keeps no vocabulary head
    num_labels: int = 0  # > 0: a classifier on the pooled [CLS] (fine-tuning; needs the pooler)
    span_head: bool = False  # start/end logits at every token (extractive QA, BertForQuestionAnswering)

    def __post_init__(self):
        problems = []
        if self.hidden % self.heads:
            problems.append(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.position_offset not in (0, self.pad_id + 1):
            problems.append(
                f"position_offset must be 0 (BERT) or pad_id + 1 = {self.pad_id + 1} (RoBERTa); "
                f"got {self.position_offset}"
            )
        if not 0 <= self.pad_id < self.vocab_size:
            problems.append(f"pad_id must be in [0, vocab_size={self.vocab_size}); got {self.pad_id}")
        if self.type_vocab_size < 1:
            problems.append(f"type_vocab_size must be >= 1; got {self.type_vocab_size}")
        if self.max_length <= self.position_offset:
            problems.append(
                f"max_length ({self.max_length}) must exceed position_offset ({self.position_offset})"
            )
        if self.nsp and not self.pooler:
            problems.append("nsp=True needs pooler=True (NSP classifies the pooled [CLS] vector)")
        if self.num_labels < 0 or (self.num_labels and not self.pooler):
            problems.append(f"num_labels={self.num_labels} must be 0 (none) or > 0 with pooler=True")
        if self.pre_ln:
            problems.append("BERT/RoBERTa are post-LN: pre_ln must be False")
        if problems:
            raise ValueError("BertConfig: " + "; ".join(problems))

    @property
    def max_seq_len(self) -> int:
        """Longest input the position table covers (512 for BERT and RoBERTa)."""
        return self.max_length - self.position_offset


def bert_base(**overrides) -> BertConfig:
    """BERT-base: L=12, H=768, A=12, FFN 4H (Devlin et al. 2019, Sec. 3); 110M parameters."""
    cfg = BertConfig(hidden=768, layers=12, heads=12, mlp_dim=3072, vocab_size=30522, max_length=512)
    return dataclasses.replace(cfg, **overrides)


def bert_large(**overrides) -> BertConfig:
    """BERT-large: L=24, H=1024, A=16, FFN 4H (Devlin et al. 2019, Sec. 3); 340M parameters."""
    cfg = BertConfig(hidden=1024, layers=24, heads=16, mlp_dim=4096, vocab_size=30522, max_length=512)
    return dataclasses.replace(cfg, **overrides)


# RoBERTa keeps BERT's architecture (Liu et al. 2019, Sec. 2 and 4) with a 50K byte-level BPE
# (Sec. 4.4; the released dictionary has 50,265 entries), no NSP (Sec. 4.2), and fairseq's
# padding-aware positions: 512 positions + the offset of pad_id + 1 = 2 give a 514-row table.
_ROBERTA = dict(
    vocab_size=50265,
    max_length=514,
    type_vocab_size=1,
    pad_id=1,
    position_offset=2,
    nsp=False,
    pooler=False,
    layer_norm_eps=1e-5,
)


def roberta_base(**overrides) -> BertConfig:
    """RoBERTa-base: BERT-base sizes (Liu et al. 2019); 125M parameters."""
    cfg = BertConfig(hidden=768, layers=12, heads=12, mlp_dim=3072, **_ROBERTA)
    return dataclasses.replace(cfg, **overrides)


def roberta_large(**overrides) -> BertConfig:
    """RoBERTa-large: BERT-large sizes (Liu et al. 2019); 355M parameters."""
    cfg = BertConfig(hidden=1024, layers=24, heads=16, mlp_dim=4096, **_ROBERTA)
    return dataclasses.replace(cfg, **overrides)


def position_ids(input_ids: jax.Array, cfg: BertConfig) -> jax.Array:
    """(B, T) rows of the position table.

    BERT: 0..T-1. RoBERTa (fairseq `make_positions`): cumsum over non-pad tokens
    + pad_id for real tokens, pad_id for pads, so left padding does not shift positions.
    """
    batch, length = input_ids.shape
    if cfg.position_offset == 0:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    real = (input_ids != cfg.pad_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + cfg.pad_id


class MlmHead(nnx.Module):
    """transform (dense, GELU, LayerNorm), then logits tied to the word embeddings + a vocab bias."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        kw = dict(
            rngs=rngs, init=cfg.init, init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        # D -> D: the repeated "embed" stays unsharded on its second use (sharding.logical_to_spec).
        self.dense = layers.Dense(cfg.hidden, cfg.hidden, ("embed", "embed"), **kw)
        self.ln = layers.LayerNorm(
            cfg.hidden, rngs=rngs, eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        self.bias = layers.param(
            rngs, jax.nn.initializers.zeros, (cfg.vocab_size,), ("vocab",), cfg.param_dtype
        )
        self.act = layers.activation(cfg.activation)

    def __call__(self, h: jax.Array, word: layers.Embed) -> jax.Array:
        """h (B, P, D) -> float32 logits (B, P, V)."""
        h = self.ln(self.act(self.dense(h)))
        logits = word.attend(h).astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))


class Bert(nnx.Module):
    """BERT / RoBERTa encoder with pooler, NSP (cfg.nsp) and MLM heads; see the module doc."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.word_embed = layers.Embed(cfg.vocab_size, cfg.hidden, ("vocab", "embed"), **kw)
        # Small tables (512 and 2 rows): their rows are replicated, hence no logical name.
        self.position_embed = layers.Embed(cfg.max_length, cfg.hidden, (None, "embed"), **kw)
        self.type_embed = layers.Embed(cfg.type_vocab_size, cfg.hidden, (None, "embed"), **kw)
        self.embed_ln = layers.LayerNorm(
            cfg.hidden, rngs=rngs, eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        self.encoder = layers.Stack(cfg, rngs=rngs)
        dense = dict(
            rngs=rngs, init=cfg.init, init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        self.pooler = (
            layers.Dense(cfg.hidden, cfg.hidden, ("embed", "embed"), **dense) if cfg.pooler else None
        )
        self.nsp = layers.Dense(cfg.hidden, 2, ("embed", None), **dense) if cfg.nsp else None
        self.mlm = MlmHead(cfg, rngs=rngs) if cfg.mlm_head else None
        # BertForSequenceClassification: Dropout(pooled)·W + b. RobertaForSequenceClassification's head
        # is the same in evaluation: its dense + tanh on <s> is this pooler, fresh in both.
        self.classifier = (
            layers.Dense(cfg.hidden, cfg.num_labels, ("embed", None), **dense) if cfg.num_labels else None
        )
        self.qa = layers.Dense(cfg.hidden, 2, ("embed", None), **dense) if cfg.span_head else None
        self.cfg = cfg

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        token_type_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        masked_positions: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """input_ids (B, T) int; attention_mask (B, T) 1 = real token; masked_positions (B, P) int.

        Returns `hidden` (B, T, D), `pooled` (B, D) if cfg.pooler, `nsp_logits` (B, 2) if cfg.nsp,
        `logits` (B, C) if cfg.num_labels, `start_logits` and `end_logits` (B, T) if cfg.span_head,
        `mlm_logits` (B, P, V) at `masked_positions`, or (B, T, V)
        when it is None (if cfg.mlm_head).
        Logits are float32. `dropout_key` None = deterministic (evaluation).
        """
        cfg = self.cfg
        length = input_ids.shape[1]
        if length > cfg.max_seq_len:
            raise ValueError(
                f"sequence length {length} exceeds the position table: max_length={cfg.max_length} "
                f"with position_offset={cfg.position_offset} allows {cfg.max_seq_len}"
            )
        k_embed, k_encoder = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)

        x = (
            self.word_embed(input_ids)
            + self.position_embed(position_ids(input_ids, cfg))
            + self.type_embed(token_type_ids)
        )
        x = layers.dropout(self.embed_ln(x), cfg.dropout, k_embed)
        x = constrain(x, ("batch", "length", "embed"))

        # (B, 1, 1, T): every query may attend to the real keys of its own sequence.
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        hidden = self.encoder(x, mask=mask, dropout_key=k_encoder)
        out = {"hidden": hidden}

        if self.pooler is not None:
            out["pooled"] = jnp.tanh(self.pooler(hidden[:, 0]))
            if self.nsp is not None:
                out["nsp_logits"] = self.nsp(out["pooled"]).astype(jnp.float32)
            if self.classifier is not None:
                k_head = jax.random.fold_in(dropout_key, 2) if dropout_key is not None else None
                pooled = layers.dropout(out["pooled"], cfg.dropout, k_head)
                out["logits"] = self.classifier(pooled).astype(jnp.float32)
        if self.qa is not None:
            spans = self.qa(hidden).astype(jnp.float32)  # (B, T, 2)
            out["start_logits"], out["end_logits"] = spans[..., 0], spans[..., 1]
        if self.mlm is None:
            return out

        if masked_positions is not None:
            # (B, P, D): the vocabulary projection then costs P/T of the full one.
            hidden = jnp.take_along_axis(hidden, masked_positions[..., None].astype(jnp.int32), axis=1)
            hidden = constrain(hidden, ("batch", "length", "embed"))
        out["mlm_logits"] = self.mlm(hidden, self.word_embed)
        return out


def param_count(cfg: BertConfig) -> int:
    """Number of parameters, from shapes only (nothing allocated). Tied output counted once."""
    state = nnx.state(nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return sum(int(x.size) for x in jax.tree.leaves(state))
