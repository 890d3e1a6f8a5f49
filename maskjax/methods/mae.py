"""MAE (He et al. 2022): mask 75% of the patches at random, encode only the visible
ones, decode all of them, and regress the pixels of the masked patches.

  masking  masking.mae_random_mask       per-sample noise -> argsort -> keep K = int(N·(1−r))
  model    models.vit.Mae                encoder on (B, 1+K, D), narrow decoder on (B, 1+N, Dd)
  loss     losses.mae_loss               MSE on masked patches, optionally per-patch normalised

config.masking: ratio r (Sec. 3, Fig. 5: 0.75), norm_pix_loss (Table 1d: the target is each patch
normalised by its own mean and std).

FLOPs per step = B · 3 · (2·K·P·D + stack_flops(D, F, L, 1+K) + 2·(1+K)·D·Dd
                          + stack_flops(Dd, Fd, Ld, 1+N) + 2·N·Dd·P), P pixels per patch:
the encoder sees the 1+K kept tokens only, the decoder all 1+N.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from maskjax import losses, masking
from maskjax.errors import ConfigError
from maskjax.methods import Method, image_batch_spec, image_example_batch, stack_flops
from maskjax.models import vit


def loss(
    model: vit.Mae, batch: dict, key: jax.Array, config: Any, *, train: bool, extras: Any = None
) -> tuple[jax.Array, dict]:
    cfg, m = model.cfg, config.masking
    images = batch["image"]  # (B, H, W, C), normalised
    k_mask, k_drop = jax.random.split(key)
    mask = masking.mae_random_mask(k_mask, images.shape[0], cfg.num_patches, m.ratio)
    out = model(images, mask.ids_keep, mask.ids_restore, dropout_key=k_drop if train else None)
    value = losses.mae_loss(out["pred"], vit.patchify(images, cfg.patch_size), mask.mask, m.norm_pix_loss)
    return value, {"loss": value}


batch_spec = image_batch_spec  # the global batch's shapes, for ahead-of-time compiles


def features(model: vit.Mae, images: jax.Array) -> jax.Array:
    """(B, D): the encoder on every patch, [CLS] after the final norm (what MAE's linear probe reads)."""
    ids = jnp.broadcast_to(jnp.arange(model.cfg.num_patches), (images.shape[0], model.cfg.num_patches))
    return model.encode(images, ids)[:, 0]


def flops(config: Any, model_cfg: vit.MaeConfig) -> int:
    """Model FLOPs of one train step; formula in the module docstring."""
    c = model_cfg
    n = c.num_patches
    k = masking.mae_num_keep(n, config.masking.ratio)
    forward = (
        2 * k * c.patch_dim * c.hidden
        + stack_flops(c.hidden, c.mlp_dim, c.layers, 1 + k)
        + 2 * (1 + k) * c.hidden * c.decoder_hidden
        + stack_flops(c.decoder_hidden, c.decoder_mlp_dim, c.decoder_layers, 1 + n)
        + 2 * n * c.decoder_hidden * c.patch_dim
    )
    return config.global_batch_size * 3 * forward


def savings(config: Any, model_cfg: vit.MaeConfig) -> dict[str, dict[str, Any]]:
    """The encoder on N−1 of the N patches (a ratio of 1/(2N), the smallest that still masks one):
    the cost of encoding mask tokens with the visible patches, MAE Table 2's "encoder w/ [M]"."""
    return {"encoder on every patch": {"masking.ratio": 0.5 / model_cfg.num_patches}}


def describe_masking(config: Any, model_cfg: vit.MaeConfig) -> dict[str, Any]:
    # Uniform random patches, a fixed number per image (He et al. 2022, Sec. 3).
    n, ratio = model_cfg.num_patches, config.masking.ratio
    return {"strategy": "random", "ratio": ratio, "max_predictions": n - masking.mae_num_keep(n, ratio)}


def validate(config: Any, model_cfg: vit.MaeConfig) -> None:
    m = config.get("masking") or {}
    ratio = m.get("ratio")
    if not isinstance(ratio, int | float) or not 0.0 < ratio < 1.0:
        raise ConfigError(f"masking.ratio must be in (0, 1); got {ratio!r}")
    try:
        masking.mae_num_keep(model_cfg.num_patches, ratio)
    except ValueError as e:  # keeps no patch
        raise ConfigError(f"masking.ratio: {e}") from None
    if not isinstance(m.get("norm_pix_loss"), bool):
        raise ConfigError(f"masking.norm_pix_loss must be True or False; got {m.get('norm_pix_loss')!r}")


MAE = Method(
    name="mae",
    model="mae",
    data="image",
    loss=loss,
    batch_spec=batch_spec,
    flops=flops,
    describe_masking=describe_masking,
    validate=validate,
    evaluators=("mae_reconstruction",),
    features=features,
    example_batch=image_example_batch,
    savings=savings,
)
