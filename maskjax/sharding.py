"""Logical axis names -> mesh axes.

Models name every parameter and activation axis ("batch", "length", "embed",
"heads", "kv", "mlp", "vocab", "layers", ...). A config maps those names to the
axes of a device mesh (e.g. "data", "fsdp", "tensor"), so data parallel, FSDP
and tensor parallel differ only in the rules, never in model code.

`constrain(x, names)` is a no-op outside `use_rules(...)`, so models run
unchanged on one device, in tests, and under `jax.eval_shape`.

The training state's shardings are decided here too: each parameter from its
logical names (`param_shardings`), each optimizer leaf from the parameter it
mirrors (`opt_shardings`), everything else replicated.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

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


# Data parallel over ("data", "fsdp"); parameters sharded over "fsdp" along
# their embedding axis (ZeRO-3 style) and over "tensor" along heads / MLP /
# vocabulary (Megatron style). With fsdp = tensor = 1 this is pure data parallel.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "kv": None,
    "length": None,
    "layers": None,
}


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolve a config's {axis: size} where one size may be -1 ("the rest")."""
    sizes = dict(axes)
    rest = [name for name, size in sizes.items() if size == -1]
    bad = [name for name, size in sizes.items() if size != -1 and (not isinstance(size, int) or size < 1)]
    if bad or len(rest) > 1:
        raise ValueError(f"mesh: sizes must be positive integers with at most one -1; got {dict(axes)}")
    known = 1
    for size in sizes.values():
        known *= size if size != -1 else 1
    if rest:
        if num_devices % known:
            raise ValueError(
                f"mesh: {dict(axes)} cannot cover {num_devices} devices ({num_devices} % {known} != 0)"
            )
        sizes[rest[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(f"mesh: {dict(axes)} needs {known} devices but {num_devices} are available")
    return sizes


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A device mesh from the config; Auto axis types so GSPMD propagates shardings."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(axes, len(devices))
    return jax.make_mesh(
        tuple(sizes.values()),
        tuple(sizes),
        axis_types=(jax.sharding.AxisType.Auto,) * len(sizes),
        devices=devices,
    )


def path_names(path: Sequence[Any]) -> list[str]:
    """A jax tree path as plain names: dict keys, attribute names, indices."""
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def param_shardings(abstract_params: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedSharding of every parameter (nnx Variables carrying `out_sharding` logical names)."""
    from flax import nnx

    return jax.tree.map(
        lambda v: v.replace(
            NamedSharding(mesh, logical_to_spec(v.get_metadata().get("out_sharding") or (), rules))
        ),
        abstract_params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def opt_shardings(abstract_opt: Any, param_sharding: Any, mesh: Mesh) -> Any:
    """Optimizer leaves mirroring a parameter (Adam's mu, nu) take its sharding; the rest replicate.

    `jax.jit(tx.init)` alone would not (JAX-NOTES): match each leaf's path suffix to a parameter path.
    """
    by_path = {tuple(path_names(p)): s for p, s in jax.tree_util.tree_flatten_with_path(param_sharding)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        names = tuple(path_names(path))
        for start in range(len(names)):
            found = by_path.get(names[start:])
            if found is not None and len(found.spec) <= leaf.ndim:
                return found
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)
