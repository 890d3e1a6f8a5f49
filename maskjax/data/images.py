"""Host-side image transforms (numpy + PIL), each random one driven by an explicit np.random.Generator.

Images are uint8 (H, W, C) until `normalize`, which gives float32 (H, W, C); the
loader stacks examples into NHWC batches and the models patchify on device
(`maskjax.models.beit.patchify`: (B, H, W, C) -> (B, N, p·p·C), patches row-major,
pixels in (row, column, channel) order), so H and W must be multiples of the patch.

Training (MAE, He et al. 2022, appendix A.1 / Table 8: "RandomResizedCrop" and
horizontal flip only; their code uses scale (0.2, 1.0), bicubic):
    random_resized_crop(scale=(0.2, 1), ratio=(3/4, 4/3)) -> horizontal_flip(p=0.5) -> normalize(mean, std)
Evaluation (MAE fine-tune / linear probe): resize the shorter side to size/crop_pct
(224/0.875 = 256), center crop `size`, normalize.

BEiT (unilm beit/datasets.py, DataAugmentationForBEiT) first applies ColorJitter(0.4, 0.4, 0.4)
to the whole image (`color_jitter`), then flip and RandomResizedCrop; a flip before or after the
crop gives the same distribution (the crop box is left-right symmetric), so one order serves both.

RandomResizedCrop follows torchvision's algorithm (Szegedy et al. 2015's "Inception"
crop): up to 10 tries of a box with area fraction ~ U(scale) and log aspect ratio
~ U(log ratio) that fits in the image, else a central crop clamped to the ratio range.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from maskjax.data.pipeline import BadRecord, Transform

# The standard ImageNet channel statistics of pixel/255 (used by MAE, BEiT and torchvision).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

Size = int | tuple[int, int]


def _hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def decode(data: Any, channels: int | None = 3) -> np.ndarray:
    """Encoded bytes (PNG, JPEG, ...) -> uint8 (H, W, channels); raises BadRecord if they are not an image.

    An already decoded uint8 array passes through (with its channel axis fixed).
    channels=None keeps the file's own: 1 for greyscale, 3 for colour.
    """
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim in (2, 3):
        img = data if data.ndim == 3 else data[:, :, None]
        return _channels(img, channels)
    if isinstance(data, np.ndarray):  # A 0-d object / bytes array, as a data source may give.
        data = data.item()
    if not isinstance(data, bytes | bytearray):
        raise BadRecord("undecodable_image", f"expected encoded bytes, got {type(data).__name__}")
    if not data:
        raise BadRecord("empty_image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # PIL decodes lazily: a truncated file fails only here.
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB" if channels != 1 else "L")
            img = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadRecord("undecodable_image", str(e)) from None
    return _channels(img if img.ndim == 3 else img[:, :, None], channels)


def _channels(img: np.ndarray, channels: int | None) -> np.ndarray:
    c = img.shape[-1]
    if channels is None or channels == c:
        return img
    if c == 1 and channels == 3:
        return np.repeat(img, 3, axis=-1)
    if c == 3 and channels == 1:  # ITU-R 601-2 luma, as PIL's convert("L").
        return np.round(img @ np.array([0.299, 0.587, 0.114])).clip(0, 255).astype(np.uint8)[:, :, None]
    raise ValueError(f"cannot turn a {c}-channel image into {channels} channels")


def resize(img: np.ndarray, size: Size, interpolation: str = "bicubic") -> np.ndarray:
    """(H, W, C) -> (h, w, C) with PIL's resampling (what torchvision uses on PIL images)."""
    h, w = _hw(size)
    resample = _RESAMPLE[interpolation]
    if img.dtype == np.uint8:
        mode_img = np.ascontiguousarray(img[:, :, 0] if img.shape[-1] == 1 else img)
        out = np.asarray(Image.fromarray(mode_img).resize((w, h), resample))
        return out.reshape(h, w, img.shape[-1])
    # Float images: PIL's "F" mode, one channel at a time.
    chans = [
        Image.fromarray(img[:, :, c].astype(np.float32)).resize((w, h), resample)
        for c in range(img.shape[-1])
    ]
    return np.stack([np.asarray(c) for c in chans], axis=-1)


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of an Inception-style crop box: area/(H·W) ~ U(scale), w/h ~ logU(ratio)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the whole image, cut down to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img: np.ndarray,
    rng: np.random.Generator,
    size: Size,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: str = "bicubic",
) -> np.ndarray:
    """Crop a random box (see `random_resized_crop_box`) and resize it to `size`: (H, W, C) -> (h, w, C)."""
    top, left, h, w = random_resized_crop_box(img.shape[0], img.shape[1], rng, scale, ratio)
    return resize(img[top : top + h, left : left + w], size, interpolation)


_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def color_jitter(img: np.ndarray, rng: np.random.Generator, strengths: Sequence[float]) -> np.ndarray:
    """torchvision's ColorJitter(brightness, contrast, saturation) on uint8 (H, W, C), as its PIL path.

    Each factor f ~ U[max(0, 1 − s), 1 + s] for strength s; the three adjustments run in a random
    order (torchvision draws a permutation per image). Brightness blends with black (x·f),
    contrast with the mean grey level, saturation with the image's greyscale (ITU-R 601 luma),
    each by PIL's ImageEnhance, clipped to [0, 255]. A zero strength skips its adjustment.
    """
    factors = [rng.uniform(max(0.0, 1.0 - s), 1.0 + s) for s in strengths]
    order = rng.permutation(len(_ENHANCERS))
    if not any(strengths):
        return img
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    for i in order:
        if strengths[i]:
            pil = _ENHANCERS[i](pil).enhance(factors[i])
    out = np.asarray(pil)
    return out[..., None] if out.ndim == 2 else out


def horizontal_flip(img: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirror left-right with probability p."""
    return img[:, ::-1] if rng.random() < p else img


def normalize(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (or float in [0, 1]) (H, W, C) -> float32 (x/255 - mean) / std, per channel."""
    x = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    # One grey-level statistic serves every channel of a grey image repeated to RGB.
    if mean.shape not in ((1,), (x.shape[-1],)) or std.shape not in ((1,), (x.shape[-1],)):
        raise ValueError(
            f"mean/std have shapes {mean.shape}/{std.shape}; the image has {x.shape[-1]} channels"
        )
    return (x - mean) / std


def resize_center_crop(
    img: np.ndarray, size: Size, crop_pct: float = 0.875, interpolation: str = "bicubic"
) -> np.ndarray:
    """Shorter side -> int(size/crop_pct), then the central `size` crop (MAE's evaluation transform)."""
    h, w = _hw(size)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct={crop_pct} must be in (0, 1]")
    short = int(max(h, w) / crop_pct)
    ih, iw = img.shape[:2]
    if ih <= iw:
        rh, rw = short, int(short * iw / ih)
    else:
        rh, rw = int(short * ih / iw), short
    img = resize(img, (rh, rw), interpolation) if (rh, rw) != (ih, iw) else img
    top, left = int(round((rh - h) / 2.0)), int(round((rw - w) / 2.0))
    return img[top : top + h, left : left + w]


def _passthrough(record: Mapping[str, Any], image_key: str) -> dict[str, np.ndarray]:
    """Keep the record's numeric fields (label, ...); strings (file names) cannot go onto devices."""
    out = {}
    for k, v in record.items():
        if k != image_key:
            a = np.asarray(v)
            if a.dtype.kind in "biuf":
                out[k] = a
    return out


def train_transform(
    size: Size,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    color_jitter_strengths: Sequence[float] = (0.0, 0.0, 0.0),
    interpolation: str = "bicubic",
    channels: int | None = None,
    image_key: str = "image",
) -> Transform:
    """record -> {"image": float32 (h, w, C), numeric fields}: decode, colour jitter (brightness,
    contrast, saturation strengths; zeros: none), RandomResizedCrop, flip, normalize."""
    if len(color_jitter_strengths) != 3 or min(color_jitter_strengths) < 0:
        raise ValueError(
            "color_jitter needs three strengths >= 0 (brightness, contrast, saturation); "
            f"got {color_jitter_strengths}"
        )
    _hw(size)
    if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
        raise ValueError(
            f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]; got {scale}, {ratio}"
        )

    def transform(record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        img = decode(record[image_key], channels)
        if any(color_jitter_strengths):  # on the whole image, before the crop, as BEiT's release
            img = color_jitter(img, rng, color_jitter_strengths)
        img = random_resized_crop(img, rng, size, scale, ratio, interpolation)
        if flip:
            img = horizontal_flip(img, rng)
        return {image_key: normalize(img, mean, std)} | _passthrough(record, image_key)

    return transform


def eval_transform(
    size: Size,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    channels: int | None = None,
    image_key: str = "image",
) -> Transform:
    """record -> {"image": float32 (h, w, C), numeric fields}: decode, resize + center crop, normalize."""

    def transform(record: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        img = resize_center_crop(decode(record[image_key], channels), size, crop_pct, interpolation)
        return {image_key: normalize(img, mean, std)} | _passthrough(record, image_key)

    return transform
