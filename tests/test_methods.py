"""The method interface: every registered method satisfies it, a broken record is refused, and the
MLM ablation strategies (uniform random tokens, one contiguous run) train through the same loss."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from maskjax import evaluators, methods, models
from maskjax.methods import bert as bert_method


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_every_registered_method_is_complete(name):
    method = methods.get(name)
    assert method.name == name and method.model in models.FAMILIES
    for evaluator in method.evaluators:
        assert callable(evaluators.get(evaluator))


def _broken(**changes) -> methods.Method:
    return dataclasses.replace(methods.get("gpt"), **changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model": "electra"}, "model must be one of"),
        ({"loss": lambda batch, model, key, config, *, train, extras: None}, "loss must be"),
        ({"loss": lambda model, batch, key, config: None}, "loss must be"),
        ({"flops": lambda config: 0}, "flops must take 2"),
        ({"extras": lambda config: {}}, "extras and extras_spec"),
        ({"evaluators": ("fid",)}, "evaluator 'fid'"),
    ],
)
def test_a_broken_method_is_refused_when_registered(changes, message):
    with pytest.raises(TypeError, match=message):
        methods.check(_broken(**changes))


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(ValueError, match="family must be one of .*'mae'"):
        methods.get("electra")


def _mlm_config(strategy: str, seq: int = 40) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = {"seq_length": seq}
    c.masking = dict(
        strategy=strategy, mask_prob=0.15, max_predictions=6, mask_id=4, pad_id=0, special_ids=(2, 3)
    )
    return c


def _batch(seq: int = 40, batch: int = 8) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 100, size=(batch, seq)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    ids[1, 30:] = 0  # a padded row
    ids[1, 29] = 3
    return {"input_ids": jnp.asarray(ids), "word_starts": jnp.ones(ids.shape, bool)}


@pytest.mark.parametrize("strategy", ["random", "contiguous"])
def test_ablation_strategies_mask_a_fixed_count_of_real_tokens(strategy):
    config = _mlm_config(strategy)
    batch = _batch()
    ids = np.asarray(batch["input_ids"])
    m = jax.jit(lambda k, b: bert_method.mask(k, b, 100, config.masking))(jax.random.key(1), batch)
    p = bert_method.num_predictions(config.masking, 40)
    assert p == round(0.15 * 40) == 6 and m.positions.shape == (8, p)
    inputs, positions, weights = (np.asarray(x) for x in (m.inputs, m.positions, m.weights))
    for row in range(8):
        used = positions[row][weights[row] > 0]
        assert len(used) == p  # every row has >= 6 real, non-special tokens
        assert np.all(inputs[row, used] == 4)  # all [MASK]: no 80/10/10 in the ablations
        assert not np.isin(ids[row, used], (0, 2, 3)).any()  # never padding or [CLS]/[SEP]
        changed = np.flatnonzero(inputs[row] != ids[row])
        assert set(changed) <= set(used)
        if strategy == "contiguous":
            assert np.all(np.diff(np.sort(used)) == 1)
    # a fresh key gives another choice
    other = bert_method.mask(jax.random.key(2), batch, 100, config.masking)
    assert not np.array_equal(np.asarray(other.positions), positions)


def test_strategy_is_validated_with_the_allowed_values():
    from maskjax.errors import ConfigError

    config = _mlm_config("uniform")
    with pytest.raises(ConfigError, match=r"masking.strategy must be one of \['bert', .*'contiguous'\]"):
        bert_method.validate(config, None)
    config = _mlm_config("bert")
    config.masking.max_predictions = 41
    with pytest.raises(ConfigError, match=r"max_predictions must be in \[1, data.seq_length=40\]"):
        bert_method.validate(config, None)


@pytest.mark.parametrize("strategy", ["random", "contiguous"])
def test_ablation_strategies_train_with_the_masked_token_accuracy(strategy):
    """The loss the train loop jits, on a small BERT: gradients flow and the accuracy is reported."""
    from flax import nnx

    config = _mlm_config(strategy)
    cfg = models.make_config(
        "bert", dict(vocab_size=100, max_length=40, hidden=32, layers=1, heads=2, mlp_dim=64, nsp=False)
    )
    graphdef, params = nnx.split(models.build("bert", cfg), nnx.Param)
    batch = _batch() | {"attention_mask": jnp.ones((8, 40), jnp.int32)}

    def loss(p):
        return bert_method.loss(nnx.merge(graphdef, p), batch, jax.random.key(0), config, train=True)

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert np.isfinite(float(value)) and 0.0 <= float(metrics["mlm_accuracy"]) <= 1.0
    assert float(metrics["mlm_loss"]) == pytest.approx(float(value))
    assert float(optax.tree.norm(grads)) > 0
