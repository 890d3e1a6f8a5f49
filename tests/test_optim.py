"""Schedules, weight-decay masks, LAMB and layer-wise decay, checked against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maskjax import optim

OPT = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, grad_clip=None)


def test_mae_learning_rate_rule():
    # He et al. 2022, Table 8: lr = base_lr × batch / 256, base_lr 1.5e-4 at batch 4096.
    assert optim.peak_learning_rate({"base_lr": 1.5e-4}, 4096) == pytest.approx(2.4e-3)
    assert optim.peak_learning_rate({"peak_lr": 1e-4}, 256) == 1e-4


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_warmup_then_decay(decay):
    lr = optim.schedule(1.0, total_steps=100, warmup_steps=10, decay=decay, end_lr=0.0)
    values = np.array([float(lr(s)) for s in range(101)])
    np.testing.assert_allclose(values[:11], np.linspace(0, 1, 11), atol=1e-6)  # linear warmup to the peak
    assert np.all(np.diff(values[10:]) <= 1e-7) and values[100] == pytest.approx(0.0, abs=1e-6)
    halfway = values[55]
    expected = 0.5 if decay == "linear" else 0.5 * (1 + np.cos(np.pi * 0.5))
    assert halfway == pytest.approx(expected, abs=1e-5)


def test_unknown_decay_names_the_field():
    with pytest.raises(ValueError, match="schedule.decay"):
        optim.schedule(1.0, 10, 1, "step")


def _params():
    return {
        "blocks": {
            "mlp": {"kernel": jnp.ones((3, 4, 4)), "bias": jnp.ones((3, 4))},
            "ln1": {"scale": jnp.ones((3, 4))},
        },
        "cls_token": jnp.ones((4,)),
        "embed": {"embedding": jnp.ones((10, 4))},
        "head": {"kernel": jnp.ones((4, 2))},
    }


def test_weight_decay_skips_the_named_parameters():
    params = _params()
    tx = optim.make_optimizer(
        dict(OPT, no_decay=("bias", "scale", "cls_token")), optax.constant_schedule(1.0), params
    )
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # With zero gradients, AdamW's update is −lr·wd·param where decay applies and 0 elsewhere.
    assert float(jnp.abs(updates["blocks"]["mlp"]["bias"]).max()) == 0.0
    assert float(jnp.abs(updates["blocks"]["ln1"]["scale"]).max()) == 0.0
    assert float(jnp.abs(updates["cls_token"]).max()) == 0.0
    np.testing.assert_allclose(updates["blocks"]["mlp"]["kernel"], -0.1)
    np.testing.assert_allclose(updates["embed"]["embedding"], -0.1)


def test_lamb_matches_optax_reference_with_same_mask():
    params = _params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    opt = dict(OPT, name="lamb", no_decay=("bias",))
    tx = optim.make_optimizer(opt, optax.constant_schedule(0.01), params)
    ref = optax.lamb(
        0.01, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, mask=optim.decay_mask(params, ("bias",))
    )
    got, _ = tx.update(grads, tx.init(params), params)
    want, _ = ref.update(grads, ref.init(params), params)
    jax.tree.map(np.testing.assert_allclose, got, want)


def test_gradient_clipping_by_global_norm():
    params = _params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0), params)
    small = jax.tree.map(lambda p: jnp.full_like(p, 0.001), params)
    opt = dict(OPT, grad_clip=1.0, weight_decay=0.0)
    tx = optim.make_optimizer(opt, optax.constant_schedule(1.0), params)
    # Reference: clip to global norm 1 by hand, then plain Adam (Adam's 2nd step shows the gradient scale).
    adam = optax.adam(1.0, b1=0.9, b2=0.999, eps=1e-8)
    clip = lambda g: jax.tree.map(lambda x: x * jnp.minimum(1.0, 1.0 / optax.tree.norm(g)), g)
    s, r = tx.init(params), adam.init(params)
    for g in (grads, small):
        got, s = tx.update(g, s, params)
        want, r = adam.update(clip(g), r, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), got, want)


def test_layerwise_decay_scales_each_layer():
    params = _params()
    scales = optim.layerwise_scales(params, decay=0.5, num_layers=3, embed_patterns=("embed", "cls_token"))
    # BEiT fine-tuning: layer i of L gets decay^(L + 1 − i); embeddings i = 0; the head i = L + 1.
    np.testing.assert_allclose(scales["blocks"]["mlp"]["kernel"].ravel(), [0.125, 0.25, 0.5])
    assert float(scales["embed"]["embedding"]) == 0.0625 and float(scales["cls_token"]) == 0.0625
    assert float(scales["head"]["kernel"]) == 1.0
    opt = dict(OPT, weight_decay=0.0, layer_decay=0.5, layer_decay_embed=("embed", "cls_token"))
    tx = optim.make_optimizer(opt, optax.constant_schedule(1.0), params, num_layers=3)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    per_layer = np.asarray(updates["blocks"]["mlp"]["kernel"])[:, 0, 0]
    np.testing.assert_allclose(per_layer / per_layer[-1], [0.25, 0.5, 1.0], rtol=1e-6)


def test_unknown_optimizer_names_the_field():
    with pytest.raises(ValueError, match="optimizer.name"):
        optim.make_optimizer(dict(OPT, name="sgd"), optax.constant_schedule(1.0), _params())


def _bert_release_adam(params, grads_per_step, lrs, *, b1, b2, eps, wd, decays):
    """google-research/bert optimization.py, AdamWeightDecayOptimizer.apply_gradients, in numpy:
    m, v are raw moving averages (no bias correction); decay is added to the update before the lr."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for grads, lr in zip(grads_per_step, lrs, strict=True):
        for k in p:
            g = np.asarray(grads[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            update = m[k] / (np.sqrt(v[k]) + eps)
            if decays[k]:
                update = update + wd * p[k]
            p[k] = p[k] - lr * update
    return p


def test_adam_without_bias_correction_is_berts_release():
    rng = np.random.default_rng(0)
    params = {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "bias": jnp.zeros(3)}
    grads = [
        {k: jnp.asarray(rng.normal(size=x.shape), jnp.float32) for k, x in params.items()} for _ in range(5)
    ]
    lr = optim.schedule(1e-2, total_steps=5, warmup_steps=2, decay="linear")
    opt = dict(OPT, eps=1e-6, weight_decay=0.01, no_decay=("bias",), bias_correction=False)
    tx = optim.make_optimizer(opt, lr, params)
    state, p = tx.init(params), params
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
    want = _bert_release_adam(
        params, grads, [float(lr(s)) for s in range(5)], b1=0.9, b2=0.999, eps=1e-6, wd=0.01,
        decays={"kernel": True, "bias": False},
    )  # fmt: skip
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-5, atol=1e-7)
    # The option matters: at step 1 the release's update is (1 - b1) / sqrt(1 - b2) = 3.16x Adam's.
    constant = lambda _: 1e-2  # noqa: E731
    corrected = optim.make_optimizer(dict(opt, bias_correction=True), constant, params)
    bert = optim.make_optimizer(opt, constant, params)
    u_corr, _ = corrected.update(grads[0], corrected.init(params), params)
    u_bert, _ = bert.update(grads[0], bert.init(params), params)
    np.testing.assert_allclose(np.asarray(u_bert["bias"] / u_corr["bias"]), 0.1 / np.sqrt(0.001), rtol=1e-3)
