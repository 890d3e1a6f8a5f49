"""Image datasets as tfds builders: prepare once (array_record), then read as random-access sources.

Local builders (no network at prepare or read time):

  digits               scikit-learn's `load_digits()`: 1,797 8×8 grey digits, 0–16 levels -> uint8
                       round(v·255/16). Fixed split: the first 1,500 in sklearn's order are "train",
                       the last 297 "validation" (the order groups writers, so validation is mostly
                       unseen handwriting).
  fashion_mnist_local  Fashion-MNIST (Xiao et al. 2017) from Debian's `dataset-fashion-mnist` IDX files
                       (/usr/share/datasets/fashion-mnist): "train" 60,000 and "test" 10,000 28×28 grey.
  image_folder         ROOT/<class>/<image files>, or ROOT/{train,validation,test}/<class>/...; files
                       are decoded with PIL at prepare time and undecodable or empty ones are skipped
                       and counted. `prepare("image_folder", ..., dataset_name="flowers")` names it.

Records (dicts of numpy, as `tfds.data_source` gives them):
  digits, fashion_mnist_local:  "image" uint8 (H, W, 1), "label" int64, "index" int64 (row in the source file)
  image_folder:                 "image" uint8 (H, W, channels) of the file's own size, "label" int64,
                                "file_name" bytes (path relative to ROOT)
Images are stored as PNG (the folder's own JPEG bytes are kept as they are), so the
tfds `Image` feature decodes them with PIL when read; TensorFlow is never needed.

Each prepared local set keeps, in its `info.metadata` (metadata.json beside the data):
  "mean", "std"   per-channel statistics of pixel/255 over the train split (for `normalize`)
  "skipped"       {split: {reason: count}} of records dropped at prepare time
Any other tfds dataset the user has prepared in array_record format (e.g. imagenet2012:
`tfds build imagenet2012 --file_format=array_record --manual_dir=...`) opens with
`open_source`; ImageNet uses the standard ImageNet mean/std.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from maskjax.data.images import IMAGENET_MEAN, IMAGENET_STD, decode
from maskjax.data.pipeline import BadRecord, Source

log = logging.getLogger(__name__)

DIGITS_TRAIN = 1500  # digits: indices [0, 1500) are "train", [1500, 1797) "validation".
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
# Channel statistics for prepared datasets that do not carry their own in metadata.
KNOWN_STATS = {"imagenet2012": (IMAGENET_MEAN, IMAGENET_STD)}


def encode_png(img: np.ndarray) -> bytes:
    """uint8 (H, W, C) with C in {1, 3} -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img[:, :, 0] if img.shape[-1] == 1 else img)).save(buf, format="PNG")
    return buf.getvalue()


class Moments:
    """Running per-channel mean / std of pixel/255 over all pixels of many images of any sizes."""

    def __init__(self) -> None:
        self.count, self.sum, self.sumsq = 0, 0.0, 0.0

    def add(self, img: np.ndarray) -> None:
        x = img.reshape(-1, img.shape[-1]).astype(np.float64) / 255.0
        self.count += x.shape[0]
        self.sum = self.sum + x.sum(0)
        self.sumsq = self.sumsq + (x * x).sum(0)

    def result(self) -> dict[str, list[float]]:
        mean = self.sum / self.count
        std = np.sqrt(np.maximum(self.sumsq / self.count - mean * mean, 0.0))
        return {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def _labelled_image_info(
    builder: tfds.core.DatasetBuilder, shape, description: str, **kw
) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=builder,
        description=description,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=shape),
                "label": tfds.features.ClassLabel(**kw),
                "index": tfds.features.Scalar(dtype=np.int64),
            }
        ),
        supervised_keys=("image", "label"),
        metadata=tfds.core.MetadataDict(),
    )


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder whose data is on this machine: array_record by default, no checksums file to look up."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    # tfds looks for a checksums file beside the builder's code through `importlib_resources`,
    # which it only installs for Python < 3.9; local data has no download checksums.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        return None


class _ArrayImages(_LocalBuilder, skip_registration=True):
    """Shared by datasets that arrive as whole uint8 arrays: statistics from train, records as PNG."""

    def _arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        splits = self._arrays()
        self.info.metadata.update(_moments(splits["train"][0]))
        self.info.metadata["skipped"] = {}
        return {name: self._generate_examples(images, labels) for name, (images, labels) in splits.items()}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": encode_png(img), "label": int(label), "index": i}


def _moments(images: np.ndarray, chunk: int = 4096) -> dict[str, list[float]]:
    m = Moments()
    for i in range(0, len(images), chunk):  # Chunks bound the float64 copy (60k×28×28 would be 376 MB).
        m.add(images[i : i + chunk])
    return m.result()


class Digits(_ArrayImages):
    """scikit-learn's 8×8 digits (UCI optdigits test set, 1,797 images, 10 classes)."""

    name = "digits"

    def _info(self) -> tfds.core.DatasetInfo:
        return _labelled_image_info(
            self,
            (8, 8, 1),
            "scikit-learn load_digits(): 8x8 grey digits, levels 0-16 scaled to uint8.",
            num_classes=10,
        )

    def _arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        from sklearn.datasets import load_digits  # Bundled with scikit-learn: no download.

        d = load_digits()
        images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        labels = d.target.astype(np.int64)
        return {
            "train": (images[:DIGITS_TRAIN], labels[:DIGITS_TRAIN]),
            "validation": (images[DIGITS_TRAIN:], labels[DIGITS_TRAIN:]),
        }


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzip'd or not; the MNIST format): uint8 array of the shape in its header."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (header {data[:4]!r})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMnistLocal(_ArrayImages):
    """Fashion-MNIST from the local IDX files of Debian's `dataset-fashion-mnist` package."""

    name = "fashion_mnist_local"

    def __init__(self, *, source_dir: str | os.PathLike = FASHION_MNIST_DIR, **kwargs: Any):
        self._source_dir = Path(source_dir)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return _labelled_image_info(
            self,
            (28, 28, 1),
            "Fashion-MNIST (Xiao et al. 2017), 28x28 grey, 10 classes.",
            names=FASHION_MNIST_CLASSES,
        )

    def _arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for split, (images_file, labels_file) in _FASHION_FILES.items():
            paths = [self._source_dir / images_file, self._source_dir / labels_file]
            for p in paths:
                if not p.exists():
                    raise FileNotFoundError(f"{p} not found: install Debian's dataset-fashion-mnist package")
            out[split] = (read_idx(paths[0])[..., None], read_idx(paths[1]).astype(np.int64))
        return out


class ImageFolder(_LocalBuilder):
    """ROOT/<class>/<file> (or ROOT/<split>/<class>/<file>), decoded and checked at prepare time."""

    SPLIT_DIRS = ("train", "validation", "test")

    def __init__(self, *, root: str | os.PathLike | None = None, channels: int = 3, **kwargs: Any):
        if channels not in (1, 3):
            raise ValueError(f"channels={channels} must be 1 or 3")
        self._root = Path(root) if root is not None else None
        self._channels = channels
        super().__init__(**kwargs)

    def _split_dirs(self) -> dict[str, Path]:
        if self._root is None:
            raise ValueError(f"dataset {self.name!r}: give root=<folder of class subfolders> to prepare it")
        splits = {s: self._root / s for s in self.SPLIT_DIRS if (self._root / s).is_dir()}
        return splits or {"train": self._root}

    def _classes(self) -> list[str]:
        dirs = self._split_dirs()
        top = dirs.get("train", next(iter(dirs.values())))
        classes = sorted(p.name for p in top.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise ValueError(f"{top} has no class subfolders")
        return classes

    def _info(self) -> tfds.core.DatasetInfo:
        classes = self._classes() if self._root is not None else None
        return tfds.core.DatasetInfo(
            builder=self,
            description="Images from a folder with one subfolder per class.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, self._channels)),
                    "label": tfds.features.ClassLabel(names=classes),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        self.info.metadata["skipped"] = {}
        return {split: self._generate_examples(split, path) for split, path in self._split_dirs().items()}

    def _generate_examples(self, split: str, folder: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        classes = self._classes()
        moments, skipped = Moments(), {}
        for label, cls in enumerate(classes):
            if not (folder / cls).is_dir():
                continue
            for path in sorted(
                p for p in (folder / cls).rglob("*") if p.is_file() and not p.name.startswith(".")
            ):
                rel = str(path.relative_to(self._root))
                data = path.read_bytes()
                try:
                    img = decode(data, self._channels)
                except BadRecord as e:
                    skipped[e.reason] = skipped.get(e.reason, 0) + 1
                    log.warning("skipping %s: %s", rel, e)
                    continue
                if split == "train":
                    moments.add(img)
                yield rel, {"image": self._encoded(data, img), "label": label, "file_name": rel}
        # Runs when tfds has consumed the split, before it writes metadata.json.
        self.info.metadata["skipped"][split] = skipped
        if split == "train" and moments.count:
            self.info.metadata.update(moments.result())

    def _encoded(self, data: bytes, img: np.ndarray) -> bytes:
        """The file's own bytes when tfds' PIL decoding gives back `img` exactly; else PNG of the pixels."""
        with Image.open(io.BytesIO(data)) as im:
            same = im.format in ("JPEG", "PNG") and im.mode == ("RGB" if self._channels == 3 else "L")
        return data if same else encode_png(img)


BUILDERS: dict[str, type[tfds.core.DatasetBuilder]] = {
    "digits": Digits,
    "fashion_mnist_local": FashionMnistLocal,
    "image_folder": ImageFolder,
}


def prepare(
    name: str, data_dir: str | os.PathLike, *, dataset_name: str | None = None, **kwargs: Any
) -> tfds.core.DatasetBuilder:
    """Prepare local dataset `name` (digits, fashion_mnist_local, image_folder); a no-op if already done.

    kwargs go to the builder (image_folder: root=, channels=; fashion_mnist_local: source_dir=).
    dataset_name stores it under another name (e.g. one image folder per name).
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown local image dataset {name!r}; choose one of {sorted(BUILDERS)}")
    cls = BUILDERS[name]
    if dataset_name is not None and dataset_name != name:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", dataset_name):
            raise ValueError(f"dataset_name={dataset_name!r} must be snake_case ([a-z][a-z0-9_]*)")
        cls = type(cls.__name__, (cls,), {"name": dataset_name}, skip_registration=True)
    builder = cls(data_dir=os.fspath(data_dir), **kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def _builder(name: str, data_dir: str | os.PathLike | None) -> tfds.core.DatasetBuilder:
    where = f"data_dir={os.fspath(data_dir) if data_dir is not None else '(tfds default)'}"
    how = (
        f"maskjax.data.image_datasets.prepare({name!r}, data_dir)"
        if name in BUILDERS
        else f"`tfds build {name} --data_dir=DIR --file_format=array_record`"
        " (ImageNet also needs --manual_dir)"
    )
    try:
        builder = tfds.builder(name, data_dir=os.fspath(data_dir) if data_dir is not None else None)
    except tfds.core.registered.DatasetNotFoundError:
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared under {where}; prepare it first: {how}"
        ) from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared under {where} (looked in {builder.data_path}); "
            f"prepare it first: {how}"
        )
    fmt = builder.info.file_format
    if fmt is not None and fmt != tfds.core.file_adapters.FileFormat.ARRAY_RECORD:
        raise ValueError(
            f"dataset {name!r} under {where} was prepared as {fmt.value}; random access needs array_record: "
            f"re-prepare with `tfds build {name} --file_format=array_record`"
        )
    return builder


def open_source(name: str, split: str, data_dir: str | os.PathLike | None = None) -> Source:
    """A prepared tfds dataset's split as a random-access Source (dicts of numpy); never downloads."""
    builder = _builder(name, data_dir)
    if split.split("[")[0] not in builder.info.splits:  # tfds slicing ("train[:10%]") is allowed
        raise ValueError(f"dataset {name!r} has splits {sorted(builder.info.splits)}, not {split!r}")
    return builder.as_data_source(split=split)


class LabelledFraction:
    """The first ⌈fraction·n_c⌉ records of every class c of `source`, in source order (class-balanced,
    unlike a tfds slice such as "train[:1%]", which may miss classes). Reads every label once."""

    def __init__(self, source: Source, fraction: float):
        labels = np.array([int(source[i]["label"]) for i in range(len(source))])
        keep = [
            np.flatnonzero(labels == c)[: max(1, math.ceil(fraction * (labels == c).sum()))]
            for c in np.unique(labels)
        ]
        self.source, self.indices = source, np.sort(np.concatenate(keep))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.source[int(self.indices[index])]


def dataset_info(name: str, data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetInfo:
    return _builder(name, data_dir).info


def normalization(
    name: str, data_dir: str | os.PathLike | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of pixel/255 for `normalize`: the dataset's own, or known values."""
    base = name.split("/")[0].split(":")[0]
    if base in KNOWN_STATS:
        return KNOWN_STATS[base]
    meta = dataset_info(name, data_dir).metadata or {}
    if "mean" not in meta or "std" not in meta:
        raise ValueError(f"dataset {name!r} has no mean/std in its metadata; pass them in the config")
    return tuple(meta["mean"]), tuple(meta["std"])


def prepare_skipped(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, dict[str, int]]:
    """{split: {reason: count}} of the records dropped when `name` was prepared ({} if none or unknown)."""
    return dict((dataset_info(name, data_dir).metadata or {}).get("skipped", {}))
