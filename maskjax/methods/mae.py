"""MAE (He et al. 2022): mask 75% of the patches at random, encode only the visible
ones, decode all of them, and regress the pixels of the masked patches.

  masking  masking.mae_random_mask       per-sample noise -> argsort -> keep int(N·(1−r))
  model    models.vit.Mae                encoder on (B, 1+K, D), narrow decoder on (B, 1+N, Dd)
  loss     losses.mae_loss               MSE on masked patches, optionally per-patch normalised
"""

from __future__ import annotations

import io
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from maskjax import losses, masking
from maskjax.methods import image_batch_spec
from maskjax.models import vit


def loss(
    model: vit.Mae, batch: dict, key: jax.Array, config: Any, *, train: bool, extras: Any = None
) -> tuple[jax.Array, dict]:
    cfg = model.cfg
    images = batch["image"]  # (B, H, W, C), normalised
    k_mask, k_drop = jax.random.split(key)
    m = masking.mae_random_mask(k_mask, images.shape[0], cfg.num_patches, cfg.mask_ratio)
    out = model(images, m.ids_keep, m.ids_restore, dropout_key=k_drop if train else None)
    value = losses.mae_loss(out["pred"], vit.patchify(images, cfg.patch_size), m.mask, cfg.norm_pix_loss)
    return value, {"loss": value}


batch_spec = image_batch_spec  # the global batch's shapes, for ahead-of-time compiles


def reconstruct(model: vit.Mae, images: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
    """Masked-patch MSE, the mean-patch baseline's MSE, and the images for a figure."""
    cfg = model.cfg
    m = masking.mae_random_mask(key, images.shape[0], cfg.num_patches, cfg.mask_ratio)
    pred = model(images, m.ids_keep, m.ids_restore)["pred"].astype(jnp.float32)
    target = vit.patchify(images, cfg.patch_size)
    if cfg.norm_pix_loss:  # the loss's target space; show pixels by undoing the per-patch normalisation
        normalized = losses.normalized_pixels(target)
        mean = target.mean(-1, keepdims=True)
        std = jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
        shown = pred * std + mean
    else:
        normalized, shown = target, pred
    # Baseline: every masked patch predicted as the average patch of these images, in the same target space.
    mean_patch = jnp.broadcast_to(normalized.mean((0, 1), keepdims=True), normalized.shape)
    keep = (1.0 - m.mask)[..., None]
    grid = (cfg.grid_size, cfg.grid_size)
    return {
        "loss": losses.mae_loss(pred, normalized, m.mask),
        "baseline": losses.mae_loss(mean_patch, normalized, m.mask),
        "original": images,
        "masked": vit.unpatchify(target * keep, cfg.patch_size, grid),
        "reconstruction": vit.unpatchify(shown * (1 - keep) + target * keep, cfg.patch_size, grid),
    }


def _figure(out: dict, mean: np.ndarray, std: np.ndarray, path: epath.Path, n: int = 8) -> None:
    """Rows: originals / masked inputs / reconstructions with the visible patches pasted (MAE Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ("original", "masked", "reconstruction")
    n = min(n, out["original"].shape[0])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.4 * len(rows)), squeeze=False)
    for r, name in enumerate(rows):
        pixels = np.clip(np.asarray(out[name][:n]) * std + mean, 0.0, 1.0)
        for i in range(n):
            ax = axes[r, i]
            img = pixels[i]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    path.write_bytes(buffer.getvalue())  # also on gs://


def report(trainer: Any, state: dict, config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
    """After training: held-out reconstruction loss beside the mean-patch baseline, and a figure."""
    from maskjax.data import image_datasets, loaders

    batch = loaders.first_batches(config, "eval", config.get("eval_batches", 4))
    model = nnx.merge(trainer.graphdef, jax.device_get(state["params"]))
    key = jax.random.fold_in(jax.random.key(config.seed), 2)  # a stream of its own
    out = jax.jit(reconstruct)(model, jnp.asarray(batch["image"]), key)
    result = {"eval_reconstruction_loss": float(out["loss"]), "mean_patch_baseline": float(out["baseline"])}
    mean, std = image_datasets.normalization(config.data.dataset, loaders.data_dir(config.data))
    figure = epath.Path(workdir) / "mae_reconstructions.png"
    _figure(out, np.asarray(mean, np.float32), np.asarray(std, np.float32), figure)
    result["figure"] = str(figure)
    (epath.Path(workdir) / "report.json").write_text(json.dumps(result, indent=2))
    print(
        f"MAE held-out reconstruction loss (masked patches): {result['eval_reconstruction_loss']:.4f}   "
        f"predict-the-mean-patch baseline: {result['mean_patch_baseline']:.4f}\n"
        f"figure (originals / masked / reconstructions): {figure}",
        flush=True,
    )
    return result
