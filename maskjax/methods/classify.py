"""Image classification on a ViT encoder that MAE (or an earlier fine-tuning) trained: the transfer
half of He et al. 2022. Two methods over one model (`models.vit.Vit`), each `init` from a checkpoint:

  fine-tuning    every weight trains (AdamW, layer-wise lr decay, drop path: MAE Table 9).
                 mixup/cutmix on device  ->  Vit(mixed images)  ->  soft-target cross-entropy
                 against label-smoothed, mixed one-hot targets (timm's Mixup, mode "batch").
  linear probe   the encoder is frozen: no gradient flows into it and its optimizer state is empty
                 (`roles`). Its [CLS] feature passes BatchNorm without affine parameters, then a
                 linear head (MAE Table 10: LARS, base lr 0.1, no mixup, no label smoothing).

The probe's BatchNorm keeps running statistics as parameters of role "running_stat", whose update is
−gradient (maskjax.optim). Its loss adds ½(1−m)·‖r − sg(b)‖² for the running value r and the batch's
statistic b, with zero value but gradient (1−m)(r − b), so each step makes r ← m·r + (1−m)·b:
PyTorch's BatchNorm1d average (m = 0.9), inside the one jitted step, checkpointed with the rest.

config.task: label_smoothing ε, mixup α, cutmix α, switch_prob (cutmix instead of mixup when both
are on), mix_prob (how often a batch is mixed at all). The labels come with the images ("label").

FLOPs per step (fine-tuning) = B · 3 · (2·N·P·D + stack_flops(D, F, L, 1+N) + 2·D·C); the probe runs
the encoder forward only: B · (2·N·P·D + stack_flops(D, F, L, 1+N) + 3·2·D·C).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maskjax import losses
from maskjax.errors import ConfigError
from maskjax.methods import Method, image_batch_spec, image_example_batch, no_masking, stack_flops
from maskjax.models import vit

BN_MOMENTUM = 0.9  # r ← m·r + (1−m)·b: torch.nn.BatchNorm1d's default momentum 0.1, in its sense


def mix(key: jax.Array, images: jax.Array, targets: jax.Array, task: Any) -> tuple[jax.Array, jax.Array]:
    """timm's Mixup in mode "batch": one λ for the whole batch, mixed with the batch reversed.

    images (B, H, W, C), targets (B, K) soft labels. With probability mix_prob the batch is mixed: by
    cutmix (with probability switch_prob when both are on) a box of area ≈ (1−λ)·H·W, λ ~ Beta(α_c, α_c),
    is pasted from the reversed batch and λ becomes the exact area kept; else mixup blends all pixels,
    λ ~ Beta(α_m, α_m). Targets mix with the same λ. Static shapes: the box is a mask of comparisons.
    """
    k_apply, k_switch, k_mixup, k_cutmix, k_y, k_x = jax.random.split(key, 6)
    b, h, w, _ = images.shape
    use_mixup, use_cutmix = task.mixup > 0, task.cutmix > 0
    if not (use_mixup or use_cutmix):
        return images, targets
    cutmix = jax.random.uniform(k_switch) < task.switch_prob if use_mixup and use_cutmix else use_cutmix
    lam_mixup = jax.random.beta(k_mixup, task.mixup, task.mixup) if use_mixup else 1.0
    lam_cutmix = jax.random.beta(k_cutmix, task.cutmix, task.cutmix) if use_cutmix else 1.0
    # Cutmix box (timm rand_bbox): sides ⌊H·√(1−λ)⌋, ⌊W·√(1−λ)⌋ around a uniform centre, clipped.
    cut = jnp.sqrt(1.0 - lam_cutmix)
    cut_h, cut_w = (h * cut).astype(jnp.int32), (w * cut).astype(jnp.int32)
    cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)).astype(images.dtype)[None, :, :, None]
    lam_box = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    other = images[::-1]
    mixed = jnp.where(cutmix, images * (1 - box) + other * box, lam_mixup * images + (1 - lam_mixup) * other)
    lam = jnp.where(cutmix, lam_box, lam_mixup)
    apply = jax.random.uniform(k_apply) < task.mix_prob
    lam = jnp.where(apply, lam, 1.0).astype(jnp.float32)
    images = jnp.where(apply, mixed, images)
    return images, lam * targets + (1 - lam) * targets[::-1]


def smoothed_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """(B,) int -> (B, K): 1 − ε + ε/K on the label, ε/K elsewhere (timm's mixup_target)."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def finetune_loss(
    model: Any, batch: dict, key: jax.Array, config: Any, *, train: bool, extras: Any = None
) -> tuple[jax.Array, dict]:
    images, labels = batch["image"], batch["label"].astype(jnp.int32)
    if not train:
        return _held_out(model, images, labels)
    k_mix, k_drop = jax.random.split(key)
    targets = smoothed_targets(labels, model.cfg.num_classes, config.task.label_smoothing)
    images, targets = mix(k_mix, images, targets, config.task)
    logits = model.classify(images, dropout_key=k_drop)
    loss = losses.soft_cross_entropy(logits, targets)
    return loss, {"loss": loss, "accuracy": _accuracy(logits, labels)}


def probe_loss(
    model: vit.Vit, batch: dict, key: jax.Array, config: Any, *, train: bool, extras: Any = None
) -> tuple[jax.Array, dict]:
    images, labels = batch["image"], batch["label"].astype(jnp.int32)
    if not train:
        return _held_out(model, images, labels)
    features = jax.lax.stop_gradient(model.features(images)).astype(jnp.float32)  # the frozen encoder
    loss_extra = 0.0
    stats = None
    if model.cfg.head_norm == "batchnorm":
        mean, var = features.mean(0), features.var(0)
        stats = (mean, var)
        n = features.shape[0]
        running = ((model.head_bn_mean[...], mean), (model.head_bn_var[...], var * n / max(n - 1, 1)))
        ema = sum(
            0.5 * (1 - BN_MOMENTUM) * jnp.sum(jnp.square(r - jax.lax.stop_gradient(b))) for r, b in running
        )
        loss_extra = ema - jax.lax.stop_gradient(ema)  # value 0; gradient (1−m)(r − b): the average's step
    logits = model.logits(features, stats)
    loss = losses.masked_cross_entropy(logits, labels, jnp.ones(labels.shape, jnp.float32))
    return loss + loss_extra, {"loss": loss, "accuracy": _accuracy(logits, labels)}


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return losses.masked_accuracy(logits, labels, jnp.ones(labels.shape, jnp.float32))


def _held_out(model: vit.Vit, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
    logits = model.classify(images)  # no mixing, no dropout; a probe's BatchNorm: its running statistics
    loss = losses.masked_cross_entropy(logits, labels, jnp.ones(labels.shape, jnp.float32))
    return loss, {"loss": loss, "accuracy": _accuracy(logits, labels)}


def batch_spec(config: Any, model_cfg: vit.VitConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """{"image": (B, H, W, C) float32, "label": (B,) int32}."""
    spec = image_batch_spec(config, model_cfg)
    return {**spec, "label": jax.ShapeDtypeStruct((config.global_batch_size,), jnp.int32)}


def example_batch(config: Any, model_cfg: vit.VitConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Unit-normal pixels and uniform labels."""
    labels = rng.integers(0, model_cfg.num_classes, (config.global_batch_size,), dtype=np.int32)
    return {**image_example_batch(config, model_cfg, rng), "label": labels}


def _encoder_forward(c: vit.VitConfig) -> int:
    n = c.num_patches
    return 2 * n * c.patch_dim * c.hidden + stack_flops(c.hidden, c.mlp_dim, c.layers, 1 + n)


def finetune_flops(config: Any, model_cfg: vit.VitConfig) -> int:
    """Model FLOPs of one fine-tuning step; formula in the module docstring."""
    c = model_cfg
    return config.global_batch_size * 3 * (_encoder_forward(c) + 2 * c.hidden * c.num_classes)


def probe_flops(config: Any, model_cfg: vit.VitConfig) -> int:
    """Model FLOPs of one probe step: the frozen encoder forward only, the head forward + backward."""
    c = model_cfg
    return config.global_batch_size * (_encoder_forward(c) + 3 * 2 * c.hidden * c.num_classes)


def probe_roles(config: Any, params: dict) -> dict:
    """The head trains, the BatchNorm statistics average, everything else (the encoder) is frozen."""

    def role(path: str, leaf: Any) -> str:
        if path.startswith("head_bn_"):
            return "running_stat"
        return "train" if path == "head" else "frozen"

    return {k: jax.tree.map(lambda x, k=k: role(k, x), v) for k, v in params.items()}


def init_weights(family: str, params: dict, model_cfg: vit.VitConfig) -> dict:
    """The weights a checkpoint of `family` gives this ViT: an MAE encoder, or a ViT's without its head."""
    if family == "mae":
        return vit.encoder_from_mae(params, model_cfg)
    if family == "vit":
        return {k: v for k, v in params.items() if k != "head" and not k.startswith("head_bn_")}
    raise ConfigError(
        f"init: a {family!r} checkpoint has no ViT encoder to classify with; give an MAE or ViT one"
    )


def _validate(config: Any, model_cfg: vit.VitConfig) -> None:
    if model_cfg.num_classes < 1:
        raise ConfigError(
            f"model.num_classes must be the number of classes (> 0); got {model_cfg.num_classes}"
        )
    task = config.get("task")
    if task is None:
        raise ConfigError("task is missing from the config (label_smoothing, mixup, cutmix, ...)")
    ranges = {"label_smoothing": (0.0, 1.0), "switch_prob": (0.0, 1.0), "mix_prob": (0.0, 1.0)}
    for key, (lo, hi) in ranges.items():
        value = task.get(key)
        if not isinstance(value, int | float) or not lo <= value <= hi:
            raise ConfigError(f"task.{key} must be in [{lo}, {hi}]; got {value!r}")
    for key in ("mixup", "cutmix"):
        value = task.get(key)
        if not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"task.{key} must be a Beta α >= 0 (0: off); got {value!r}")


def validate_probe(config: Any, model_cfg: vit.VitConfig) -> None:
    _validate(config, model_cfg)
    task = config.task
    if task.mixup or task.cutmix or task.label_smoothing:
        raise ConfigError(
            "a linear probe trains on plain labels: set task.mixup, task.cutmix and task.label_smoothing to 0"
        )
    if model_cfg.drop_path or model_cfg.dropout:
        raise ConfigError("a linear probe's encoder is frozen: set model.drop_path and model.dropout to 0")


FINETUNE = Method(
    name="image_classification",
    model="vit",
    data="image",
    loss=finetune_loss,
    batch_spec=batch_spec,
    flops=finetune_flops,
    describe_masking=no_masking,
    validate=_validate,
    evaluators=("top1",),
    init_weights=init_weights,
    task="finetune",
    features=lambda model, images: model.features(images),
    logits=lambda model, batch: model.classify(batch["image"]),
    example_batch=example_batch,
)

PROBE = Method(
    name="linear_probe",
    model="vit",
    data="image",
    loss=probe_loss,
    batch_spec=batch_spec,
    flops=probe_flops,
    describe_masking=no_masking,
    validate=validate_probe,
    evaluators=("top1",),
    init_weights=init_weights,
    roles=probe_roles,
    task="probe",
    features=lambda model, images: model.features(images),
    logits=lambda model, batch: model.classify(batch["image"]),
    example_batch=example_batch,
)


# ------------------------------------------------------------------ BEiT (Bao et al. 2022, Sec. 3.1)


def beit_flops(config: Any, model_cfg: Any) -> int:
    """As `finetune_flops`, for BEiT's encoder (relative position bias and layer scale cost no matmul)."""
    c, n = model_cfg, model_cfg.num_patches
    patch_dim = c.patch_size * c.patch_size * c.channels
    forward = 2 * n * patch_dim * c.hidden + stack_flops(c.hidden, c.mlp_dim, c.layers, 1 + n)
    return config.global_batch_size * 3 * (forward + 2 * c.hidden * c.num_classes)


def beit_init_weights(family: str, params: dict, model_cfg: Any) -> dict:
    """A BEiT checkpoint's encoder; its final LayerNorm and visual-token head are reported unused."""
    if family != "beit":
        raise ConfigError(f"init: a {family!r} checkpoint has no BEiT encoder; give a BEiT one")
    return params


# BEiT fine-tuning: the same recipe and loss on the BEiT encoder, mean-pooled patch tokens + LayerNorm.
# Simplification: the pre-training's one shared relative position bias stays shared (BEiT's fine-tuning
# copies it into every layer first).
BEIT_FINETUNE = dataclasses.replace(
    FINETUNE,
    name="beit_classification",
    model="beit",
    flops=beit_flops,
    init_weights=beit_init_weights,
    features=None,
)
