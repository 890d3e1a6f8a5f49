"""BEiT against transformers' BeitForMaskedImageModeling, and the VQ tokenizer on real digits."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import BeitConfig as HfBeitConfig
from transformers import BeitForMaskedImageModeling
from transformers.models.beit.modeling_beit import BeitRelativePositionBias

from maskjax.interop import beit as interop
from maskjax.models import beit

B = 2


def _hf_config(**overrides) -> HfBeitConfig:
    kw = dict(
        image_size=8,
        patch_size=2,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=11,
        use_shared_relative_position_bias=True,
        use_mask_token=True,
        layer_scale_init_value=0.1,
        use_absolute_position_embeddings=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return HfBeitConfig(**(kw | overrides))


@pytest.fixture(scope="module")
def hf_model() -> BeitForMaskedImageModeling:
    torch.manual_seed(0)
    model = BeitForMaskedImageModeling(_hf_config()).eval()
    with torch.no_grad():  # HF zero-initialises [MASK], [CLS] and the bias table: make every weight matter
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(B, 8, 8, 3)).astype(np.float32)  # NHWC
    mask = np.zeros((B, 16), bool)
    masked_positions = np.stack([rng.choice(16, 6, replace=False) for _ in range(B)]).astype(np.int32)
    np.put_along_axis(mask, masked_positions, True, axis=1)
    return images, mask, masked_positions


def _hf_forward(model, images: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2)  # NHWC -> NCHW
        out = model(pixels, bool_masked_pos=torch.from_numpy(mask), output_hidden_states=True)
    return out.hidden_states[-1].numpy(), out.logits.numpy()  # last block's output (pre final LN)


def _load(cfg: beit.BeitConfig, pure: dict) -> beit.Beit:
    model = nnx.eval_shape(lambda: beit.Beit(cfg, rngs=nnx.Rngs(0)))  # shapes only: every value is replaced
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    nnx.update(model, state)
    return model


@nnx.jit
def _forward(model: beit.Beit, images, mask, masked_positions=None) -> dict:
    return model(images, mask, masked_positions=masked_positions)


def _pure(model: nnx.Module) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def converted(hf_model) -> tuple[beit.BeitConfig, beit.Beit]:
    cfg = interop.config_from_hf(hf_model.config)
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    return cfg, _load(cfg, interop.params_from_hf(sd, cfg))


def test_relative_position_index_matches_transformers():
    for grid in [(4, 4), (2, 3), (3, 5)]:
        want = BeitRelativePositionBias.generate_relative_position_index(grid).numpy()
        np.testing.assert_array_equal(beit.relative_position_index(grid), want)


def test_parity_with_transformers(hf_model, converted, inputs):
    cfg, model = converted
    images, mask, masked_positions = inputs
    want_hidden, want_logits = _hf_forward(hf_model, images, mask)
    out = _forward(model, images, mask)
    assert out["hidden"].shape == (B, 17, 16) and out["logits"].shape == (B, 16, 11)
    np.testing.assert_allclose(out["hidden"], want_hidden, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["logits"], want_logits, atol=1e-4, rtol=0)
    # Logits gathered at the masked positions are the full logits there.
    gathered = _forward(model, images, mask, masked_positions)
    assert gathered["logits"].shape == (B, 6, 11)
    np.testing.assert_allclose(
        gathered["logits"], np.take_along_axis(want_logits, masked_positions[..., None], 1), atol=1e-4, rtol=0
    )


def test_saved_checkpoint_names_convert_the_same(hf_model, tmp_path):
    # save_pretrained writes the older names (encoder.layer.{i}.attention.attention.query, ...).
    hf_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("beit.encoder.layer.0.") for k in saved)
    cfg = interop.config_from_hf(hf_model.config)
    from_saved = interop.params_from_hf(saved, cfg)
    from_state = interop.params_from_hf({k: v.numpy() for k, v in hf_model.state_dict().items()}, cfg)
    jax.tree.map(np.testing.assert_array_equal, from_saved, from_state)


def test_reverse_conversion_and_export(inputs, tmp_path):
    images, mask, _ = inputs
    cfg = interop.config_from_hf(_hf_config())
    # Random values everywhere (the bias table starts at zero) so every mapped weight is exercised.
    pure = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: beit.Beit(cfg, rngs=nnx.Rngs(0))), nnx.Param))
    rng = np.random.default_rng(2)
    pure = jax.tree.map(lambda x: (0.2 * rng.normal(size=x.shape)).astype(np.float32), pure)
    model = _load(cfg, pure)
    ours = _forward(model, images, mask)

    hf_state = interop.params_to_hf(pure, cfg)
    fresh = BeitForMaskedImageModeling(interop.hf_config(cfg)).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in hf_state.items()}, strict=True)
    for hf in [fresh]:
        hidden, logits = _hf_forward(hf, images, mask)
        np.testing.assert_allclose(hidden, ours["hidden"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(logits, ours["logits"], atol=1e-4, rtol=0)

    interop.hf_config(cfg).save_pretrained(tmp_path)
    save_file(hf_state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = BeitForMaskedImageModeling.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hidden, logits = _hf_forward(loaded.eval(), images, mask)
    np.testing.assert_allclose(hidden, ours["hidden"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, ours["logits"], atol=1e-4, rtol=0)
    # ... and the export converts back to the same parameters.
    jax.tree.map(
        np.testing.assert_allclose,
        interop.params_from_hf(load_file(tmp_path / "model.safetensors"), cfg),
        pure,
    )


@pytest.mark.parametrize("make", [beit.beit_base, beit.beit_large])
def test_param_count_equals_transformers(make):
    cfg = make()
    with torch.device("meta"):
        hf = BeitForMaskedImageModeling(interop.hf_config(cfg))
    # Nothing in BEiT pre-training is a fixed buffer: every HF parameter is trainable, as ours.
    assert beit.param_count(cfg) == sum(p.numel() for p in hf.parameters())
    assert cfg.codebook_size == 8192 and cfg.num_patches == 196


def test_scan_and_unrolled_agree(converted, inputs):
    cfg, model = converted
    images, mask, masked_positions = (jnp.asarray(x) for x in inputs)
    unrolled = _load(dataclasses.replace(cfg, scan_layers=False), _pure(model))
    for kw in [{}, {"masked_positions": masked_positions}]:
        a, b = _forward(model, images, mask, **kw), _forward(unrolled, images, mask, **kw)
        np.testing.assert_allclose(a["hidden"], b["hidden"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-6, rtol=0)


def test_jit_grad_with_dropout_and_drop_path(converted, inputs):
    cfg, model = converted
    cfg = dataclasses.replace(cfg, dropout=0.1, attention_dropout=0.1, drop_path=0.1)
    model = _load(cfg, _pure(model))
    images, mask, masked_positions = (jnp.asarray(x) for x in inputs)
    targets = jnp.asarray(np.random.default_rng(1).integers(0, cfg.codebook_size, masked_positions.shape))
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def loss_and_grad(params, key):
        def loss_fn(params):
            out = nnx.merge(graphdef, params)(
                images, mask, masked_positions=masked_positions, dropout_key=key
            )
            return optax.softmax_cross_entropy_with_integer_labels(out["logits"], targets).mean()

        return jax.value_and_grad(loss_fn)(params)

    loss, grads = loss_and_grad(params, jax.random.key(0))
    loss2, _ = loss_and_grad(params, jax.random.key(1))
    assert np.isfinite(loss) and loss != loss2  # dropout is live and keyed
    flat = jax.tree.leaves(grads)
    assert all(np.isfinite(g).all() for g in flat)
    assert np.abs(grads["mask_token"]).sum() > 0 and np.abs(grads["rel_pos_table"]).sum() > 0


def test_every_param_axis_is_named():
    cfg = beit.BeitConfig(
        image_size=8, patch_size=2, hidden=16, layers=2, heads=2, mlp_dim=32, codebook_size=11
    )
    vq = beit.VqConfig(image_size=8, patch_size=2, channels=1, hidden=16, layers=1, heads=2, mlp_dim=32)
    for make in (lambda: beit.Beit(cfg, rngs=nnx.Rngs(0)), lambda: beit.VqTokenizer(vq, rngs=nnx.Rngs(0))):
        model = nnx.eval_shape(make)
        state = nnx.state(model, nnx.Param)
        specs = nnx.get_partition_spec(state)
        for (path, spec), value in zip(
            jax.tree.leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
            jax.tree.leaves(state),
            strict=True,
        ):
            assert len(spec) == len(value.shape) and all(name is not None for name in spec), (path, spec)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="image_size"):
        beit.beit_base(image_size=230)
    with pytest.raises(ValueError, match="hidden"):
        beit.beit_base(heads=7)
    with pytest.raises(ValueError, match="use_absolute_position_embeddings"):
        interop.config_from_hf(_hf_config(use_absolute_position_embeddings=True))
    with pytest.raises(ValueError, match="use_shared_relative_position_bias"):
        interop.config_from_hf(_hf_config(use_shared_relative_position_bias=False))
    model = nnx.eval_shape(lambda: beit.Beit(interop.config_from_hf(_hf_config()), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 3, 8, 8)), jnp.zeros((1, 16), bool))


# ----------------------------------------------------------------------------- VQ tokenizer


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().images[:128, :, :, None] / 16.0).astype(np.float32)  # (256, 8, 8, 1) in [0, 1]


def _vq_cfg(**kw) -> beit.VqConfig:
    base = dict(
        image_size=8,
        patch_size=2,
        channels=1,
        codebook_size=32,
        code_dim=8,
        hidden=32,
        layers=1,
        heads=2,
        mlp_dim=64,
    )
    return beit.VqConfig(**(base | kw))


def test_vq_codes_and_straight_through_gradients(digits):
    cfg = _vq_cfg()
    graphdef, params = nnx.split(beit.VqTokenizer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    x = jnp.asarray(digits[:16])

    @jax.jit
    def forward(params):
        model = nnx.merge(graphdef, params)
        out = model(x)
        codes = model.encode(x)
        return out, codes, model.decode(codes)

    out, codes, decoded = forward(params)
    assert codes.shape == (16, 16) and codes.dtype == jnp.int32
    assert int(codes.min()) >= 0 and int(codes.max()) < cfg.codebook_size
    np.testing.assert_array_equal(codes, out["codes"])
    # The forward value of z_q is the codebook entry: decoding the codes gives the reconstruction.
    np.testing.assert_allclose(decoded, out["recon"], atol=1e-5)

    @jax.jit
    @jax.grad
    def weighted(params, w):  # w · (reconstruction MSE, codebook loss, commitment loss): one compile
        out = nnx.merge(graphdef, params)(x)
        terms = jnp.stack(
            [jnp.mean(jnp.square(out["recon"] - x)), out["codebook_loss"], out["commitment_loss"]]
        )
        return w @ terms

    grads = [weighted(params, w) for w in jnp.eye(3)]
    size = lambda term, part: sum(float(np.abs(a).sum()) for a in jax.tree.leaves(grads[term][part]))  # noqa: E731
    recon, codebook, commit = 0, 1, 2
    # Straight through the argmin: the reconstruction trains encoder and decoder, never the entries ...
    assert size(recon, "encoder") > 0 and size(recon, "decoder") > 0 and size(recon, "codebook") == 0
    # ... the codebook loss moves only the entries, the commitment loss only the encoder.
    assert size(codebook, "codebook") > 0 and size(codebook, "encoder") == 0
    assert size(commit, "encoder") > 0 and size(commit, "codebook") == 0


def test_vq_scan_and_unrolled_agree(digits):
    cfg = _vq_cfg(layers=2)
    graphdef, params = nnx.split(beit.VqTokenizer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    unrolled, _ = nnx.split(
        nnx.eval_shape(
            lambda: beit.VqTokenizer(dataclasses.replace(cfg, scan_layers=False), rngs=nnx.Rngs(0))
        ),
        nnx.Param,
    )
    x = jnp.asarray(digits[:8])
    a, b = (jax.jit(lambda p, g=g: nnx.merge(g, p)(x))(params) for g in (graphdef, unrolled))
    np.testing.assert_allclose(a["recon"], b["recon"], atol=1e-6)
    np.testing.assert_array_equal(a["codes"], b["codes"])


def test_vq_training_on_digits_reconstructs_with_many_codes(digits):
    cfg = _vq_cfg()
    graphdef, params = nnx.split(beit.VqTokenizer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)
    x = jnp.asarray(digits)

    @jax.jit
    def step(params, opt_state):
        (_, metrics), grads = jax.value_and_grad(
            lambda p: beit.vq_loss(nnx.merge(graphdef, p), x), has_aux=True
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics, grads

    history = []
    for _ in range(300):
        params, opt_state, metrics, grads = step(params, opt_state)
        history.append(jax.tree.map(float, metrics))
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    first, last = history[0], history[-1]
    # The best code-free reconstruction is the mean image; beating it by far needs informative codes.
    mean_image_mse = float(np.mean(np.square(digits - digits.mean(0))))
    assert last["recon_loss"] < 0.5 * mean_image_mse < first["recon_loss"], (first, last, mean_image_mse)
    assert last["codes_used"] >= 4, last


def test_initialisation_is_unilms_truncated_normal():
    """unilm beit/modeling_pretrain.py initialises every Linear, the patch embedding, lm_head and the
    cls/mask tokens with timm's trunc_normal_(std=0.02, a=-0.02, b=0.02) (torch's trunc_normal_): each
    parameter must be a sample of that distribution (Kolmogorov-Smirnov against torch's own draws)."""
    from scipy import stats

    cfg = beit.BeitConfig(
        hidden=64, layers=2, heads=4, mlp_dim=128, image_size=32, patch_size=4, codebook_size=512
    )
    model = beit.Beit(cfg, rngs=nnx.Rngs(0))
    torch.manual_seed(0)
    reference = torch.nn.init.trunc_normal_(torch.empty(200_000), std=0.02, a=-0.02, b=0.02).numpy()
    first_layer = lambda k: np.asarray(k[...])[0]  # noqa: E731  (layer 1: fix_init_weight divides by sqrt(2))
    draws = {
        "patch_embed": np.asarray(model.patch_embed.kernel[...]),
        "head": np.asarray(model.head.kernel[...]),
        "tokens": np.concatenate([np.asarray(model.cls_token[...]), np.asarray(model.mask_token[...])]),
        "qkv": np.concatenate(
            [
                np.asarray(getattr(model.stack.blocks.attn, n).kernel[...]).ravel()
                for n in ("query", "key", "value")
            ]
        ),
        "mlp_in": np.asarray(model.stack.blocks.mlp.wi.kernel[...]),
        "attn_out_layer1": first_layer(model.stack.blocks.attn.out.kernel) * np.sqrt(2.0),
    }
    for name, values in draws.items():
        values = values.ravel()
        assert np.abs(values).max() <= 0.02 + 1e-7, name
        assert stats.ks_2samp(values, reference).pvalue > 1e-3, name
    assert np.std(reference) == pytest.approx(0.0108, abs=2e-4)  # not the 0.02 the name suggests
    assert np.all(np.asarray(model.rel_pos_table[...]) == 0)  # RelativePositionBias starts at zeros
