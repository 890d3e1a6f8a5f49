"""ViT / MAE against transformers' ViTMAEForPreTraining and ViTForImageClassification (PyTorch).

HF models are built from small random configs; the same noise is fed to both
sides so that the random masks agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file

from maskjax import losses, masking
from maskjax.interop import mae as mae_interop
from maskjax.models import vit

TOL = 1e-4
BATCH, IMAGE, PATCH, CHANNELS = 3, 32, 8, 3
N = (IMAGE // PATCH) ** 2


def _hf_config(**overrides) -> transformers.ViTMAEConfig:
    kw = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,  # not 4·d: widths must come from the config
        image_size=IMAGE,
        patch_size=PATCH,
        num_channels=CHANNELS,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=40,
        layer_norm_eps=1e-6,
        mask_ratio=0.75,
        attn_implementation="eager",
    )
    return transformers.ViTMAEConfig(**(kw | overrides))


def _set_sincos_tables(model: transformers.ViTMAEForPreTraining) -> None:
    """Fill HF's frozen position tables with HF's own sin-cos code (a fresh model holds zeros)."""
    for p in model.parameters():
        p._is_hf_initialized = False
    model.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False
    model.vit.embeddings.initialize_weights()
    model.decoder.initialize_weights(model.vit.embeddings.patch_embeddings.num_patches)


def _randomize(model: torch.nn.Module) -> None:
    """Every trainable parameter away from its init value (LayerNorms, biases, [CLS], mask token too)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))


@pytest.fixture(scope="module")
def hf_model() -> transformers.ViTMAEForPreTraining:
    torch.manual_seed(0)
    model = transformers.ViTMAEForPreTraining(_hf_config()).eval()
    _set_sincos_tables(model)
    _randomize(model)
    return model


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _build(model_cls: type, cfg, pure: dict) -> nnx.Module:
    """A model holding `pure` (every parameter given), without paying for a random initialisation."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    return nnx.merge(graphdef, state)


# one compiled forward shared by the tests (same config and shapes -> no recompilation)
_forward = jax.jit(lambda model, images, ids_keep, ids_restore: model(images, ids_keep, ids_restore))


@pytest.fixture(scope="module")
def converted(hf_model):
    cfg = mae_interop.config_from_hf(hf_model.config)
    return cfg, mae_interop.params_from_hf(_state(hf_model), cfg)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(BATCH, IMAGE, IMAGE, CHANNELS)).astype(np.float32)
    noise = rng.random((BATCH, N)).astype(np.float32)
    return images, noise


def _hf_forward(model, images: np.ndarray, noise: np.ndarray) -> dict[str, np.ndarray]:
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)  # NHWC -> NCHW
    with torch.no_grad():
        out = model(pixels, noise=torch.from_numpy(noise))
        latent = model.vit(pixels, noise=torch.from_numpy(noise)).last_hidden_state
    return {
        "latent": latent.numpy(),
        "pred": out.logits.numpy(),
        "mask": out.mask.numpy(),
        "ids_restore": out.ids_restore.numpy(),
        "loss": float(out.loss),
    }


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_patchify_matches_hf_and_unpatchify_inverts(hf_model, inputs):
    images, _ = inputs
    patches = vit.patchify(jnp.asarray(images), PATCH)
    with torch.no_grad():
        expected = hf_model.patchify(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert patches.shape == (BATCH, N, PATCH * PATCH * CHANNELS)
    np.testing.assert_array_equal(np.asarray(patches), expected)
    np.testing.assert_array_equal(np.asarray(vit.unpatchify(patches, PATCH)), images)
    wide = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 24, 2)), jnp.float32)
    np.testing.assert_array_equal(vit.unpatchify(vit.patchify(wide, 8), 8, grid=(2, 3)), wide)


def test_sincos_tables_match_hf(hf_model):
    # HF's tables were filled by its own port of the MAE reference's get_2d_sincos_pos_embed.
    enc = hf_model.vit.embeddings.position_embeddings[0].detach().numpy()
    dec = hf_model.decoder.decoder_pos_embed[0].detach().numpy()
    assert not np.all(enc == 0)
    np.testing.assert_allclose(vit.sincos_pos_embed_2d(32, IMAGE // PATCH), enc, atol=1e-6)
    np.testing.assert_allclose(vit.sincos_pos_embed_2d(16, IMAGE // PATCH), dec, atol=1e-6)


def test_config_from_hf(hf_model, converted):
    cfg, _ = converted
    assert (cfg.hidden, cfg.layers, cfg.heads, cfg.mlp_dim) == (32, 2, 4, 48)
    assert (cfg.decoder_hidden, cfg.decoder_layers, cfg.decoder_heads, cfg.decoder_mlp_dim) == (16, 2, 2, 40)
    assert (cfg.image_size, cfg.patch_size, cfg.channels) == (IMAGE, PATCH, CHANNELS)
    assert (cfg.layer_norm_eps, cfg.activation, cfg.pre_ln) == (1e-6, "gelu", True)
    back = mae_interop.hf_config(cfg)
    assert back.architectures == ["ViTMAEForPreTraining"]
    assert mae_interop.config_from_hf(back) == cfg


def test_parity_with_transformers(hf_model, converted, inputs):
    cfg, params = converted
    images, noise = inputs
    expected = _hf_forward(hf_model, images, noise)
    ids_keep, mask, ids_restore = masking.mae_mask_from_noise(jnp.asarray(noise), hf_model.config.mask_ratio)
    np.testing.assert_array_equal(np.asarray(ids_restore), expected["ids_restore"])
    np.testing.assert_array_equal(np.asarray(mask), expected["mask"])

    out = _forward(_build(vit.Mae, cfg, params), jnp.asarray(images), ids_keep, ids_restore)
    # the encoder saw only [CLS] + the K kept patches
    assert out["latent"].shape == (BATCH, 1 + N // 4, cfg.hidden)
    assert _max_diff(out["latent"], expected["latent"]) < TOL
    assert out["pred"].shape == (BATCH, N, PATCH * PATCH * CHANNELS)
    assert _max_diff(out["pred"], expected["pred"]) < TOL

    target = vit.patchify(jnp.asarray(images), PATCH)
    for norm_pix in (False, True):
        hf_model.config.norm_pix_loss = norm_pix
        try:
            hf_loss = _hf_forward(hf_model, images, noise)["loss"]
        finally:
            hf_model.config.norm_pix_loss = False
        ours = losses.mae_loss(out["pred"], target, mask, norm_pix=norm_pix)
        np.testing.assert_allclose(float(ours), hf_loss, rtol=1e-5, atol=1e-6)


def test_params_to_hf_inverts_and_export_loads(hf_model, converted, inputs, tmp_path):
    cfg, params = converted
    images, noise = inputs
    expected = _hf_forward(hf_model, images, noise)
    state = mae_interop.params_to_hf(params, cfg)
    original = _state(hf_model)
    assert set(state) == set(original)
    for key, value in original.items():
        np.testing.assert_allclose(state[key], value, atol=1e-6, err_msg=key)

    fresh = transformers.ViTMAEForPreTraining(mae_interop.hf_config(cfg)).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    assert _max_diff(_hf_forward(fresh, images, noise)["pred"], expected["pred"]) < TOL

    mae_interop.hf_config(cfg).save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = transformers.AutoModelForPreTraining.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert type(loaded).__name__ == "ViTMAEForPreTraining"
    got = _hf_forward(loaded, images, noise)
    assert _max_diff(got["latent"], expected["latent"]) < TOL
    assert _max_diff(got["pred"], expected["pred"]) < TOL


def _legacy_name(key: str) -> str:
    """transformers < 5 names (as in facebook/vit-mae-base's files)."""
    key = key.replace("vit.layers.", "vit.encoder.layer.")
    for new, old in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        key = key.replace(f"attention.{new}.", f"attention.attention.{old}.")
    key = key.replace("attention.o_proj.", "attention.output.dense.")
    return key.replace("mlp.fc1.", "intermediate.dense.").replace("mlp.fc2.", "output.dense.")


def test_legacy_checkpoint_names(hf_model, converted, tmp_path):
    cfg, params = converted
    legacy = {_legacy_name(k): v for k, v in _state(hf_model).items()}
    assert "vit.encoder.layer.0.attention.attention.query.weight" in legacy
    assert "decoder.decoder_layers.1.output.dense.bias" in legacy
    got = mae_interop.params_from_hf(legacy, cfg)
    jax.tree.map(np.testing.assert_array_equal, got, params)
    # transformers itself reads the same legacy file into the same weights
    hf_model.config.save_pretrained(tmp_path)
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path)
    for key, value in _state(loaded).items():
        np.testing.assert_array_equal(value, _state(hf_model)[key], err_msg=key)


def test_clear_errors(hf_model, converted):
    cfg, _ = converted
    state = _state(hf_model)
    with pytest.raises(ValueError, match="missing .*decoder.decoder_pred.weight"):
        mae_interop.params_from_hf(
            {k: v for k, v in state.items() if k != "decoder.decoder_pred.weight"}, cfg
        )
    state["vit.embeddings.position_embeddings"] = np.zeros_like(state["vit.embeddings.position_embeddings"])
    with pytest.warns(UserWarning, match="position_embeddings is not the fixed 2-D sin-cos table"):
        mae_interop.params_from_hf(state, cfg)
    for bad, field in (
        (dict(image_size=30), "image_size"),
        (dict(decoder_hidden=18), "decoder_hidden"),
        (dict(pos_embed="learned"), "pos_embed"),
    ):
        with pytest.raises(ValueError, match=f"MaeConfig.{field}="):
            vit.MaeConfig(
                **(dict(hidden=32, layers=1, heads=4, mlp_dim=8, image_size=32, patch_size=8) | bad)
            )
    model = _build(vit.Mae, cfg, converted[1])
    with pytest.raises(ValueError, match="NHWC"):
        model.encode(jnp.zeros((1, CHANNELS, IMAGE, IMAGE)), jnp.zeros((1, 4), jnp.int32))


@pytest.mark.parametrize(
    "factory,hf_sizes",
    [
        (
            vit.mae_vit_base,
            dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=16),
        ),
        (
            vit.mae_vit_large,
            dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=16),
        ),
        (
            vit.mae_vit_huge,
            dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, patch_size=14),
        ),
    ],
)
def test_paper_sizes_match_transformers_parameter_counts(factory, hf_sizes):
    cfg = factory()
    hf_cfg = transformers.ViTMAEConfig(
        **hf_sizes, intermediate_size=4 * hf_sizes["hidden_size"], image_size=224
    )  # HF's defaults are the 8-block, 512-d, 16-head decoder with mlp 2048
    with torch.device("meta"):
        hf = transformers.ViTMAEForPreTraining(hf_cfg)
    # HF stores the two fixed sin-cos tables as frozen (requires_grad=False) parameters; maskjax computes
    # them as constants, so only HF's trainable parameters are comparable.
    frozen = hf.vit.embeddings.position_embeddings.numel() + hf.decoder.decoder_pos_embed.numel()
    assert hf.num_parameters(only_trainable=True) == hf.num_parameters() - frozen
    assert vit.param_count(cfg) == hf.num_parameters(only_trainable=True)
    assert (cfg.decoder_layers, cfg.decoder_hidden) == (8, 512)


def _flops(cfg: vit.MaeConfig, keep: int) -> float:
    model = nnx.eval_shape(lambda: vit.Mae(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    spec = jax.ShapeDtypeStruct

    def forward(state, images, ids_keep, ids_restore):
        return nnx.merge(graphdef, state)(images, ids_keep, ids_restore)["pred"]

    images = spec((2, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    ids = lambda k: spec((2, k), jnp.int32)  # noqa: E731
    cost = jax.jit(forward).lower(state, images, ids(keep), ids(cfg.num_patches)).cost_analysis()
    return float(cost["flops"])


def test_encoder_compute_scales_with_kept_patches():
    # Unrolled layers: cost_analysis counts a scan body only once.
    cfg = vit.MaeConfig(
        hidden=64, layers=2, heads=4, mlp_dim=256, image_size=32, patch_size=4,  # N = 64 patches
        decoder_hidden=16, decoder_layers=1, decoder_heads=2, decoder_mlp_dim=32, scan_layers=False,
    )  # fmt: skip
    n = cfg.num_patches
    k = masking.mae_num_keep(n, 0.75)  # ratio 0.75 (K = 16) vs all N = 64 patches (ratio 0)
    d, f, p = cfg.hidden, cfg.mlp_dim, cfg.patch_dim
    # matmul FLOPs that depend on the encoder's length T = 1 + K: per layer q,k,v,o (8·D²) and
    # MLP (4·D·F) per token plus attention (4·T²·D); patch embedding and decoder_embed per token.
    per_token = cfg.layers * (8 * d * d + 4 * d * f) + 2 * p * d + 2 * d * cfg.decoder_hidden
    expected = 2 * (per_token * (n - k) + cfg.layers * 4 * d * ((1 + n) ** 2 - (1 + k) ** 2))
    extra = _flops(cfg, n) - _flops(cfg, k)
    # the rest is elementwise work (LayerNorm, GELU, softmax) on the same tokens
    assert expected <= extra < 1.3 * expected, (extra, expected)


def test_scan_and_unrolled_agree(converted, inputs):
    cfg, params = converted
    assert cfg.scan_layers
    images, noise = jnp.asarray(inputs[0]), jnp.asarray(inputs[1])
    ids_keep, _, ids_restore = masking.mae_mask_from_noise(noise, 0.75)
    scanned = _forward(_build(vit.Mae, cfg, params), images, ids_keep, ids_restore)
    unrolled_cfg = vit.MaeConfig(**(vars(cfg) | dict(scan_layers=False)))
    unrolled = _forward(_build(vit.Mae, unrolled_cfg, params), images, ids_keep, ids_restore)
    assert _max_diff(unrolled["latent"], scanned["latent"]) < 1e-5
    assert _max_diff(unrolled["pred"], scanned["pred"]) < 1e-5


def _tiny_mae(**overrides) -> vit.MaeConfig:
    kw = dict(
        hidden=32,
        layers=2,
        heads=4,
        mlp_dim=48,
        image_size=IMAGE,
        patch_size=PATCH,
        decoder_hidden=16,
        decoder_layers=2,
        decoder_heads=2,
        decoder_mlp_dim=40,
    )  # fmt: skip  (the shapes of the converted model: the same compiled initialisers)
    return vit.MaeConfig(**(kw | overrides))


def test_jit_grad_finite_reaches_every_param_and_dropout(converted, inputs):
    cfg, params = converted
    cfg = vit.MaeConfig(**(vars(cfg) | dict(dropout=0.1, attention_dropout=0.1, drop_path=0.1)))
    graphdef, state = nnx.split(_build(vit.Mae, cfg, params))
    images, noise = jnp.asarray(inputs[0]), jnp.asarray(inputs[1])
    ids_keep, mask, ids_restore = masking.mae_mask_from_noise(noise, 0.75)

    @jax.jit
    @jax.value_and_grad
    def loss_fn(state, key):
        out = nnx.merge(graphdef, state)(images, ids_keep, ids_restore, dropout_key=key)
        return losses.mae_loss(out["pred"], vit.patchify(images, PATCH), mask, norm_pix=True)

    loss, grads = loss_fn(state, jax.random.key(3))
    assert np.isfinite(float(loss))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)), path
        assert np.any(g != 0), f"no gradient reaches {jax.tree_util.keystr(path)}"
    assert float(loss_fn(state, jax.random.key(4))[0]) != float(loss)  # dropout is live with a key


def test_init_matches_mae_reference_statistics():
    # MAE reference: xavier_uniform on every Linear (q, k, v as one fused (D, 3D) Linear),
    # patch embedding as a Linear over p·p·C inputs, tokens normal(0.02).
    cfg = _tiny_mae()
    model = vit.Mae(cfg, rngs=nnx.Rngs(0))
    d = cfg.hidden
    bound = lambda fan_in, fan_out: np.sqrt(6.0 / (fan_in + fan_out))  # noqa: E731
    q = np.asarray(model.encoder.blocks.attn.query.kernel[...])
    assert np.abs(q).max() <= bound(d, 3 * d) and np.abs(q).max() > 0.9 * bound(d, 3 * d)
    wi = np.asarray(model.encoder.blocks.mlp.wi.kernel[...])
    assert np.abs(wi).max() <= bound(d, cfg.mlp_dim) and np.abs(wi).max() > 0.9 * bound(d, cfg.mlp_dim)
    pe = np.asarray(model.patch_embed.kernel[...])
    assert np.abs(pe).max() <= bound(cfg.patch_dim, d) and np.abs(pe).max() > 0.9 * bound(cfg.patch_dim, d)
    assert 0.01 < np.std(np.asarray(model.cls_token[...])) < 0.03


def test_every_param_has_logical_axis_names():
    model = nnx.eval_shape(lambda: vit.Mae(_tiny_mae(), rngs=nnx.Rngs(0)))
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    leaves = jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    shapes = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert len(leaves) == len(shapes) > 0
    for (path, spec), shape in zip(leaves, shapes, strict=True):
        assert len(spec) == len(shape.shape) and all(name is not None for name in spec), (path, spec)
    assert nnx.get_partition_spec(nnx.state(model, nnx.Param))["encoder"]["blocks"]["attn"]["query"][
        "kernel"
    ].get_value() == jax.sharding.PartitionSpec("layers", "embed", "heads", "kv")


# ---------------------------------------------------------------------------- ViT classifier


def _vit_params_from_hf(sd: dict[str, np.ndarray], cfg: vit.VitConfig) -> dict:
    """ViTForImageClassification -> `Vit` (learned positions, [CLS] pooling), via the MAE layer mapping."""
    return {
        "patch_embed": {
            "kernel": mae_interop.patch_kernel_from_conv(
                sd["vit.embeddings.patch_embeddings.projection.weight"]
            ),
            "bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        },
        "cls_token": sd["vit.embeddings.cls_token"].reshape(-1),
        "pos_embed": sd["vit.embeddings.position_embeddings"][0],
        "encoder": mae_interop.stack_from_hf(sd, "vit.layers.", cfg),
        "norm": {"scale": sd["vit.layernorm.weight"], "bias": sd["vit.layernorm.bias"]},
        "head": {"kernel": sd["classifier.weight"].T, "bias": sd["classifier.bias"]},
    }


def test_vit_classifier_matches_transformers(inputs):
    images, _ = inputs
    torch.manual_seed(1)
    hf_cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=IMAGE,
        patch_size=PATCH, num_labels=5, layer_norm_eps=1e-6, attn_implementation="eager",
    )  # fmt: skip
    hf = transformers.ViTForImageClassification(hf_cfg).eval()
    _randomize(hf)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = hf(pixels).logits.numpy()
        last = hf.vit(pixels, output_hidden_states=True).hidden_states[-1]  # before the final LayerNorm
        mean_pooled = hf.vit.layernorm(last[:, 1:].mean(1)).numpy()

    common = dict(hidden=32, layers=2, heads=4, mlp_dim=48, image_size=IMAGE, patch_size=PATCH)
    cfg = vit.VitConfig(**common, num_classes=5, pos_embed="learned", layer_norm_eps=1e-6)
    model = _build(vit.Vit, cfg, _vit_params_from_hf(_state(hf), cfg))
    got = jax.jit(lambda m, x: m(x))(model, jnp.asarray(images))
    assert got.shape == (BATCH, 5) and got.dtype == jnp.float32
    assert _max_diff(got, logits) < TOL

    # global average pooling + norm (MAE fine-tuning's global_pool / fc_norm), no head
    mean_cfg = vit.VitConfig(**common, pooling="mean", pos_embed="learned", layer_norm_eps=1e-6)
    pure = _vit_params_from_hf(_state(hf), mean_cfg)
    del pure["head"]
    mean_model = _build(vit.Vit, mean_cfg, pure)
    assert _max_diff(mean_model(jnp.asarray(images)), mean_pooled) < TOL


def test_vit_from_mae_sees_the_mae_encoder(converted, inputs):
    """With every patch kept, MAE's [CLS] latent is the fine-tuning ViT's [CLS] feature."""
    cfg, params = converted
    images = jnp.asarray(inputs[0])
    all_patches = jnp.broadcast_to(jnp.arange(N), (BATCH, N))
    latent = jax.jit(lambda m, x, k: m.encode(x, k))(_build(vit.Mae, cfg, params), images, all_patches)

    rng = np.random.default_rng(0)
    fields = ("hidden", "layers", "heads", "mlp_dim", "layer_norm_eps", "image_size", "patch_size")
    for pos_embed, pooling in (("sincos", "cls"), ("learned", "cls"), ("learned", "mean")):
        vcfg = vit.VitConfig(
            **{f: getattr(cfg, f) for f in fields}, num_classes=7, pos_embed=pos_embed, pooling=pooling
        )
        shapes = nnx.to_pure_dict(
            nnx.state(nnx.eval_shape(lambda c=vcfg: vit.Vit(c, rngs=nnx.Rngs(0))), nnx.Param)
        )
        fresh = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
        pure = vit.vit_params_from_mae(params, fresh, vcfg)
        assert pure["head"] is fresh["head"]  # MAE main_finetune.py: the head is new
        assert (pure["norm"] is params["norm"]) == (pooling == "cls")  # global pool: a new fc_norm
        if pooling == "cls":
            features = jax.jit(lambda m, x: m.features(x))(_build(vit.Vit, vcfg, pure), images)
            assert _max_diff(features, latent[:, 0]) < 1e-5
