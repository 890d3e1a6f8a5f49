"""MAE after training: held-out reconstruction error beside a trivial baseline, and a figure.

The baseline predicts every masked patch as the average patch of the same images, in the loss's
target space, so "better than the baseline" means the model uses the visible patches.
"""

from __future__ import annotations

import io
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from maskjax import losses, masking
from maskjax.models import vit


def reconstruct(
    model: vit.Mae, images: jax.Array, key: jax.Array, mask_ratio: float, norm_pix_loss: bool
) -> dict[str, jax.Array]:
    """Masked-patch MSE, the mean-patch baseline's MSE, and the images for a figure."""
    cfg = model.cfg
    m = masking.mae_random_mask(key, images.shape[0], cfg.num_patches, mask_ratio)
    pred = model(images, m.ids_keep, m.ids_restore)["pred"].astype(jnp.float32)
    target = vit.patchify(images, cfg.patch_size)
    if norm_pix_loss:  # the loss's target space; show pixels by undoing the per-patch normalisation
        normalized = losses.normalized_pixels(target)
        mean = target.mean(-1, keepdims=True)
        std = jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
        shown = pred * std + mean
    else:
        normalized, shown = target, pred
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


def figure(out: dict, mean: np.ndarray, std: np.ndarray, path: epath.Path, n: int = 8) -> None:
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


def mae_reconstruction(
    trainer: Any, params: dict, config: ml_collections.ConfigDict, workdir: epath.Path
) -> dict:
    """Held-out reconstruction loss beside the mean-patch baseline; writes mae_reconstructions.png."""
    from maskjax.data import image_datasets, loaders

    batch = loaders.first_batches(config, "eval", config.eval_batches)
    model = nnx.merge(trainer.graphdef, params)
    key = jax.random.fold_in(jax.random.key(config.seed), 2)  # a stream of its own
    m = config.masking
    run = jax.jit(lambda mdl, x, k: reconstruct(mdl, x, k, m.ratio, m.norm_pix_loss))
    out = run(model, jnp.asarray(batch["image"]), key)
    result = {"eval_reconstruction_loss": float(out["loss"]), "mean_patch_baseline": float(out["baseline"])}
    mean, std = image_datasets.normalization(config.data.dataset, loaders.data_dir(config.data))
    path = epath.Path(workdir) / "mae_reconstructions.png"
    figure(out, np.asarray(mean, np.float32), np.asarray(std, np.float32), path)
    result["figure"] = str(path)
    print(
        f"MAE held-out reconstruction loss (masked patches): {result['eval_reconstruction_loss']:.4f}   "
        f"predict-the-mean-patch baseline: {result['mean_patch_baseline']:.4f}\n"
        f"figure (originals / masked / reconstructions): {path}",
        flush=True,
    )
    return result
