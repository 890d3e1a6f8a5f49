"""Image transforms and tfds image builders, on real images (sklearn's digits and photos, Fashion-MNIST)."""

import gzip
import io
import json
import math
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskjax.data import image_datasets as ids
from maskjax.data import images
from maskjax.data.pipeline import BadRecord, Loader

sklearn_datasets = pytest.importorskip("sklearn.datasets")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: preparing and reading must stay on this machine."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def photo() -> np.ndarray:
    """A real 427×640 colour photo bundled with scikit-learn."""
    return sklearn_datasets.load_sample_images().images[0]


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.squeeze(-1) if img.ndim == 3 and img.shape[-1] == 1 else img).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- RandomResizedCrop


def test_random_resized_crop_boxes_obey_scale_and_ratio_bounds():
    height, width = 800, 1000
    rng = np.random.default_rng(0)
    fracs, ratios = [], []
    for _ in range(2000):
        top, left, h, w = images.random_resized_crop_box(
            height, width, rng
        )  # MAE: scale (0.2, 1), ratio (3/4, 4/3)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        # w and h are rounded to integers: the bounds hold up to ±0.5 pixel on each side.
        assert (w + 0.5) * (h + 0.5) >= 0.2 * height * width and (w - 0.5) * (h - 0.5) <= height * width
        assert (w + 0.5) / (h - 0.5) >= 3 / 4 and (w - 0.5) / (h + 0.5) <= 4 / 3
        fracs.append(h * w / (height * width))
        ratios.append(w / h)
    # The whole range is used, not just a corner of it.
    assert min(fracs) < 0.22 and max(fracs) > 0.95
    assert min(ratios) < 0.77 and max(ratios) > 1.3


def test_random_resized_crop_box_distribution():
    """Area fraction ~ U(scale), log aspect ratio ~ U(log ratio) when every box fits (as torchvision)."""
    rng = np.random.default_rng(1)
    fracs = [
        np.prod(images.random_resized_crop_box(2000, 2000, rng, (0.2, 1.0), (1.0, 1.0))[2:]) / 4e6
        for _ in range(3000)
    ]
    assert abs(np.mean(fracs) - 0.6) < 0.015 and abs(np.std(fracs) - 0.8 / math.sqrt(12)) < 0.015
    logr = [
        np.log(w / h)
        for *_, h, w in (
            images.random_resized_crop_box(2000, 2000, rng, (0.01, 0.01), (0.5, 2.0)) for _ in range(3000)
        )
    ]
    assert abs(np.mean(logr)) < 0.03 and abs(np.std(logr) - 2 * math.log(2) / math.sqrt(12)) < 0.03


def test_random_resized_crop_falls_back_to_a_centred_crop_within_the_ratio():
    # No box of >= 90 % of a 20×1000 strip has a ratio <= 4/3: all 10 tries fail.
    top, left, h, w = images.random_resized_crop_box(20, 1000, np.random.default_rng(0), (0.9, 1.0))
    assert (top, h) == (0, 20) and abs(w / h - 4 / 3) < 0.05 and left == (1000 - w) // 2
    top, left, h, w = images.random_resized_crop_box(1000, 20, np.random.default_rng(0), (0.9, 1.0))
    assert (left, w) == (0, 20) and abs(w / h - 3 / 4) < 0.05 and top == (1000 - h) // 2


def test_random_resized_crop_cuts_the_box_and_resizes():
    img = photo()
    box = images.random_resized_crop_box(*img.shape[:2], np.random.default_rng(5))
    top, left, h, w = box
    # Resized to its own size, the crop is exactly the box's pixels: top/left/h/w used the right way round.
    out = images.random_resized_crop(img, np.random.default_rng(5), (h, w))
    np.testing.assert_array_equal(out, img[top : top + h, left : left + w])
    out = images.random_resized_crop(img, np.random.default_rng(5), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    grey = images.random_resized_crop(img[:, :, :1].copy(), np.random.default_rng(5), (24, 16))
    assert grey.shape == (24, 16, 1)
    # Same as resizing the crop with PIL's bicubic filter (what torchvision does for PIL images).
    ref = np.asarray(
        Image.fromarray(img[top : top + h, left : left + w]).resize((32, 32), Image.Resampling.BICUBIC)
    )
    np.testing.assert_array_equal(images.random_resized_crop(img, np.random.default_rng(5), 32), ref)


def test_random_resized_crop_matches_torchvision():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    img = photo()
    top, left, h, w = images.random_resized_crop_box(*img.shape[:2], np.random.default_rng(3))
    ref = tvf.resized_crop(Image.fromarray(img), top, left, h, w, [48, 48], InterpolationMode.BICUBIC)
    np.testing.assert_array_equal(
        images.random_resized_crop(img, np.random.default_rng(3), 48), np.asarray(ref)
    )


# ------------------------------------------------------------------------ flip, normalize, eval crop, decode


def test_flip_normalize_and_center_crop():
    img = photo()
    flips = [images.horizontal_flip(img, np.random.default_rng(s)) for s in range(40)]
    flipped = [f is not img for f in flips]
    assert 10 < sum(flipped) < 30  # p = 0.5
    np.testing.assert_array_equal(next(f for f in flips if f is not img), img[:, ::-1])

    x = images.normalize(img, images.IMAGENET_MEAN, images.IMAGENET_STD)
    assert x.dtype == np.float32
    np.testing.assert_allclose(
        x[10, 20], (img[10, 20] / 255 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225], rtol=1e-5
    )
    with pytest.raises(ValueError, match="channels"):
        images.normalize(img, (0.5, 0.5), (0.2, 0.2))

    # 256×256 -> shorter side int(224/0.875) = 256 (no resize) -> the central 224 crop.
    sq = img[:256, :256]
    np.testing.assert_array_equal(images.resize_center_crop(sq, 224), sq[16:240, 16:240])
    out = images.resize_center_crop(img, 224)  # 427×640 -> 256×383 -> 224×224
    assert out.shape == (224, 224, 3)
    const = np.full((300, 500, 3), 77, np.uint8)
    np.testing.assert_array_equal(images.resize_center_crop(const, 64), np.full((64, 64, 3), 77, np.uint8))


def test_decode_good_and_bad_bytes():
    img = photo()[:50, :60]
    np.testing.assert_array_equal(images.decode(png(img)), img)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG")
    assert images.decode(buf.getvalue()).shape == (50, 60, 3)
    grey = img[:, :, :1].copy()
    np.testing.assert_array_equal(images.decode(png(grey), channels=None), grey)
    np.testing.assert_array_equal(images.decode(png(grey), channels=3), np.repeat(grey, 3, -1))
    with pytest.raises(BadRecord) as e:
        images.decode(b"this is not an image")
    assert e.value.reason == "undecodable_image"
    with pytest.raises(BadRecord) as e:
        images.decode(png(img)[:200])  # truncated file: PIL fails only when it decodes the pixels
    assert e.value.reason == "undecodable_image"
    with pytest.raises(BadRecord) as e:
        images.decode(b"")
    assert e.value.reason == "empty_image"


def test_train_and_eval_transforms():
    record = {"image": png(photo()), "label": np.int64(3), "file_name": b"x.jpg"}
    mean, std = images.IMAGENET_MEAN, images.IMAGENET_STD
    train = images.train_transform(32, mean, std)
    a = train(record, np.random.default_rng(0))
    assert (
        a["image"].shape == (32, 32, 3) and a["image"].dtype == np.float32 and np.isfinite(a["image"]).all()
    )
    assert a["label"] == 3 and "file_name" not in a  # strings cannot go to devices
    np.testing.assert_array_equal(a["image"], train(record, np.random.default_rng(0))["image"])
    assert not np.array_equal(a["image"], train(record, np.random.default_rng(1))["image"])
    ev = images.eval_transform(32, mean, std)(record, None)
    expected = images.normalize(images.resize_center_crop(photo(), 32), mean, std)
    np.testing.assert_array_equal(ev["image"], expected)
    # A grey dataset fed to a 3-channel model: one mean/std for all channels.
    grey = {"image": png(photo()[:, :, :1].copy()), "label": 1}
    out = images.train_transform(16, (0.5,), (0.25,), channels=3)(grey, np.random.default_rng(0))
    assert out["image"].shape == (16, 16, 3)
    np.testing.assert_array_equal(out["image"][..., 0], out["image"][..., 2])


def test_pipeline_images_are_nhwc_for_the_models_patchify():
    from maskjax.models.beit import patchify

    src = [{"image": png(photo()), "label": i} for i in range(4)]
    batch = next(
        Loader(
            src,
            global_batch=4,
            seed=0,
            transform=images.train_transform(16, images.IMAGENET_MEAN, images.IMAGENET_STD),
            process_index=0,
            process_count=1,
        )
    )
    assert batch["image"].shape == (4, 16, 16, 3)
    patches = np.asarray(patchify(batch["image"], 4))  # (B, 16 patches, 4·4·3)
    np.testing.assert_array_equal(patches[:, 1], batch["image"][:, 0:4, 4:8].reshape(4, -1))


# ----------------------------------------------------------------------------- tfds builders


def test_digits_prepared_and_read_back_without_network(tmp_path, no_network):
    builder = ids.prepare("digits", tmp_path)
    train, val = (
        ids.open_source("digits", "train", tmp_path),
        ids.open_source("digits", "validation", tmp_path),
    )
    assert (len(train), len(val)) == (1500, 297)
    d = sklearn_datasets.load_digits()
    want = np.round(d.images * 255 / 16).astype(np.uint8)
    for src, offset in ((train, 0), (val, 1500)):
        seen = set()
        for i in range(0, len(src), 7):
            r = src[i]
            k = int(r["index"])
            assert r["image"].dtype == np.uint8 and r["image"].shape == (8, 8, 1)
            np.testing.assert_array_equal(r["image"][:, :, 0], want[offset + k])
            assert r["label"] == d.target[offset + k]
            seen.add(k)
        assert len(seen) == len(range(0, len(src), 7))
    # Channel statistics of the train split, for normalization.
    mean, std = ids.normalization("digits", tmp_path)
    np.testing.assert_allclose(mean, [want[:1500].mean() / 255], rtol=1e-9)
    np.testing.assert_allclose(std, [(want[:1500] / 255).std()], rtol=1e-9)
    assert ids.prepare_skipped("digits", tmp_path) == {}
    meta = json.loads((Path(builder.data_dir) / "metadata.json").read_text())
    assert meta["mean"] == list(mean)
    # Prepared once: a second prepare only reads.
    ids.prepare("digits", tmp_path)


def test_open_source_names_the_missing_dataset(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"'imagenet2012' is not prepared under data_dir=.*manual_dir"
    ):
        ids.open_source("imagenet2012", "train", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'my_photos' is not prepared"):
        ids.open_source("my_photos", "train", tmp_path)
    assert ids.normalization("imagenet2012") == (images.IMAGENET_MEAN, images.IMAGENET_STD)


def test_image_folder_skips_and_counts_bad_files(tmp_path, no_network):
    photos = sklearn_datasets.load_sample_images().images  # china, flower
    root = tmp_path / "folder"
    good = {}
    for c, img in zip(("china", "flower"), photos, strict=True):
        (root / c).mkdir(parents=True)
        for i in range(3):
            tile = img[i * 100 : i * 100 + 90 + i, 50 * i : 50 * i + 120]
            good[f"{c}/{i}.png"] = tile
            (root / c / f"{i}.png").write_bytes(png(tile))
        Image.fromarray(img[:64, :64]).save(root / c / "photo.jpg", quality=90)
        good[f"{c}/photo.jpg"] = np.asarray(Image.open(root / c / "photo.jpg").convert("RGB"))
        grey = img[200:240, 300:330, :1].copy()
        (root / c / "grey.png").write_bytes(png(grey))
        good[f"{c}/grey.png"] = np.repeat(grey, 3, -1)
    (root / "china" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage that is not a JPEG")
    (root / "flower" / "empty.png").write_bytes(b"")
    (root / "flower" / "truncated.png").write_bytes(png(photos[1][:80, :80])[:300])

    ids.prepare("image_folder", tmp_path / "data", root=root, dataset_name="photos")
    assert ids.prepare_skipped("photos", tmp_path / "data") == {
        "train": {"undecodable_image": 2, "empty_image": 1}
    }
    src = ids.open_source("photos", "train", tmp_path / "data")
    assert len(src) == len(good)
    for i in range(len(src)):
        r = src[i]
        name = r["file_name"].decode()
        np.testing.assert_array_equal(r["image"], good[name])
        assert r["label"] == ("china", "flower").index(name.split("/")[0])
    pixels = np.concatenate([g.reshape(-1, 3) for g in good.values()]) / 255
    mean, std = ids.normalization("photos", tmp_path / "data")
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-7)


def test_image_folder_with_split_folders(tmp_path):
    img = sklearn_datasets.load_sample_images().images[0]
    for split, n in (("train", 3), ("validation", 2)):
        for c in ("a", "b"):
            (tmp_path / "f" / split / c).mkdir(parents=True)
            for i in range(n):
                (tmp_path / "f" / split / c / f"{i}.png").write_bytes(png(img[i * 10 : i * 10 + 16, :16]))
    ids.prepare(
        "image_folder", tmp_path / "data", root=tmp_path / "f", dataset_name="split_photos", channels=1
    )
    info = ids.dataset_info("split_photos", tmp_path / "data")
    assert {s: info.splits[s].num_examples for s in info.splits} == {"train": 6, "validation": 4}
    assert ids.open_source("split_photos", "validation", tmp_path / "data")[0]["image"].shape == (16, 16, 1)


FASHION = Path(ids.FASHION_MNIST_DIR)
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed",
)


@needs_fashion
def test_fashion_mnist_idx_files_and_statistics():
    x, y = (
        ids.read_idx(FASHION / "train-images-idx3-ubyte.gz"),
        ids.read_idx(FASHION / "train-labels-idx1-ubyte.gz"),
    )
    assert x.shape == (60000, 28, 28) and y.shape == (60000,)
    assert np.bincount(y).tolist() == [6000] * 10  # Fashion-MNIST's train split is balanced
    stats = ids._moments(x[..., None])
    # The values quoted for Fashion-MNIST normalization: mean 0.2860, std 0.3530.
    np.testing.assert_allclose(stats["mean"], [0.2860], atol=5e-5)
    np.testing.assert_allclose(stats["std"], [0.3530], atol=5e-5)


@needs_fashion
def test_fashion_mnist_builder_on_a_real_subset(tmp_path, no_network):
    """The builder end to end on the first 600/100 real examples (the full set takes ~30 s to prepare)."""
    sub = tmp_path / "idx"
    sub.mkdir()
    arrays = {}
    for split, (xf, yf), n in (
        ("train", ids._FASHION_FILES["train"], 600),
        ("test", ids._FASHION_FILES["test"], 100),
    ):
        x, y = ids.read_idx(FASHION / xf)[:n], ids.read_idx(FASHION / yf)[:n]
        arrays[split] = (x, y)
        with gzip.open(sub / xf, "wb") as f:
            f.write(struct.pack(">HBBIII", 0, 8, 3, n, 28, 28) + x.tobytes())
        with gzip.open(sub / yf, "wb") as f:
            f.write(struct.pack(">HBBI", 0, 8, 1, n) + y.tobytes())
    ids.prepare("fashion_mnist_local", tmp_path / "data", source_dir=sub)
    for split, (x, y) in arrays.items():
        src = ids.open_source("fashion_mnist_local", split, tmp_path / "data")
        assert len(src) == len(x)
        for i in range(0, len(src), 9):
            r = src[i]
            np.testing.assert_array_equal(r["image"][:, :, 0], x[r["index"]])
            assert r["label"] == y[r["index"]]
    mean, std = ids.normalization("fashion_mnist_local", tmp_path / "data")
    np.testing.assert_allclose(mean, [arrays["train"][0].mean() / 255], rtol=1e-9)
    np.testing.assert_allclose(std, [(arrays["train"][0] / 255).std()], rtol=1e-7)


def _reference_jitter(img: np.ndarray, factors, order) -> np.ndarray:
    """torchvision ColorJitter's three adjustments as their definitions, in float, from ImageEnhance's
    documented blends: brightness with black, contrast with the mean grey level, saturation with the
    greyscale image (ITU-R 601-2 luma, L = 0.299 R + 0.587 G + 0.114 B, rounded); a blend is cut to
    an integer toward zero and clipped to [0, 255], as 8-bit blending does."""
    x = img.astype(np.float64)

    def grey(v):
        return np.round(v @ np.array([0.299, 0.587, 0.114]))[..., None]

    for i in order:
        f = factors[i]
        if i == 0:
            base = np.zeros_like(x)
        elif i == 1:
            base = np.full_like(x, np.floor(grey(x).mean() + 0.5))
        else:
            base = grey(x)
        x = np.clip(np.trunc(base + f * (x - base)), 0, 255)
    return x


def test_color_jitter_is_torchvisions_brightness_contrast_saturation():
    photo = sklearn_datasets.load_sample_images().images[0][100:164, 200:280]  # a real 64x80 RGB crop
    for seed in range(6):
        rng = np.random.default_rng(seed)
        got = images.color_jitter(photo, rng, (0.4, 0.4, 0.4))
        again = np.random.default_rng(seed)  # the same draws: three factors, then the order
        factors = [again.uniform(0.6, 1.4) for _ in range(3)]
        order = again.permutation(3)
        want = _reference_jitter(photo, factors, order)
        assert got.dtype == np.uint8 and got.shape == photo.shape
        np.testing.assert_array_equal(got, want.astype(np.uint8), err_msg=f"{seed} {factors} {order}")
        assert not np.array_equal(got, photo)


def test_color_jitter_on_a_grey_image_has_no_saturation_to_change():
    """torchvision's PIL path on an "L" image: brightness and contrast apply, saturation is the identity."""
    digit = (sklearn_datasets.load_digits().images[0] * 15).astype(np.uint8)[..., None]  # real 8x8 grey
    got = images.color_jitter(digit, np.random.default_rng(1), (0.4, 0.4, 0.4))
    again = np.random.default_rng(1)
    factors, order = [again.uniform(0.6, 1.4) for _ in range(3)], again.permutation(3)
    want = _reference_jitter(np.repeat(digit, 3, -1), factors[:2] + [1.0], order)[..., :1]  # grey: R = G = B
    assert got.shape == digit.shape
    np.testing.assert_array_equal(got, want.astype(np.uint8))


def test_train_transform_jitters_the_whole_image_before_the_crop():
    """BEiT's order: ColorJitter on the whole image, then the crop. Contrast uses the image's mean grey
    level, so jittering the crop instead would give another image."""
    photo = np.asarray(Image.fromarray(sklearn_datasets.load_sample_images().images[1]).resize((96, 64)))
    t = images.train_transform(32, (0.5,) * 3, (0.5,) * 3, flip=False, color_jitter_strengths=(0.4, 0.4, 0.4))
    got = t({"image": photo}, np.random.default_rng(3))["image"]
    rng = np.random.default_rng(3)
    jittered_first = images.random_resized_crop(images.color_jitter(photo, rng, (0.4, 0.4, 0.4)), rng, 32)
    np.testing.assert_array_equal(got, images.normalize(jittered_first, (0.5,) * 3, (0.5,) * 3))
    rng = np.random.default_rng(3)
    factors = [rng.uniform(0.6, 1.4) for _ in range(3)]
    order = rng.permutation(3)
    cropped_first = images.random_resized_crop(photo, rng, 32)
    crop_then_jitter = _reference_jitter(cropped_first, factors, order).astype(np.uint8)
    assert not np.array_equal(jittered_first, crop_then_jitter)
    with pytest.raises(ValueError, match="three strengths"):
        images.train_transform(32, (0.5,) * 3, (0.5,) * 3, color_jitter_strengths=(0.4, 0.4))
