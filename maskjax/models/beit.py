"""BEiT: masked image modeling that predicts discrete visual tokens, and a VQ tokenizer for them.

Bao et al. 2022, "BEiT: BERT Pre-Training of Image Transformers". An image is
cut into p×p patches (the ViT input) and also mapped by a discrete tokenizer to
a grid of visual tokens, one per patch (8192-entry vocabulary, Sec. 2.1.2).
Some patches are replaced by a learned [MASK] embedding; the transformer
predicts the visual token of each masked patch (Sec. 2.3, Eq. 1):

    x0 = [CLS; e_M or W·patch_i for i = 1..N]   (no absolute positions in pre-training)
    xl = Block_l(x_{l-1}, bias=B_rel)           pre-LN, layer scale γ, shared relative bias
    hidden = xL;  logits_i = W_head · LN(hidden_i) + b   at the masked positions i only

B_rel is one relative-position-bias table shared by all layers in pre-training
(appendix; per-layer tables only in fine-tuning), looked up with an index that
also has three special entries for [CLS]→patch, patch→[CLS] and [CLS]→[CLS]
((2h-1)(2w-1)+3 rows, h×w the patch grid).

Images are NHWC (B, H, W, C); a patch is flattened in (row, column, channel)
order, so the patch embedding is a Dense on `vit.patchify(images, p)` — the same
map as a p×p convolution with stride p.

`VqTokenizer` is a small trainable VQ-VAE (van den Oord et al. 2017) that gives
one code per BEiT patch. BEiT used the DALL-E dVAE (Ramesh et al. 2021), whose
weights cannot be downloaded here; train a `VqTokenizer` instead, or feed codes
from any tokenizer of the same grid.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maskjax.models import layers
from maskjax.models.vit import patchify, unpatchify
from maskjax.sharding import constrain

# ----------------------------------------------------------------------------- BEiT


@dataclasses.dataclass(frozen=True, kw_only=True)
class BeitConfig(layers.TransformerConfig):
    """BEiT sizes; the defaults of the inherited fields are BEiT pre-training's, not BERT's."""

    image_size: int = 224  # BEiT paper, appendix (pre-training input resolution)
    patch_size: int = 16
    channels: int = 3
    codebook_size: int = 8192  # visual-token vocabulary, Sec. 2.1.2 (the DALL-E tokenizer's)
    pre_ln: bool = True
    qkv_bias: tuple[bool, bool, bool] = (True, False, True)  # BEiT's key projection has no bias
    layer_scale: float | None = 0.1  # base; 1e-5 for large (appendix)
    drop_path: float = 0.1  # stochastic depth in pre-training (appendix)
    dropout: float = 0.0  # no dropout in pre-training (appendix)
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-6  # BEiT's released code: LayerNorm(eps=1e-6)
    # unilm beit/modeling_pretrain.py: trunc_normal_(std=0.02) with a=-std, b=std for every Linear, the
    # patch embedding, lm_head and the cls/mask tokens (an effective std of 0.0108, not 0.02).
    init: layers.Init = "truncated"
    # > 0: the fine-tuning model (BEiT Sec. 3.1): the patch tokens averaged, a LayerNorm, a linear
    # classifier; the pre-training's final LayerNorm and visual-token head are gone.
    num_classes: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (h, w) = image_size / patch_size."""
        return (self.image_size // self.patch_size,) * 2

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def __post_init__(self):
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
            "codebook_size": (self.codebook_size > 1, "> 1"),
            "num_classes": (self.num_classes >= 0, ">= 0 (0: the pre-training model)"),
            "pre_ln": (self.pre_ln, "True (BEiT is pre-LN)"),
            "layer_scale": (self.layer_scale is None or self.layer_scale > 0, "None or > 0"),
            "drop_path": (0.0 <= self.drop_path < 1.0, "in [0, 1)"),
            "dropout": (0.0 <= self.dropout < 1.0, "in [0, 1)"),
            "attention_dropout": (0.0 <= self.attention_dropout < 1.0, "in [0, 1)"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"BeitConfig.{name}={getattr(self, name)!r} is invalid: must be {allowed}")


def beit_base(**overrides) -> BeitConfig:
    """BEiT-base: ViT-B/16 at 224, 12 layers, 768 wide, 12 heads, FFN 3072, layer scale 0.1 (appendix)."""
    return BeitConfig(**{"hidden": 768, "layers": 12, "heads": 12, "mlp_dim": 3072, **overrides})


def beit_large(**overrides) -> BeitConfig:
    """BEiT-large: ViT-L/16 at 224, 24 layers, 1024 wide, 16 heads, FFN 4096, layer scale 1e-5 (appendix)."""
    return BeitConfig(
        **{"hidden": 1024, "layers": 24, "heads": 16, "mlp_dim": 4096, "layer_scale": 1e-5, **overrides}
    )


@functools.lru_cache(maxsize=16)
def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
    """(1+N, 1+N) int32 index into the bias table, N = h·w, token 0 = [CLS].

    Patch i at (yi, xi) to patch j: (yi-yj + h-1)·(2w-1) + (xi-xj + w-1), in
    [0, (2h-1)(2w-1)); then the three extra rows: [CLS]→patch = R-3,
    patch→[CLS] = R-2, [CLS]→[CLS] = R-1, with R = (2h-1)(2w-1)+3.
    """
    h, w = grid
    num = (2 * h - 1) * (2 * w - 1) + 3
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    rel = (ys[:, None] - ys[None, :] + h - 1) * (2 * w - 1) + (xs[:, None] - xs[None, :] + w - 1)
    index = np.empty((h * w + 1,) * 2, np.int32)
    index[1:, 1:] = rel
    index[0, :] = num - 3
    index[:, 0] = num - 2
    index[0, 0] = num - 1
    index.flags.writeable = False
    return index


class Beit(nnx.Module):
    """BEiT for masked image modeling.

    Parameters: patch_embed (p·p·C, D), cls_token (D,), mask_token (D,),
    rel_pos_table (R, heads), stack, norm (final LN), head (D, V).
    """

    def __init__(self, cfg: BeitConfig, *, rngs: nnx.Rngs):
        d, p = cfg.hidden, cfg.patch_size
        kw = dict(
            rngs=rngs, init=cfg.init, init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        self.patch_embed = layers.Dense(p * p * cfg.channels, d, ("pixels", "embed"), **kw)
        token = layers.initializer("truncated" if cfg.init == "truncated" else "normal", cfg.init_std, 1, 1)
        self.cls_token = layers.param(rngs, token, (d,), ("embed",), cfg.param_dtype)
        self.mask_token = layers.param(rngs, token, (d,), ("embed",), cfg.param_dtype)
        h, w = cfg.grid
        num_relative = (2 * h - 1) * (2 * w - 1) + 3
        self.rel_pos_table = layers.param(
            rngs, jax.nn.initializers.zeros, (num_relative, cfg.heads), ("relpos", "heads"), cfg.param_dtype
        )
        self.stack = layers.Stack(cfg, rngs=rngs)
        norm = dict(rngs=rngs, eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        if cfg.num_classes:
            self.norm = self.head = None
            self.fc_norm = layers.LayerNorm(d, **norm)
            # unilm beit/modeling_finetune.py: the classifier starts at trunc_normal(0.02) × init_scale 0.001.
            head = {**kw, "init": "truncated", "init_std": cfg.init_std * 1e-3}
            self.classifier = layers.Dense(d, cfg.num_classes, ("embed", None), **head)
        else:
            self.norm = layers.LayerNorm(d, **norm)
            self.head = layers.Dense(d, cfg.codebook_size, ("embed", "vocab"), **kw)
        # BEiT paper Sec. 2.5 (also `fix_init_weight` in its code): the last projection of each
        # sub-layer of layer l (attention output, second MLP matrix) starts scaled by 1/√(2l), l = 1..L.
        scale = 1.0 / np.sqrt(2.0 * np.arange(1, cfg.layers + 1))
        for kernel in (self.stack.blocks.attn.out.kernel, self.stack.blocks.mlp.wo.kernel):
            value = kernel[...]
            kernel[...] = value * scale.reshape((-1,) + (1,) * (value.ndim - 1)).astype(value.dtype)
        self.cfg = cfg

    def relative_bias(self) -> jax.Array:
        """(1, heads, 1+N, 1+N): the shared bias, looked up once and given to every block."""
        index = relative_position_index(self.cfg.grid)
        bias = jnp.take(self.rel_pos_table[...], jnp.asarray(index.reshape(-1)), axis=0)
        bias = bias.reshape(index.shape + (self.cfg.heads,)).transpose(2, 0, 1)
        return bias[None].astype(self.cfg.dtype)

    def __call__(
        self,
        images: jax.Array,
        bool_masked_pos: jax.Array,
        *,
        masked_positions: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """images (B, H, W, C), bool_masked_pos (B, N) bool (True = replace by [MASK]) ->

        {"hidden": (B, 1+N, D) output of the last block (before the head's LN; what
        fine-tuning pools), "logits": (B, M, V) float32 at `masked_positions` (B, M)
        int patch indices in [0, N) if given, else (B, N, V) for every patch}.
        dropout_key: None = deterministic.
        """
        cfg = self.cfg
        b, height, width, c = images.shape
        if (height, width, c) != (cfg.image_size, cfg.image_size, cfg.channels):
            raise ValueError(
                f"images must be NHWC (B, {cfg.image_size}, {cfg.image_size}, {cfg.channels}); "
                f"got {images.shape}"
            )
        if bool_masked_pos.shape != (b, cfg.num_patches):
            raise ValueError(
                f"bool_masked_pos must be (B, N) = ({b}, {cfg.num_patches}); got {bool_masked_pos.shape}"
            )
        k_embed, k_stack = jax.random.split(dropout_key) if dropout_key is not None else (None, None)

        x = self.patch_embed(patchify(images, cfg.patch_size))  # (B, N, D)
        x = jnp.where(bool_masked_pos[..., None], self.mask_token[...].astype(x.dtype), x)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, cfg.hidden))
        x = jnp.concatenate([cls, x], axis=1)
        x = constrain(layers.dropout(x, cfg.dropout, k_embed), ("batch", "length", "embed"))
        hidden = self.stack(x, bias=self.relative_bias(), dropout_key=k_stack)

        patches = hidden[:, 1:]
        if self.head is None:  # a classifier: `classify` pools the patches
            return {"hidden": hidden}
        if masked_positions is not None:  # never project what the loss throws away
            patches = jnp.take_along_axis(patches, masked_positions[..., None].astype(jnp.int32), axis=1)
        logits = self.head(self.norm(patches)).astype(jnp.float32)
        return {"hidden": hidden, "logits": constrain(logits, ("batch", "length", "vocab"))}

    def classify(self, images: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """(B, num_classes) float32 logits: nothing masked, LN(mean of the patch tokens)·W + b."""
        b = images.shape[0]
        hidden = self(images, jnp.zeros((b, self.cfg.num_patches), bool), dropout_key=dropout_key)["hidden"]
        pooled = self.fc_norm(hidden[:, 1:].mean(axis=1))
        return self.classifier(pooled).astype(jnp.float32)


def param_count(cfg: BeitConfig) -> int:
    """Exact number of parameters, from shapes alone (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: Beit(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


# ----------------------------------------------------------------------------- VQ tokenizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class VqConfig(layers.TransformerConfig):
    """A VQ-VAE over BEiT's patch grid: `hidden`, `layers`, ... size the encoder and decoder stacks."""

    image_size: int = 224
    patch_size: int = 16  # one code per BEiT patch
    channels: int = 3
    codebook_size: int = 8192
    code_dim: int = 32  # width of a codebook entry
    beta: float = 0.25  # commitment weight, van den Oord et al. 2017, Sec. 3.2 / 4.1
    l2_normalize: bool = True  # look codes up on the unit sphere (ViT-VQGAN, Yu et al. 2022, Sec. 3.2)
    pre_ln: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def __post_init__(self):
        checks = {
            "hidden": (
                self.hidden > 0 and self.heads > 0 and self.hidden % self.heads == 0,
                "divisible by heads",
            ),
            "layers": (self.layers >= 1, ">= 1"),
            "image_size": (
                self.patch_size > 0 and self.image_size > 0 and self.image_size % self.patch_size == 0,
                f"a positive multiple of patch_size={self.patch_size}",
            ),
            "codebook_size": (self.codebook_size > 1, "> 1"),
            "code_dim": (self.code_dim > 0, "> 0"),
            "beta": (self.beta >= 0, ">= 0"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"VqConfig.{name}={getattr(self, name)!r} is invalid: must be {allowed}")


class _PatchTransformer(nnx.Module):
    """(B, N, d_in) -> Dense -> + learned positions -> pre-LN Stack -> LN -> Dense -> (B, N, d_out)."""

    def __init__(self, cfg: VqConfig, d_in: int, d_out: int, names: tuple[str, str], *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.proj_in = layers.Dense(d_in, cfg.hidden, (names[0], "embed"), **kw)
        self.position = layers.param(
            rngs,
            jax.nn.initializers.normal(cfg.init_std),
            (cfg.num_patches, cfg.hidden),
            ("length", "embed"),
            cfg.param_dtype,
        )
        self.stack = layers.Stack(cfg, rngs=rngs)
        self.norm = layers.LayerNorm(
            cfg.hidden, rngs=rngs, eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        self.proj_out = layers.Dense(cfg.hidden, d_out, ("embed", names[1]), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj_in(x) + self.position[...].astype(self.proj_in.dtype)
        return self.proj_out(self.norm(self.stack(constrain(x, ("batch", "length", "embed")))))


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))


class VqTokenizer(nnx.Module):
    """Discrete image tokenizer (VQ-VAE, van den Oord et al. 2017), one code per p×p patch.

    z_e = Enc(patches)                         (B, N, c)    transformer over patch embeddings
    k   = argmin_j ||z_e - e_j||²              (B, N)       codes: nearest codebook entry
    z_q = z_e + sg(e_k - z_e)                               straight-through: forward e_k, gradient to z_e
    recon = unpatchify(Dec(z_q))               (B, H, W, C)
    loss = ||recon - x||² + ||sg(z_e) - e_k||² + β·||z_e - sg(e_k)||²     (Eq. 3; means over elements)

    With `l2_normalize` (default), z_e and the entries are projected onto the
    unit sphere before the lookup and the losses (Yu et al. 2022, ViT-VQGAN,
    Sec. 3.2): nearest in Euclidean distance is then nearest in cosine, and far
    more entries stay in use than with raw vectors. A stand-in for the DALL-E
    dVAE that BEiT used, whose weights cannot be downloaded here.
    """

    def __init__(self, cfg: VqConfig, *, rngs: nnx.Rngs):
        pixels = cfg.patch_size**2 * cfg.channels
        self.encoder = _PatchTransformer(cfg, pixels, cfg.code_dim, ("pixels", "code"), rngs=rngs)
        self.codebook = layers.param(
            rngs,
            jax.nn.initializers.normal(1.0),
            (cfg.codebook_size, cfg.code_dim),
            ("vocab", "code"),
            cfg.param_dtype,
        )
        self.decoder = _PatchTransformer(cfg, cfg.code_dim, pixels, ("code", "pixels"), rngs=rngs)
        self.cfg = cfg

    def _entries(self) -> jax.Array:
        e = self.codebook[...].astype(jnp.float32)
        return _l2_normalize(e) if self.cfg.l2_normalize else e

    def _encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """images -> (z_e (B, N, c), codes (B, N) int32, e_k (B, N, c)), float32, in lookup space."""
        z = self.encoder(patchify(images, self.cfg.patch_size)).astype(jnp.float32)
        z = _l2_normalize(z) if self.cfg.l2_normalize else z
        e = self._entries()
        # ||z - e||² = ||z||² - 2 z·e + ||e||²; ||z||² is the same for every entry.
        dist = jnp.sum(e * e, -1) - 2 * jnp.einsum("bnc,kc->bnk", z, e)  # (B, N, K)
        codes = jnp.argmin(dist, axis=-1).astype(jnp.int32)
        return z, codes, jnp.take(e, codes, axis=0)

    def _decode(self, z_q: jax.Array) -> jax.Array:
        size, p = self.cfg.image_size, self.cfg.patch_size
        return unpatchify(self.decoder(z_q).astype(jnp.float32), p, (size // p, size // p))

    def encode(self, images: jax.Array) -> jax.Array:
        """images (B, H, W, C) -> codes (B, N) int32 in [0, codebook_size): BEiT's targets."""
        return self._encode(images)[1]

    def decode(self, codes: jax.Array) -> jax.Array:
        """codes (B, N) int -> images (B, H, W, C) float32."""
        return self._decode(jnp.take(self._entries(), codes, axis=0))

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """images (B, H, W, C) -> {"recon" (B, H, W, C) float32, "codes" (B, N) int32,
        "codebook_loss", "commitment_loss" (float32 scalars)}."""
        z_e, codes, e = self._encode(images)
        z_q = z_e + jax.lax.stop_gradient(e - z_e)  # straight-through estimator
        return {
            "recon": self._decode(z_q),
            "codes": codes,
            "codebook_loss": jnp.mean(jnp.square(jax.lax.stop_gradient(z_e) - e)),
            "commitment_loss": jnp.mean(jnp.square(z_e - jax.lax.stop_gradient(e))),
        }


def vq_loss(model: VqTokenizer, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """VQ-VAE objective (van den Oord et al. 2017, Eq. 3) -> (loss, metrics).

    loss = MSE(recon, images) + codebook_loss + β·commitment_loss, float32;
    metrics also count the distinct codes used in the batch (codebook usage).
    """
    out = model(images)
    recon_loss = jnp.mean(jnp.square(out["recon"] - images.astype(jnp.float32)))
    loss = recon_loss + out["codebook_loss"] + model.cfg.beta * out["commitment_loss"]
    used = jnp.zeros((model.cfg.codebook_size,), jnp.bool_).at[out["codes"].reshape(-1)].set(True)
    metrics = {
        "loss": loss,
        "recon_loss": recon_loss,
        "codebook_loss": out["codebook_loss"],
        "commitment_loss": out["commitment_loss"],
        "codes_used": used.sum(),
    }
    return loss, metrics
