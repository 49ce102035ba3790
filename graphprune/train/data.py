"""Small offline tasks for recovery experiments: scikit-learn digits, and circle-square segmentation.

Both return lists of ``(inputs, targets)`` batches (re-iterable, as ``finetune`` and the criteria
take them). ``digits`` needs scikit-learn (it ships the data); ``circle_square`` is generated.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["batches", "digits", "circle_square", "CIRCLE_SQUARE_CLASSES"]

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle_seed: int | None = None) -> Batches:
    """Split ``(x, y)`` into a list of batches, optionally shuffled once (seeded)."""
    if shuffle_seed is not None:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(shuffle_seed))
        x, y = x[perm], y[perm]
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def digits(size: int = 16, *, test_fraction: float = 0.25, batch_size: int = 64,
           seed: int = 0) -> tuple[Batches, Batches]:
    """scikit-learn's 8x8 digits (1797 images, 10 classes), upsampled to ``size`` x ``size``, standardised;
    a seeded train/test split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    return batches(x[train], y[train], batch_size), batches(x[test], y[test], 256)


CIRCLE_SQUARE_CLASSES = ("background", "filled square", "hollow square", "disk", "ring")


def circle_square(n: int = 512, size: int = 32, *, objects: tuple[int, int] = (1, 3), noise: float = 0.3,
                  batch_size: int = 32, seed: int = 0) -> Batches:
    """Segmentation task with 5 labels (``CIRCLE_SQUARE_CLASSES``): each image holds 1-3 shapes (filled
    or hollow squares, disks, rings) of random size and position, later ones on top; the image is the
    shapes' mask (intensity 1) plus Gaussian noise. Targets are per-pixel labels ``[N, size, size]``.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    imgs = np.zeros((n, size, size), np.float32)
    labels = np.zeros((n, size, size), np.int64)
    for i in range(n):
        for _ in range(rng.integers(objects[0], objects[1] + 1)):
            kind = int(rng.integers(1, 5))
            r = rng.uniform(size * 0.12, size * 0.25)
            cy, cx = rng.uniform(r, size - r, 2)
            if kind in (1, 2):  # squares: Chebyshev distance
                d = np.maximum(np.abs(yy - cy), np.abs(xx - cx))
            else:
                d = np.hypot(yy - cy, xx - cx)
            width = max(1.5, r * 0.35)
            region = (d <= r) & ((d >= r - width) if kind in (2, 4) else True)
            cover = d <= r  # a shape hides what lies beneath it, hollow or not
            imgs[i][cover] = 0.0
            labels[i][cover] = 0
            imgs[i][region] = 1.0
            labels[i][region] = kind
    imgs += rng.normal(0.0, noise, imgs.shape).astype(np.float32)
    x = torch.from_numpy(imgs).unsqueeze(1)
    y = torch.from_numpy(labels)
    return batches(x, y, batch_size)


