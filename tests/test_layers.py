"""Shared layers and the logical-axis sharding rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskjax import sharding
from maskjax.models import layers


def _stack(**kw) -> layers.Stack:
    cfg = layers.TransformerConfig(
        hidden=16, layers=3, heads=2, mlp_dim=32, pre_ln=True, dropout=0.0, attention_dropout=0.0, **kw
    )
    return layers.Stack(cfg, rngs=nnx.Rngs(0))


def test_drop_path_rates_grow_linearly_with_depth():
    stack = _stack(drop_path=0.6)
    np.testing.assert_allclose(stack.drop_path_rates(), [0.0, 0.3, 0.6], atol=1e-7)
    np.testing.assert_allclose(
        _stack(drop_path=0.6, drop_path_schedule="uniform").drop_path_rates(), [0.6] * 3
    )
    # A pre-LN block whose two branches are both dropped returns its input: that happens with
    # probability rate² per example, independently per branch (Huang et al. 2016, stochastic depth).
    x = jax.random.normal(jax.random.key(0), (4000, 2, 16))
    graphdef, stacked = nnx.split(stack.blocks)
    for i, rate in enumerate([0.0, 0.3, 0.6]):
        block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
        y = block(x, dropout_key=jax.random.key(i), drop_path_rate=jnp.float32(rate))
        identity = float(np.mean(np.asarray(jnp.abs(y - x).max(axis=(1, 2))) == 0.0))
        assert abs(identity - rate**2) < 0.03, (rate, identity)


def test_scan_and_unrolled_stacks_agree_with_remat():
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    scanned = _stack()
    unrolled = nnx.merge(*nnx.split(scanned))
    unrolled.cfg = layers.TransformerConfig(**{**scanned.cfg.__dict__, "scan_layers": False, "remat": "full"})
    np.testing.assert_allclose(scanned(x), unrolled(x), atol=1e-6)


def test_logical_to_spec_uses_each_mesh_axis_once():
    rules = sharding.DEFAULT_RULES
    assert sharding.logical_to_spec(("batch", "length", "embed"), rules) == jax.sharding.PartitionSpec(
        ("data", "fsdp"), None, None
    )
    assert sharding.logical_to_spec(("embed", "embed"), rules) == jax.sharding.PartitionSpec("fsdp", None)
    assert sharding.logical_to_spec(("layers", "embed", "heads", "kv"), rules) == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor", None
    )


def test_mesh_sizes_resolve_and_refuse_clearly():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="needs 6 devices but 8"):
        sharding.mesh_shape({"data": 3, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_constrain_shards_activations_only_under_rules():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    f = jax.jit(lambda x: sharding.constrain(x * 2, ("batch", "embed")))
    x = jnp.ones((8, 4))
    assert f(x).sharding.is_fully_replicated
    with sharding.use_rules(mesh, sharding.DEFAULT_RULES):
        y = jax.jit(lambda x: sharding.constrain(x * 2, ("batch", "embed")))(x)
    expected = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None))
    assert y.sharding.is_equivalent_to(expected, 2) and not y.sharding.is_fully_replicated
