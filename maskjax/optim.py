"""Optimizers and learning-rate schedules as the papers used them (optax).

  BERT, RoBERTa   AdamW, linear warmup then linear decay to 0; LAMB for large batches
  MAE, BEiT, GPT  AdamW, linear warmup then cosine decay
  MAE's rule      lr = base_lr × global_batch / 256 (He et al. 2022, Table 8)

Weight decay skips the parameters a config names in `optimizer.no_decay`
(substrings of a parameter's path, e.g. "bias", "scale" for LayerNorm,
"cls_token"): each paper excluded a slightly different set, so the set is part
of the paper's config. Layer-wise learning-rate decay (BEiT fine-tuning) scales
the update of layer i of L by decay^(L + 1 − i). `optimizer.bias_correction=False`
is the Adam of BERT's release, whose moments are used without Adam's bias
correction (`scale_by_adam_uncorrected`). LARS (You et al. 2017) is MAE's linear-probe
optimizer (Table 10): SGD with momentum whose step for each weight matrix is scaled by
trust_coefficient·‖w‖/‖g‖; vectors (biases) take plain momentum SGD, as MAE's util/lars.py does.

A method may give each parameter a role (`Method.roles`): "train" (the optimizer above), "frozen"
(no update, no optimizer state: a probed encoder) or "running_stat" (the update is −gradient, which
the method's loss shapes into an exponential moving average, see methods/classify.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from maskjax.sharding import path_names


def peak_learning_rate(opt: Mapping[str, Any], global_batch: int) -> float:
    """`base_lr × global_batch / 256` when the config gives `base_lr` (MAE, BEiT), else `peak_lr`."""
    if opt.get("base_lr"):
        return float(opt["base_lr"]) * global_batch / 256
    return float(opt["peak_lr"])


def schedule(
    peak: float, total_steps: int, warmup_steps: int, decay: str, end_lr: float = 0.0
) -> optax.Schedule:
    """Linear warmup from 0 to `peak`, then `decay` ("linear", "cosine" or "constant") to `end_lr`."""
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    rest = max(total_steps - warmup_steps, 1)
    if decay == "linear":
        after = optax.linear_schedule(peak, end_lr, rest)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=end_lr / peak if peak else 0.0)
    elif decay == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"schedule.decay must be one of linear, cosine, constant; got {decay!r}")
    return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params: Any, no_decay: Sequence[str]) -> Any:
    """True where weight decay applies: no component of the path contains a `no_decay` pattern."""

    def applies(path, _):
        return not any(pattern in name for name in path_names(path) for pattern in no_decay)

    return jax.tree_util.tree_map_with_path(applies, params)


def layerwise_scales(params: Any, decay: float, num_layers: int, embed_patterns: Sequence[str]) -> Any:
    """Per-leaf update scale for layer-wise lr decay.

    Leaves stacked under "blocks" (leading axis = layer) get layer ids 1..L,
    leaves matching `embed_patterns` id 0, everything else (heads, final norm)
    id L + 1; the scale is decay^(L + 1 − id).
    """

    def scale(path, leaf):
        names = path_names(path)
        if "blocks" in names:
            ids = jnp.arange(1, num_layers + 1, dtype=jnp.float32)
            return (decay ** (num_layers + 1 - ids)).reshape((num_layers,) + (1,) * (leaf.ndim - 1))
        if any(p in n for n in names for p in embed_patterns):
            return jnp.float32(decay ** (num_layers + 1))
        return jnp.float32(1.0)

    return jax.tree_util.tree_map_with_path(scale, params)


def _scale_by_tree(scales: Any) -> optax.GradientTransformation:
    return optax.GradientTransformation(
        lambda _: optax.EmptyState(),
        lambda updates, state, params=None: (jax.tree.map(jnp.multiply, updates, scales), state),
    )


def scale_by_adam_uncorrected(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's moment estimates without the bias correction, as BERT's released optimizer does
    (google-research/bert `optimization.py`, AdamWeightDecayOptimizer):

        m ← b1·m + (1 − b1)·g,   v ← b2·v + (1 − b2)·g²,   update = m / (√v + eps)

    Early updates are therefore larger than Adam's, by (1 − b1^t) / √(1 − b2^t): 3.2× at t = 1 with
    BERT's betas, 1.26× at t = 1,000; BERT's 10,000 warm-up steps keep them small. The state is
    optax's ScaleByAdamState, so it shards and checkpoints like Adam's.
    """

    def init(params: Any) -> optax.ScaleByAdamState:
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

    def update(updates: Any, state: optax.ScaleByAdamState, params: Any = None) -> tuple:
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
        return out, optax.ScaleByAdamState(count=optax.safe_int32_increment(state.count), mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


ROLES = ("train", "frozen", "running_stat")


def make_optimizer(
    opt: Mapping[str, Any], lr: optax.Schedule, params: Any, num_layers: int = 0, roles: Any = None
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW, LAMB or LARS with the decay mask, then layer-wise scaling;
    with `roles` (a tree of ROLES like `params`), only the "train" parameters see that chain."""
    if roles is None:
        return _optimizer(opt, lr, params, num_layers)
    bad = sorted({r for r in jax.tree.leaves(roles) if r not in ROLES})
    if bad:
        raise ValueError(f"parameter roles must be among {list(ROLES)}; got {bad}")
    return _by_role(roles, _optimizer(opt, lr, _select(params, roles), num_layers))


def _select(tree: dict, roles: dict) -> dict:
    """The "train" leaves of a nested dict `tree`, with their paths (groups without one are dropped)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            inner = _select(value, roles[key])
            if inner:
                out[key] = inner
        elif roles[key] == "train":
            out[key] = value
    return out


def _by_role(roles: dict, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` on the trained parameters alone (its state holds nothing for the others); frozen ones get
    a zero update, running statistics −gradient. (optax.multi_transform cannot take `inner`'s own masks.)"""

    def init(params: dict) -> Any:
        return inner.init(_select(params, roles))

    def update(grads: dict, state: Any, params: dict | None = None) -> tuple[dict, Any]:
        trained = None if params is None else _select(params, roles)
        new, state = inner.update(_select(grads, roles), state, trained)

        def merge(g: dict, r: dict, n: dict) -> dict:
            out = {}
            for key, value in g.items():
                if isinstance(value, dict):
                    out[key] = merge(value, r[key], n.get(key, {}))
                elif r[key] == "train":
                    out[key] = n[key]
                else:
                    out[key] = jnp.zeros_like(value) if r[key] == "frozen" else -value
            return out

        return merge(grads, roles, new), state

    return optax.GradientTransformation(init, update)


def _optimizer(opt: Mapping[str, Any], lr: optax.Schedule, params: Any, num_layers: int) -> Any:
    mask = decay_mask(params, tuple(opt.get("no_decay", ("bias", "scale"))))
    common = dict(b1=opt["b1"], b2=opt["b2"], eps=opt["eps"], weight_decay=opt["weight_decay"], mask=mask)
    name = opt["name"]
    if name == "adamw" and not opt.get("bias_correction", True):
        core = optax.chain(
            scale_by_adam_uncorrected(opt["b1"], opt["b2"], opt["eps"]),
            optax.add_decayed_weights(opt["weight_decay"], mask),
            optax.scale_by_learning_rate(lr),
        )
    elif name == "adamw":
        core = optax.adamw(lr, **common)
    elif name == "lamb":
        core = optax.lamb(lr, **common)
    elif name == "lars":  # momentum = b1; b2 and eps are unused (MAE: LARS(lr, weight_decay=0))
        matrices = jax.tree.map(lambda p: p is not None and p.ndim > 1, params)
        core = optax.lars(
            lr,
            weight_decay=opt["weight_decay"],
            weight_decay_mask=matrices,
            trust_coefficient=0.001,
            trust_ratio_mask=matrices,
            momentum=opt["b1"],
        )
    else:
        raise ValueError(f"optimizer.name must be one of adamw, lamb, lars; got {name!r}")
    parts = []
    if opt.get("grad_clip"):
        parts.append(optax.clip_by_global_norm(opt["grad_clip"]))
    parts.append(core)
    if opt.get("layer_decay") and opt["layer_decay"] != 1.0:
        scales = layerwise_scales(params, opt["layer_decay"], num_layers, opt.get("layer_decay_embed", ()))
        parts.append(_scale_by_tree(scales))
    return optax.chain(*parts)
