"""MAE after training: held-out reconstruction error beside a trivial baseline, and a figure.

The baseline predicts every masked patch as the average patch of the same images, in the loss's
target space, so "better than the baseline" means the model uses the visible patches. The figure is
MAE's Figure 2: original | masked | reconstruction | reconstruction with the visible patches pasted
back. `from_workdir` draws it for any MAE checkpoint (`maskjax reconstruct`); for a BEiT checkpoint
it draws the masked-token accuracy map instead: original | masked | each masked patch green where
BEiT's top visual token is the tokenizer's, red where it is not.
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
        "reconstruction": vit.unpatchify(shown, cfg.patch_size, grid),
        "pasted": vit.unpatchify(shown * (1 - keep) + target * keep, cfg.patch_size, grid),
    }


def beit_accuracy(model: Any, tokenizer: Any, images: jax.Array, key: jax.Array, m: Any) -> dict:
    """BEiT's prediction of the tokenizer's visual tokens at a fresh block mask (the run's sampler):
    {"accuracy": over the masked patches, "mask", "correct": (B, N) bool, "original", "masked"}."""
    cfg = model.cfg
    codes = tokenizer.encode(images)  # (B, N)
    sample = masking.beit_unilm_mask if m.get("sampler", "unilm") == "unilm" else masking.beit_block_mask
    mask = sample(key, images.shape[0], grid=cfg.grid, num_masked=m.num_masked, min_block=m.min_block)
    predicted = jnp.argmax(model(images, mask)["logits"], -1)  # (B, N): every patch's top token
    correct = (predicted == codes) & mask
    patches = vit.patchify(images, cfg.patch_size)
    masked = vit.unpatchify(patches * (1 - mask[..., None]), cfg.patch_size, cfg.grid)
    accuracy = correct.sum() / jnp.maximum(mask.sum(), 1)
    return {"accuracy": accuracy, "mask": mask, "correct": correct, "original": images, "masked": masked}


def accuracy_figure(out: dict, mean: np.ndarray, std: np.ndarray, patch: int, path: epath.Path) -> None:
    """Rows: originals / masked inputs / the masked patches green (right token) or red (wrong) over the
    image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = out["original"].shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n, 1.4 * 3), squeeze=False)
    for r, name in enumerate(("original", "masked")):
        pixels = np.clip(np.asarray(out[name]) * std + mean, 0.0, 1.0)
        for i in range(n):
            img = pixels[i]
            axes[r, i].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
    grey = np.clip(np.asarray(out["original"]) * std + mean, 0.0, 1.0).mean(-1, keepdims=True)
    h = grey.shape[1] // patch
    for i in range(n):
        mask = np.asarray(out["mask"][i]).reshape(h, h).repeat(patch, 0).repeat(patch, 1)[..., None]
        right = np.asarray(out["correct"][i]).reshape(h, h).repeat(patch, 0).repeat(patch, 1)[..., None]
        colour = np.where(right, [0.1, 0.8, 0.2], [0.9, 0.15, 0.1])
        axes[2, i].imshow(np.where(mask, 0.35 * grey[i] + 0.65 * colour, 0.5 * grey[i]))
    for r, title in enumerate(("original", "masked", "top-1 token")):
        axes[r, 0].set_ylabel(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    path.write_bytes(buffer.getvalue())


def figure(out: dict, mean: np.ndarray, std: np.ndarray, path: epath.Path, n: int = 8) -> None:
    """Rows: originals / masked inputs / reconstructions / the same with the visible patches pasted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ("original", "masked", "reconstruction", "pasted")
    titles = {"pasted": "+ visible"}
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
        axes[r, 0].set_ylabel(titles.get(name, name), fontsize=8)
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
        f"figure (originals / masked / reconstructions / with the visible patches): {path}",
        flush=True,
    )
    return result


def from_workdir(
    workdir: str,
    out: str | None = None,
    *,
    mask_ratio: float | None = None,
    n: int = 8,
    dataset: str | None = None,
    split: str | None = None,
    data_dir: str | None = None,
    step: int | None = None,
    seed: int = 0,
) -> dict:
    """Figure 2 for `n` held-out images of an MAE checkpoint (trained here or imported); the masked-patch
    loss and the mean-patch baseline over them. Data, split and mask ratio default to the run's own
    (WORKDIR/config.json); an imported checkpoint names its dataset. A BEiT workdir gives its
    masked-token accuracy map and accuracy (its tokenizer: the run's masking.tokenizer_workdir)."""
    import json

    from maskjax import defaults, infer
    from maskjax.data import image_datasets, loaders

    model, cfg = infer.load(workdir, ("mae", "beit"), step)
    saved = epath.Path(workdir) / "config.json"
    if not isinstance(cfg, vit.MaeConfig):
        return _beit_from_workdir(workdir, model, saved, out, n, dataset, split, data_dir, seed)
    if saved.exists():  # the run's own data and masking
        config = ml_collections.ConfigDict(json.loads(saved.read_text()))
    elif dataset is None:
        raise ValueError(
            f"{workdir} has no config.json (an imported checkpoint?): name the images with --dataset"
        )
    else:
        config = defaults.base("mae")
    for key, value in dict(dataset=dataset, eval_split=split, data_dir=data_dir).items():
        if value is not None:
            config.data[key] = value
    config.data.image_size = cfg.image_size
    ratio = mask_ratio if mask_ratio is not None else config.get("masking", {}).get("ratio", 0.75)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"--mask-ratio={ratio} is invalid: must be in (0, 1)")
    source, transform = loaders.source_and_transform(config, "eval")
    images = np.stack([transform(source[i])["image"] for i in range(min(n, len(source)))])
    norm_pix = bool(config.get("masking", {}).get("norm_pix_loss", False))
    run_fn = jax.jit(lambda mdl, x, k: reconstruct(mdl, x, k, ratio, norm_pix))
    result = run_fn(model, jnp.asarray(images), jax.random.key(seed))
    mean, std = image_datasets.normalization(config.data.dataset, loaders.data_dir(config.data))
    path = epath.Path(out) if out else epath.Path(workdir) / "reconstructions.png"
    figure(result, np.asarray(mean, np.float32), np.asarray(std, np.float32), path, n=len(images))
    return {
        "reconstruction_loss": float(result["loss"]),
        "mean_patch_baseline": float(result["baseline"]),
        "images": len(images),
        "mask_ratio": ratio,
        "figure": str(path),
    }


def _beit_from_workdir(workdir, model, saved, out, n, dataset, split, data_dir, seed) -> dict:
    import json

    from maskjax.data import image_datasets, loaders
    from maskjax.methods import beit as beit_method

    if not saved.exists():
        raise ValueError(f"{workdir} has no config.json: a BEiT map needs the run's tokenizer and masking")
    config = ml_collections.ConfigDict(json.loads(saved.read_text()))
    for key, value in dict(dataset=dataset, eval_split=split, data_dir=data_dir).items():
        if value is not None:
            config.data[key] = value
    graphdef, _, params = beit_method._tokenizer(config.masking.tokenizer_workdir)
    tokenizer = nnx.merge(graphdef, jax.device_get(params))  # beside the model, on one device
    source, transform = loaders.source_and_transform(config, "eval")
    images = np.stack([transform(source[i])["image"] for i in range(min(n, len(source)))])
    m = config.masking
    run_fn = jax.jit(lambda mdl, tok, x, k: beit_accuracy(mdl, tok, x, k, m))
    result = run_fn(model, tokenizer, jnp.asarray(images), jax.random.key(seed))
    mean, std = image_datasets.normalization(config.data.dataset, loaders.data_dir(config.data))
    path = epath.Path(out) if out else epath.Path(workdir) / "reconstructions.png"
    accuracy_figure(
        result, np.asarray(mean, np.float32), np.asarray(std, np.float32), model.cfg.patch_size, path
    )
    return {
        "masked_token_accuracy": float(result["accuracy"]),
        "masked_patches": int(result["mask"].sum()),
        "images": len(images),
        "figure": str(path),
    }
