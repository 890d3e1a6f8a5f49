"""GPT-2: a pre-LN causal transformer decoder with learned positions and a tied output layer.

Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", Sec. 2.3:
GPT's decoder with LayerNorm moved to the input of each sub-block, an extra
LayerNorm after the last block, residual-layer weights scaled by 1/√N at
initialisation (N = number of residual layers, two per block), a 50,257-token
vocabulary and a 1024-token context.

    h0 = E[ids] + P[positions]                      (dropout)
    hl = Block_l(h_{l-1}, mask)                     pre-LN, l = 1..L
    hidden = LN_f(hL);  logits = hidden · Eᵀ        (float32, E tied)

The model only *consumes* an attention mask: (B, 1, T, T) bool, True = may
attend. `maskjax.masking.causal_lm` builds masks that also stop attention at
document boundaries of packed sequences; without one, a plain causal mask is used.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maskjax.models import layers
from maskjax.sharding import constrain


@dataclasses.dataclass(frozen=True, kw_only=True)
class GptConfig(layers.TransformerConfig):
    """GPT-2 sizes; the defaults of the inherited fields are GPT-2's, not BERT's."""

    vocab_size: int = 50257  # byte-level BPE, GPT-2 paper Sec. 2.2
    max_length: int = 1024  # context size (HF: n_positions), GPT-2 paper Sec. 2.3
    embed_dropout: float | None = None  # on the summed embeddings; None: same as `dropout`
    # OpenAI's released GPT-2 code initialises the position table with std 0.01 (tokens: init_std 0.02).
    position_init_std: float = 0.01
    pre_ln: bool = True
    # GPT-2's "gelu_new": the tanh approximation of GELU.
    activation: Literal["gelu", "gelu_tanh", "relu"] = "gelu_tanh"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        checks = {
            "hidden": (
                self.hidden > 0 and self.heads > 0 and self.hidden % self.heads == 0,
                "divisible by heads",
            ),
            "vocab_size": (self.vocab_size > 0, "> 0"),
            "max_length": (self.max_length > 0, "> 0"),
            "activation": (self.activation in ("gelu", "gelu_tanh", "relu"), "gelu, gelu_tanh or relu"),
            "pre_ln": (self.pre_ln, "True (GPT-2 is pre-LN)"),
        }
        for name in ("dropout", "attention_dropout", "embed_dropout"):
            rate = getattr(self, name)
            checks[name] = (rate is None or 0.0 <= rate < 1.0, "in [0, 1)")
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"GptConfig.{name}={getattr(self, name)!r} is invalid: must be {allowed}")


def _gpt2(hidden: int, layers_: int, heads: int, **overrides) -> GptConfig:
    # GPT-2 paper Sec. 2.3 / Table 2. GPT-2 "largely follows the details of the OpenAI GPT model", whose
    # Sec. 4.1 (Radford et al. 2018) gives the 4·d feed-forward width and dropout 0.1 on residuals,
    # embeddings and attention.
    return GptConfig(
        **{
            "hidden": hidden,
            "layers": layers_,
            "heads": heads,
            "mlp_dim": 4 * hidden,
            "dropout": 0.1,
            "attention_dropout": 0.1,
            **overrides,
        }
    )


def gpt2_small(**overrides) -> GptConfig:
    """117M as reported in Table 2 (124,439,808 counted exactly, with the tied output)."""
    return _gpt2(768, 12, 12, **overrides)


def gpt2_medium(**overrides) -> GptConfig:
    """345M as reported in Table 2 (354,823,168 counted exactly)."""
    return _gpt2(1024, 24, 16, **overrides)


def gpt2_large(**overrides) -> GptConfig:
    """762M as reported in Table 2 (774,030,080 counted exactly)."""
    return _gpt2(1280, 36, 20, **overrides)


def gpt2_xl(**overrides) -> GptConfig:
    """1542M as reported in Table 2 (1,557,611,200 counted exactly)."""
    return _gpt2(1600, 48, 25, **overrides)


def causal_mask(length: int) -> jax.Array:
    """(1, 1, T, T) bool lower-triangular mask: position t attends to s ≤ t."""
    return jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]


class Gpt(nnx.Module):
    """GPT-2 language model. Parameters: token_embed, position_embed, stack, final_ln."""

    def __init__(self, cfg: GptConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.token_embed = layers.Embed(
            cfg.vocab_size, cfg.hidden, ("vocab", "embed"), init_std=cfg.init_std, **kw
        )
        self.position_embed = layers.Embed(
            cfg.max_length, cfg.hidden, ("position", "embed"), init_std=cfg.position_init_std, **kw
        )
        self.stack = layers.Stack(cfg, rngs=rngs)
        self.final_ln = layers.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, **kw)
        # GPT-2 paper Sec. 2.3: scale the residual layers' weights by 1/√N. Read (as transformers and
        # Megatron do) as N = 2·L: the attention and MLP output projections, which write into the residual.
        scale = 1.0 / np.sqrt(2 * cfg.layers)
        for kernel in (self.stack.blocks.attn.out.kernel, self.stack.blocks.mlp.wo.kernel):
            kernel[...] = kernel[...] * scale
        self.cfg = cfg

    def __call__(
        self,
        ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """ids (B, T) int -> {"hidden": (B, T, D) after LN_f, "logits": (B, T, V) float32}.

        positions: (B, T) int indices into the position table (restart them per
        packed document); default 0..T-1. attention_mask: (B, 1, T, T) bool,
        True = may attend; default causal. dropout_key: None = deterministic.
        """
        cfg = self.cfg
        batch, length = ids.shape
        if length > cfg.max_length:
            raise ValueError(f"sequence length {length} exceeds GptConfig.max_length={cfg.max_length}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        if attention_mask is None:
            attention_mask = causal_mask(length)
        elif attention_mask.shape[-2:] != (length, length) or attention_mask.ndim != 4:
            raise ValueError(f"attention_mask must be (B, 1, {length}, {length}); got {attention_mask.shape}")
        k_embed, k_stack = jax.random.split(dropout_key) if dropout_key is not None else (None, None)

        x = self.token_embed(ids) + self.position_embed(positions)
        rate = cfg.dropout if cfg.embed_dropout is None else cfg.embed_dropout
        x = constrain(layers.dropout(x, rate, k_embed), ("batch", "length", "embed"))
        x = self.stack(x, mask=attention_mask, dropout_key=k_stack)
        hidden = self.final_ln(x)
        logits = self.token_embed.attend(hidden).astype(jnp.float32)
        return {"hidden": hidden, "logits": constrain(logits, ("batch", "length", "vocab"))}


def param_count(cfg: GptConfig) -> int:
    """Exact number of parameters (the tied output layer counted once), from shapes alone."""
    abstract = nnx.eval_shape(lambda: Gpt(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
