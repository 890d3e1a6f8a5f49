"""ViT and MAE: a pre-LN transformer over image patches, and its masked-autoencoder pre-training.

He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners" (MAE), Sec. 3 / Fig. 1:

    patches = patchify(images)                           (B, N, p·p·C), pixel order "nhwpqc"
    x  = patches[ids_keep]·W_e + b_e + pos[ids_keep]     only the K = N·(1 − ratio) visible patches
    x  = [cls + pos_cls ; x]                             (B, 1+K, D)
    latent = LN(Encoder(x))                              the encoder never sees mask tokens
    y  = latent·W_d + b_d                                (B, 1+K, Dd), a narrow decoder (Table 1a/b)
    y  = [y_cls ; unshuffle([y_visible ; mask_token × (N−K)], ids_restore)] + pos_dec
    pred = LN(Decoder(y))[1:]·W_p + b_p                  (B, N, p·p·C) pixels of every patch

Position embeddings are the fixed 2-D sine-cosine tables of the MAE reference
code (`get_2d_sincos_pos_embed`, with a zero row for [CLS]); they are computed
as constants, not parameters. The masks themselves (`ids_keep`, `ids_restore`)
come from `maskjax.masking`, so the model stays a pure function of its inputs.

`Vit` is the classifier used for fine-tuning: the same patch embedding, [CLS]
and encoder, then [CLS] or global-average pooling and a linear head.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maskjax.models import layers
from maskjax.sharding import constrain

# ---------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True, kw_only=True)
class VitConfig(layers.TransformerConfig):
    """ViT sizes; inherited defaults are the MAE reference code's (pre-LN, xavier, LN eps 1e-6)."""

    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    num_classes: int = 0  # 0: no head, the model returns pooled features (B, D)
    pooling: Literal["cls", "mean"] = "cls"  # "mean": MAE fine-tuning's global pool + fc_norm
    # "sincos": the fixed 2-D table (MAE pre-training); "learned": a parameter (MAE fine-tuning loads
    # the pre-trained table into timm's trainable pos_embed, see `vit_params_from_mae`).
    pos_embed: Literal["sincos", "learned"] = "sincos"
    head_init_std: float = 2e-5  # MAE main_finetune.py: trunc_normal_(head.weight, std=2e-5)
    # "batchnorm": the features are standardised before the head, BatchNorm without affine parameters
    # (MAE's linear probe, Table 10: BatchNorm1d(affine=False, eps=1e-6)); running statistics in
    # the parameters head_bn_mean / head_bn_var, updated by the probe's step (methods/classify.py).
    head_norm: Literal["none", "batchnorm"] = "none"
    pre_ln: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-6  # MAE reference: partial(nn.LayerNorm, eps=1e-6)
    init: layers.Init = "xavier"  # MAE reference _init_weights: xavier_uniform_ on every nn.Linear

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        """p·p·C: pixels per patch, the patch-embedding input and the MAE prediction width."""
        return self.patch_size**2 * self.channels

    def _checks(self) -> dict[str, tuple[bool, str]]:
        checks = {
            "hidden": (
                self.hidden > 0 and self.heads > 0 and self.hidden % self.heads == 0,
                "divisible by heads",
            ),
            "patch_size": (self.patch_size > 0, "> 0"),
            "image_size": (
                self.image_size > 0 and self.image_size % max(self.patch_size, 1) == 0,
                f"a positive multiple of patch_size={self.patch_size}",
            ),
            "channels": (self.channels > 0, "> 0"),
            "num_classes": (self.num_classes >= 0, ">= 0 (0 = no head)"),
            "pooling": (self.pooling in ("cls", "mean"), "'cls' or 'mean'"),
            "head_norm": (
                self.head_norm == "none" or (self.head_norm == "batchnorm" and self.num_classes > 0),
                "'none', or 'batchnorm' with num_classes > 0",
            ),
            "pos_embed": (self.pos_embed in ("sincos", "learned"), "'sincos' or 'learned'"),
            "pre_ln": (self.pre_ln, "True (ViT is pre-LN)"),
        }
        if self.pos_embed == "sincos":
            checks["hidden"] = (
                checks["hidden"][0] and self.hidden % 4 == 0,
                "divisible by heads and by 4 (2-D sin-cos position table)",
            )
        for name in ("dropout", "attention_dropout", "drop_path"):
            checks[name] = (0.0 <= getattr(self, name) < 1.0, "in [0, 1)")
        return checks

    def __post_init__(self):
        for name, (ok, allowed) in self._checks().items():
            if not ok:
                raise ValueError(
                    f"{type(self).__name__}.{name}={getattr(self, name)!r} is invalid: must be {allowed}"
                )


@dataclasses.dataclass(frozen=True, kw_only=True)
class MaeConfig(VitConfig):
    """MAE: a ViT encoder on visible patches plus a narrow, shallow decoder (MAE Table 1a/b).

    How many patches are kept is the masking's business (`config.masking.ratio`): the encoder takes
    whatever `ids_keep` it is given, so one set of weights serves any ratio.
    """

    # Training settings that lived here once; an older checkpoint's model spec may still carry them.
    MOVED: typing.ClassVar[dict[str, str]] = {
        "mask_ratio": "masking.ratio",
        "norm_pix_loss": "masking.norm_pix_loss",
    }

    decoder_hidden: int = 512  # MAE Table 1b: 512-d
    decoder_layers: int = 8  # MAE Table 1a: 8 blocks
    decoder_heads: int = 16  # MAE reference mae_vit_*_dec512d8b: 16 heads
    decoder_mlp_dim: int = 2048  # mlp_ratio 4

    def _checks(self) -> dict[str, tuple[bool, str]]:
        checks = super()._checks()
        checks["decoder_hidden"] = (
            self.decoder_hidden > 0
            and self.decoder_heads > 0
            and self.decoder_hidden % self.decoder_heads == 0
            and self.decoder_hidden % 4 == 0,
            f"divisible by decoder_heads={self.decoder_heads} and by 4",
        )
        checks["decoder_layers"] = (self.decoder_layers > 0, "> 0")
        checks["decoder_mlp_dim"] = (self.decoder_mlp_dim > 0, "> 0")
        checks["pos_embed"] = (self.pos_embed == "sincos", "'sincos' (MAE pre-training fixes it)")
        return checks


def decoder_config(cfg: MaeConfig) -> layers.TransformerConfig:
    """The decoder stack's config: the encoder's switches with the decoder's sizes."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(layers.TransformerConfig)}
    return layers.TransformerConfig(
        **shared
        | dict(
            hidden=cfg.decoder_hidden,
            layers=cfg.decoder_layers,
            heads=cfg.decoder_heads,
            mlp_dim=cfg.decoder_mlp_dim,
        )
    )


def _mae(hidden: int, layers_: int, heads: int, patch: int, **overrides) -> MaeConfig:
    # MAE Sec. 4 / appendix A.1 and the reference models_mae.py: ViT-B/16, L/16, H/14 at 224²,
    # mlp_ratio 4, with the default 8-block 512-d decoder.
    return MaeConfig(
        **{
            "hidden": hidden,
            "layers": layers_,
            "heads": heads,
            "mlp_dim": 4 * hidden,
            "patch_size": patch,
            "image_size": 224,
            **overrides,
        }
    )


def mae_vit_base(**overrides) -> MaeConfig:
    """MAE ViT-B/16 (768-d, 12 blocks, 12 heads) + 8×512 decoder: 111,655,680 parameters."""
    return _mae(768, 12, 12, 16, **overrides)


def mae_vit_large(**overrides) -> MaeConfig:
    """MAE ViT-L/16 (1024-d, 24 blocks, 16 heads) + 8×512 decoder: 329,239,296 parameters."""
    return _mae(1024, 24, 16, 16, **overrides)


def mae_vit_huge(**overrides) -> MaeConfig:
    """MAE ViT-H/14 (1280-d, 32 blocks, 16 heads) + 8×512 decoder: 656,613,964 parameters."""
    return _mae(1280, 32, 16, 14, **overrides)


# ---------------------------------------------------------------------------- patches and positions


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, h·w, p·p·C), patches row-major, pixels in (row, col, channel) order.

    The MAE reference's "nchpwq -> nhwpqc" order, so a Dense on these rows is the
    stride-p convolution and the prediction targets line up with released checkpoints.
    """
    b, height, width, c = images.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not divisible by patch_size={p}")
    x = images.reshape(b, height // p, p, width // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, h, w, p, p, C)
    return x.reshape(b, (height // p) * (width // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, grid: tuple[int, int] | None = None) -> jax.Array:
    """(B, h·w, p·p·C) -> (B, h·p, w·p, C), the inverse of `patchify` (square grid by default)."""
    b, n, d = patches.shape
    p = patch_size
    if grid is None:
        side = math.isqrt(n)
        grid = (side, side)
    h, w = grid
    if h * w != n or d % (p * p):
        raise ValueError(f"patches {patches.shape} do not form a {h}x{w} grid of {p}x{p} patches")
    c = d // (p * p)
    x = patches.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)


@functools.lru_cache(maxsize=32)
def sincos_pos_embed_2d(dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
    """Fixed 2-D sine-cosine table (1+g·g, dim) float32, row 0 zeros for [CLS] (if `cls_token`).

    The MAE reference's get_2d_sincos_pos_embed: half the channels encode one grid
    coordinate, half the other, each as [sin(pos·ω) | cos(pos·ω)] with
    ω_i = 1/10000^(i/(dim/4)). The reference builds its grid with
    np.meshgrid(w, h), so the first half encodes the column and the second the
    row; released checkpoints (and HF ViTMAE) use exactly this layout.
    Computed in float64 like the reference, then cast.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embeddings need dim divisible by 4; got {dim}")
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(
        np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64), indexing="ij"
    )

    def one_axis(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1), omega)  # (g·g, dim/4)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([one_axis(cols), one_axis(rows)], axis=1)  # patch i = row·g + col
    if cls_token:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    table = table.astype(np.float32)
    table.setflags(write=False)  # cached and shared: never modified in place
    return table


def _xavier_as_fused_qkv(stack: layers.Stack, rngs: nnx.Rngs) -> None:
    """Redraw q/k/v kernels as slices of one xavier-uniform (D, 3D) matrix.

    The MAE reference (timm's Attention) holds q, k, v in one nn.Linear(D, 3D)
    and xavier-initialises it whole: bound √(6/(D + 3D)), not the √(6/(D + D))
    of three separate layers.
    """
    for name in ("query", "key", "value"):
        kernel = getattr(stack.blocks.attn, name).kernel
        _, d_in, heads, head_dim = kernel.shape  # (L, D, N, H)
        bound = math.sqrt(6.0 / (d_in + 3 * heads * head_dim))
        kernel[...] = jax.random.uniform(rngs.params(), kernel.shape, kernel.dtype, -bound, bound)


def _token(rngs: nnx.Rngs, features: int, cfg: VitConfig) -> nnx.Param:
    # MAE reference: torch.nn.init.normal_(cls_token / mask_token, std=.02)
    return layers.param(rngs, jax.nn.initializers.normal(0.02), (features,), ("embed",), cfg.param_dtype)


# ---------------------------------------------------------------------------- MAE


class Mae(nnx.Module):
    """Masked autoencoder. Parameters: patch_embed, cls_token, encoder, norm (as in `Vit`),
    decoder_embed, mask_token, decoder, decoder_norm, decoder_pred."""

    def __init__(self, cfg: MaeConfig, *, rngs: nnx.Rngs):
        dcfg = decoder_config(cfg)
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        dense = dict(kw, init=cfg.init, init_std=cfg.init_std)
        self.patch_embed = layers.Dense(cfg.patch_dim, cfg.hidden, ("pixels", "embed"), **dense)
        self.cls_token = _token(rngs, cfg.hidden, cfg)
        self.encoder = layers.Stack(cfg, rngs=rngs)
        self.norm = layers.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, **kw)
        self.decoder_embed = layers.Dense(cfg.hidden, cfg.decoder_hidden, ("embed", "embed"), **dense)
        self.mask_token = _token(rngs, cfg.decoder_hidden, cfg)
        self.decoder = layers.Stack(dcfg, rngs=rngs)
        self.decoder_norm = layers.LayerNorm(cfg.decoder_hidden, eps=cfg.layer_norm_eps, **kw)
        self.decoder_pred = layers.Dense(cfg.decoder_hidden, cfg.patch_dim, ("embed", "pixels"), **dense)
        if cfg.init == "xavier":
            _xavier_as_fused_qkv(self.encoder, rngs)
            _xavier_as_fused_qkv(self.decoder, rngs)
        self.cfg = cfg

    def encode(
        self, images: jax.Array, ids_keep: jax.Array, *, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """images (B, H, W, C), ids_keep (B, K) int -> latent (B, 1+K, D), after the final LayerNorm.

        Only the K kept patches are embedded and encoded: the cost scales with K, not N.
        """
        cfg = self.cfg
        _check_images(images, cfg)
        if ids_keep.ndim != 2 or ids_keep.shape[0] != images.shape[0] or ids_keep.shape[1] > cfg.num_patches:
            raise ValueError(f"ids_keep must be (B, K<={cfg.num_patches}); got {ids_keep.shape}")
        batch = images.shape[0]
        pos = jnp.asarray(sincos_pos_embed_2d(cfg.hidden, cfg.grid_size), cfg.dtype)  # (1+N, D)
        visible = jnp.take_along_axis(patchify(images, cfg.patch_size), ids_keep[..., None], axis=1)
        x = self.patch_embed(visible) + jnp.take(pos[1:], ids_keep, axis=0)  # (B, K, D)
        cls = (self.cls_token[...].astype(cfg.dtype) + pos[0])[None, None]
        x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, cfg.hidden)), x], axis=1)
        x = self.encoder(constrain(x, ("batch", "length", "embed")), dropout_key=dropout_key)
        return self.norm(x)

    def decode(
        self, latent: jax.Array, ids_restore: jax.Array, *, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """latent (B, 1+K, D), ids_restore (B, N) -> predicted pixels (B, N, p·p·C) of every patch."""
        cfg = self.cfg
        batch, kept = latent.shape[0], latent.shape[1] - 1
        if ids_restore.shape != (batch, cfg.num_patches):
            raise ValueError(f"ids_restore must be ({batch}, {cfg.num_patches}); got {ids_restore.shape}")
        y = self.decoder_embed(latent)  # (B, 1+K, Dd)
        mask_tokens = jnp.broadcast_to(
            self.mask_token[...].astype(cfg.dtype), (batch, cfg.num_patches - kept, cfg.decoder_hidden)
        )
        patches = jnp.concatenate([y[:, 1:], mask_tokens], axis=1)  # shuffled order: visible first
        patches = jnp.take_along_axis(patches, ids_restore[..., None], axis=1)  # back to image order
        y = jnp.concatenate([y[:, :1], patches], axis=1)
        y = y + jnp.asarray(sincos_pos_embed_2d(cfg.decoder_hidden, cfg.grid_size), cfg.dtype)
        y = self.decoder(constrain(y, ("batch", "length", "embed")), dropout_key=dropout_key)
        y = self.decoder_norm(y)
        pred = self.decoder_pred(y[:, 1:])  # [CLS] predicts nothing: drop it before the projection
        return constrain(pred, ("batch", "length", "pixels"))

    def __call__(
        self,
        images: jax.Array,
        ids_keep: jax.Array,
        ids_restore: jax.Array,
        *,
        dropout_key: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """-> {"latent": (B, 1+K, D) encoder output, "pred": (B, N, p·p·C) pixels, compute dtype}.

        ids_keep / ids_restore as from `masking.mae_mask_from_noise`; dropout_key None = deterministic.
        """
        k_enc, k_dec = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
        latent = self.encode(images, ids_keep, dropout_key=k_enc)
        return {"latent": latent, "pred": self.decode(latent, ids_restore, dropout_key=k_dec)}


def _check_images(images: jax.Array, cfg: VitConfig) -> None:
    want = (cfg.image_size, cfg.image_size, cfg.channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f"images must be (B, {want[0]}, {want[1]}, {want[2]}) NHWC; got {images.shape}")


# ---------------------------------------------------------------------------- ViT classifier


class Vit(nnx.Module):
    """ViT classifier (fine-tuning). Parameters: patch_embed, cls_token, [pos_embed], encoder, norm, [head].

    pooling "cls":  norm(encoder(x))[:, 0]
    pooling "mean": norm(mean of encoder(x)[:, 1:])   (MAE fine-tuning's global_pool + fc_norm)
    """

    def __init__(self, cfg: VitConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.patch_embed = layers.Dense(
            cfg.patch_dim, cfg.hidden, ("pixels", "embed"), init=cfg.init, init_std=cfg.init_std, **kw
        )
        self.cls_token = _token(rngs, cfg.hidden, cfg)
        self.pos_embed = (
            layers.param(
                rngs,
                jax.nn.initializers.normal(cfg.init_std),
                (cfg.num_patches + 1, cfg.hidden),
                ("position", "embed"),
                cfg.param_dtype,
            )
            if cfg.pos_embed == "learned"
            else None
        )
        self.encoder = layers.Stack(cfg, rngs=rngs)
        self.norm = layers.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, **kw)
        self.head = (
            layers.Dense(
                cfg.hidden,
                cfg.num_classes,
                ("embed", "classes"),
                init="normal",
                init_std=cfg.head_init_std,
                **kw,
            )
            if cfg.num_classes
            else None
        )
        if cfg.head_norm == "batchnorm":
            stat = lambda init: layers.param(rngs, init, (cfg.hidden,), ("embed",), "float32")  # noqa: E731
            self.head_bn_mean = stat(jax.nn.initializers.zeros)
            self.head_bn_var = stat(jax.nn.initializers.ones)
        if cfg.init == "xavier":
            _xavier_as_fused_qkv(self.encoder, rngs)
        self.cfg = cfg

    def features(self, images: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """images (B, H, W, C) -> pooled, normalised features (B, D)."""
        cfg = self.cfg
        _check_images(images, cfg)
        k_embed, k_stack = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
        if self.pos_embed is not None:
            pos = self.pos_embed[...].astype(cfg.dtype)
        else:
            pos = jnp.asarray(sincos_pos_embed_2d(cfg.hidden, cfg.grid_size), cfg.dtype)
        x = self.patch_embed(patchify(images, cfg.patch_size)) + pos[1:]
        cls = (self.cls_token[...].astype(cfg.dtype) + pos[0])[None, None]
        x = jnp.concatenate([jnp.broadcast_to(cls, (images.shape[0], 1, cfg.hidden)), x], axis=1)
        x = constrain(layers.dropout(x, cfg.dropout, k_embed), ("batch", "length", "embed"))
        x = self.encoder(x, dropout_key=k_stack)
        pooled = x[:, 0] if cfg.pooling == "cls" else x[:, 1:].mean(axis=1)
        return self.norm(pooled)  # LayerNorm is per token: norm(x)[:, 0] == norm(x[:, 0])

    def logits(self, x: jax.Array, stats: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """Pooled features (B, D) -> logits (B, num_classes) float32.

        head_norm "batchnorm": x is first standardised, (x − μ) / √(σ² + 1e-6), with `stats` = (μ, σ²)
        when given (the probe's training step passes its batch's), else the running statistics.
        """
        if self.cfg.head_norm == "batchnorm":
            mean, var = stats if stats is not None else (self.head_bn_mean[...], self.head_bn_var[...])
            x = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + 1e-6)
        return constrain(self.head(x.astype(self.cfg.dtype)).astype(jnp.float32), ("batch", "classes"))

    def classify(self, images: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """The class logits (B, num_classes): what the classification methods call (as `Beit.classify`)."""
        return self(images, dropout_key=dropout_key)

    def __call__(self, images: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """images (B, H, W, C) -> logits (B, num_classes) float32, or features (B, D) if no head."""
        x = self.features(images, dropout_key=dropout_key)
        return x if self.head is None else self.logits(x)


def encoder_from_mae(mae_params: dict, cfg: VitConfig) -> dict:
    """The parameters a `Vit` takes from MAE pre-training (pure dicts), as MAE main_finetune.py and
    main_linprobe.py load them: patch embedding, [CLS] and encoder blocks; the final norm for "cls"
    pooling only (with "mean" the reference makes a fresh `fc_norm`); a learned position table starts
    from the fixed sin-cos one. The head (and a probe's BatchNorm statistics) are left out: fresh.
    """
    out = {name: mae_params[name] for name in ("patch_embed", "cls_token", "encoder")}
    if cfg.pooling == "cls":
        out["norm"] = mae_params["norm"]
    if cfg.pos_embed == "learned":
        out["pos_embed"] = np.array(sincos_pos_embed_2d(cfg.hidden, cfg.grid_size))
    return out


def vit_params_from_mae(mae_params: dict, vit_params: dict, cfg: VitConfig) -> dict:
    """Initialise a `Vit` for fine-tuning from MAE pre-trained parameters (pure dicts).

    As MAE main_finetune.py: patch embedding, [CLS] and encoder blocks are loaded;
    the head stays fresh; a learned position table starts from the fixed sin-cos
    one; the final norm is loaded for "cls" pooling and stays fresh for "mean"
    (the reference drops `norm` and creates a new `fc_norm` with global pooling).
    """
    return {**vit_params, **encoder_from_mae(mae_params, cfg)}


def param_count(cfg: VitConfig) -> int:
    """Exact number of parameters (fixed sin-cos tables are constants, not counted), from shapes alone."""
    model_cls = Mae if isinstance(cfg, MaeConfig) else Vit
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
