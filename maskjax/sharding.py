"""Logical axis names -> mesh axes.

Models name every parameter and activation axis ("batch", "length", "embed",
"heads", "kv", "mlp", "vocab", "layers", ...). A config maps those names to the
axes of a device mesh (e.g. "data", "fsdp", "tensor"), so data parallel, FSDP
and tensor parallel differ only in the rules, never in model code.

`constrain(x, names)` is a no-op outside `use_rules(...)`, so models run
unchanged on one device, in tests, and under `jax.eval_shape`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# A rule maps one logical name to a mesh axis, a tuple of mesh axes, or None.
Rules = Mapping[str, str | Sequence[str] | None]

_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "maskjax_sharding_rules", default=None
)


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """("batch", "length", "embed") -> P(("data", "fsdp"), None, None) under `rules`.

    A mesh axis is used at most once per array: when two logical names map to
    the same mesh axis, the later one stays unsharded (as in flax's rules).
    """
    used: set[str] = set()
    spec = []
    for name in names:
        target = rules.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Within this context (at trace time), `constrain` shards activations."""
    token = _CONTEXT.set((mesh, rules))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Shard activation `x` by its logical axis names, if rules are active."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))
