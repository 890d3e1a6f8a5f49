"""Transformer building blocks shared by every model family.

Every parameter carries logical axis names (its `out_sharding` metadata) and
every large activation is passed through `sharding.constrain`, so the same code
runs data parallel, FSDP or tensor parallel depending only on the rules.

Conventions (shapes): B batch, T length, D hidden ("embed"), N heads, H head
dim ("kv"), F feed-forward width ("mlp"), V vocabulary, L layers.
Attention projections keep heads as their own axis: query kernel (D, N, H),
output kernel (N, H, D), so "heads" can be sharded for tensor parallelism.

The layers of a stack are stored stacked on a leading "layers" axis and applied
with `lax.scan` (one compiled body, fast compiles at depth) or unrolled — a
config switch, like rematerialization.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maskjax.sharding import constrain

Init = Literal["normal", "truncated", "xavier", "zeros", "ones"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Sizes and switches of a stack of transformer blocks (no hard-coded sizes)."""

    hidden: int
    layers: int
    heads: int
    mlp_dim: int
    dropout: float = 0.1  # on residual branches and embeddings
    attention_dropout: float = 0.1  # on attention probabilities
    drop_path: float = 0.0  # stochastic depth (BEiT, ViT fine-tuning): the deepest layer's rate
    # "linear": layer i of L drops at drop_path·i/(L−1) (BEiT, MAE fine-tuning); "uniform": all equal
    drop_path_schedule: Literal["linear", "uniform"] = "linear"
    layer_norm_eps: float = 1e-12
    activation: Literal["gelu", "gelu_tanh", "relu"] = "gelu"
    pre_ln: bool = False  # False: BERT's post-LN; True: GPT-2 / ViT pre-LN
    qkv_bias: tuple[bool, bool, bool] = (True, True, True)
    layer_scale: float | None = None  # BEiT's per-channel residual scale init value
    # kernel init: normal(init_std); "truncated": normal(init_std) cut at ±init_std; xavier_uniform
    init: Init = "normal"
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype; parameters stay `param_dtype`
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: Literal["none", "full", "dots"] = "none"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def initializer(kind: Init, std: float, n_in: int, n_out: int) -> Callable:
    """A kernel initialiser by name; n_in / n_out count the kernel's input and output axes (xavier)."""
    if kind == "normal":
        return jax.nn.initializers.normal(std)
    if kind == "truncated":  # BEiT's trunc_normal_(std) cuts at ±std: an effective std of 0.54·std
        return jax.nn.initializers.truncated_normal(std, lower=-1.0, upper=1.0)
    if kind == "xavier":
        fan_in, fan_out = tuple(range(n_in)), tuple(range(n_in, n_in + n_out))
        return jax.nn.initializers.xavier_uniform(in_axis=fan_in, out_axis=fan_out)
    if kind == "zeros":
        return jax.nn.initializers.zeros
    if kind == "ones":
        return jax.nn.initializers.ones
    raise ValueError(f"init must be one of normal, truncated, xavier, zeros, ones; got {kind!r}")


def param(
    rngs: nnx.Rngs,
    init: Callable,
    shape: Sequence[int],
    names: Sequence[str | None],
    dtype: str = "float32",
) -> nnx.Param:
    """A parameter annotated with its logical axis names (sharded later, by rules)."""
    assert len(shape) == len(names), (shape, names)
    value = init(rngs.params(), tuple(shape), jnp.dtype(dtype))
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def _as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
    return (x,) if isinstance(x, int) else tuple(x)


class Dense(nnx.Module):
    """y = x·W + b, contracting the trailing `in_shape` axes of x.

    Kernel shape is in_shape + out_shape, e.g. (D,) -> (N, H) for a query
    projection, so heads stay a named axis instead of being folded into D.
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        out_shape: int | Sequence[int],
        names: Sequence[str | None],
        *,
        rngs: nnx.Rngs,
        use_bias: bool = True,
        init: Init = "normal",
        init_std: float = 0.02,
        dtype: str = "float32",
        param_dtype: str = "float32",
    ):
        in_shape, out_shape = _as_tuple(in_shape), _as_tuple(out_shape)
        init_fn = initializer(init, init_std, len(in_shape), len(out_shape))
        self.kernel = param(rngs, init_fn, in_shape + out_shape, names, param_dtype)
        self.bias = (
            param(rngs, jax.nn.initializers.zeros, out_shape, names[len(in_shape) :], param_dtype)
            if use_bias
            else None
        )
        self.n_in = len(in_shape)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        contract = tuple(range(x.ndim - self.n_in, x.ndim))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, ((contract, tuple(range(self.n_in))), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Lookup table (V, D); `attend` gives logits against it (tied output layer)."""

    def __init__(
        self,
        num: int,
        features: int,
        names: Sequence[str] = ("vocab", "embed"),
        *,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
        dtype: str = "float32",
        param_dtype: str = "float32",
    ):
        self.embedding = param(
            rngs, jax.nn.initializers.normal(init_std), (num, features), names, param_dtype
        )
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x (..., D) -> logits (..., V) = x · Eᵀ."""
        # Accumulate in float32: logits feed a softmax over the whole vocabulary.
        return jnp.einsum(
            "...d,vd->...v",
            x.astype(self.dtype),
            self.embedding[...].astype(self.dtype),
            preferred_element_type=jnp.float32,
        )


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, computed in float32 whatever the compute dtype."""

    def __init__(
        self,
        features: int,
        *,
        rngs: nnx.Rngs,
        eps: float = 1e-12,
        dtype: str = "float32",
        param_dtype: str = "float32",
    ):
        self.scale = param(rngs, jax.nn.initializers.ones, (features,), ("embed",), param_dtype)
        self.bias = param(rngs, jax.nn.initializers.zeros, (features,), ("embed",), param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when `key` is None (evaluation) or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def drop_path(x: jax.Array, rate: float | jax.Array, key: jax.Array | None) -> jax.Array:
    """Stochastic depth: drop a whole residual branch per example (x: (B, ...)); `rate` may be traced."""
    if key is None or (isinstance(rate, float) and rate == 0.0):
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    return {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # BERT, ViT: erf GELU
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2's "gelu_new"
        "relu": jax.nn.relu,
    }[name]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """softmax(q·kᵀ/√H + bias, masked) · v.

    q: (B, T, N, H); k, v: (B, S, N, H); bias: broadcastable to (B, N, T, S);
    mask: bool, broadcastable to (B, N, T, S), True = may attend.
    Uses the fused `jax.nn.dot_product_attention` unless attention dropout is
    active, which the fused kernel does not offer.
    """
    if dropout_key is None or dropout_rate == 0.0:
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.float32) / np.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(logits, axis=-1), dropout_rate, dropout_key).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)


class Attention(nnx.Module):
    """Multi-head self-attention with per-head projections (see module doc)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        d, n, h = cfg.hidden, cfg.heads, cfg.head_dim
        kw = dict(
            rngs=rngs, init=cfg.init, init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        q_bias, k_bias, v_bias = cfg.qkv_bias
        self.query = Dense(d, (n, h), ("embed", "heads", "kv"), use_bias=q_bias, **kw)
        self.key = Dense(d, (n, h), ("embed", "heads", "kv"), use_bias=k_bias, **kw)
        self.value = Dense(d, (n, h), ("embed", "heads", "kv"), use_bias=v_bias, **kw)
        self.out = Dense((n, h), d, ("heads", "kv", "embed"), **kw)
        self.dropout_rate = cfg.attention_dropout

    def __call__(
        self,
        x: jax.Array,
        *,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        names = ("batch", "length", "heads", "kv")
        q, k, v = (constrain(p(x), names) for p in (self.query, self.key, self.value))
        y = attention(q, k, v, bias=bias, mask=mask, dropout_rate=self.dropout_rate, dropout_key=dropout_key)
        return self.out(constrain(y, names))


class Mlp(nnx.Module):
    """x -> act(x·W1 + b1)·W2 + b2, hidden width F ("mlp")."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        kw = dict(
            rngs=rngs, init=cfg.init, init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        self.wi = Dense(cfg.hidden, cfg.mlp_dim, ("embed", "mlp"), **kw)
        self.wo = Dense(cfg.mlp_dim, cfg.hidden, ("mlp", "embed"), **kw)
        self.act = activation(cfg.activation)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(self.act(self.wi(x)), ("batch", "length", "mlp"))
        return self.wo(h)


class Block(nnx.Module):
    """One transformer layer, post-LN (BERT) or pre-LN (GPT-2, ViT, BEiT).

    post-LN: x = LN1(x + Attn(x));        x = LN2(x + Mlp(x))
    pre-LN:  x = x + γ1·Attn(LN1(x));     x = x + γ2·Mlp(LN2(x))
    (γ: BEiT's layer scale, else 1; dropout / drop-path on each branch.)
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        ln = dict(rngs=rngs, eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln1 = LayerNorm(cfg.hidden, **ln)
        self.mlp = Mlp(cfg, rngs=rngs)
        self.ln2 = LayerNorm(cfg.hidden, **ln)
        if cfg.layer_scale is not None:
            init = jax.nn.initializers.constant(cfg.layer_scale)
            self.gamma1 = param(rngs, init, (cfg.hidden,), ("embed",), cfg.param_dtype)
            self.gamma2 = param(rngs, init, (cfg.hidden,), ("embed",), cfg.param_dtype)
        else:
            self.gamma1 = self.gamma2 = None
        self.cfg = cfg

    def _branch(
        self, y: jax.Array, gamma: nnx.Param | None, key: jax.Array | None, drop_rate: float | jax.Array
    ) -> jax.Array:
        if gamma is not None:
            y = y * gamma[...].astype(y.dtype)
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        y = dropout(y, self.cfg.dropout, k1)
        return drop_path(y, drop_rate, k2)

    def __call__(
        self,
        x: jax.Array,
        *,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        drop_path_rate: float | jax.Array | None = None,
    ) -> jax.Array:
        k_attn, k_res1, k_res2 = jax.random.split(dropout_key, 3) if dropout_key is not None else (None,) * 3
        rate = self.cfg.drop_path if drop_path_rate is None else drop_path_rate
        attn = lambda h: self.attn(h, bias=bias, mask=mask, dropout_key=k_attn)  # noqa: E731
        if self.cfg.pre_ln:
            x = x + self._branch(attn(self.ln1(x)), self.gamma1, k_res1, rate)
            x = x + self._branch(self.mlp(self.ln2(x)), self.gamma2, k_res2, rate)
        else:
            x = self.ln1(x + self._branch(attn(x), None, k_res1, rate))
            x = self.ln2(x + self._branch(self.mlp(x), None, k_res2, rate))
        return constrain(x, ("batch", "length", "embed"))


_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Stack(nnx.Module):
    """`cfg.layers` blocks with parameters stacked on a leading "layers" axis."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=cfg.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs)

        self.blocks = make(rngs)
        self.cfg = cfg

    def drop_path_rates(self) -> jax.Array:
        """(L,) stochastic-depth rate of each layer under `cfg.drop_path_schedule`."""
        cfg = self.cfg
        if cfg.drop_path_schedule == "linear" and cfg.layers > 1:
            return jnp.linspace(0.0, cfg.drop_path, cfg.layers, dtype=jnp.float32)
        return jnp.full((cfg.layers,), cfg.drop_path, jnp.float32)

    def __call__(
        self,
        x: jax.Array,
        *,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.cfg
        graphdef, stacked = nnx.split(self.blocks)
        keys = jax.random.split(dropout_key, cfg.layers) if dropout_key is not None else None
        rates = self.drop_path_rates()

        def body(x, layer):
            state, key, rate = layer
            block = nnx.merge(graphdef, state)
            return block(x, bias=bias, mask=mask, dropout_key=key, drop_path_rate=rate), None

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat])
        if cfg.scan_layers:
            x, _ = jax.lax.scan(body, x, (stacked, keys, rates))
        else:
            for i in range(cfg.layers):
                x, _ = body(x, jax.tree.map(lambda a, i=i: a[i], (stacked, keys, rates)))
        return x
