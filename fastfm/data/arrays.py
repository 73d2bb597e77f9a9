"""Finite data sets from numpy arrays and .npy / .npz files.

How an array x of N samples is read (by ndim and dtype):

* (N, d), any numeric dtype: continuous vectors, model space = the values (float32).
* (N, H, W) or (N, C, H, W), integer dtype: 8-bit images with values in 0..255
  (levels = 256), dequantised into [-1, 1]. Channels-last (N, H, W, C) with C in
  {1, 3, 4} is transposed when the second axis cannot be a channel axis.
* (N, H, W) or (N, C, H, W), float dtype: continuous images (e.g. autoencoder
  latents), model space = the values as given (levels = None). Save 8-bit images
  as uint8 to get dequantisation.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from fastfm.data.dataset import DataError, FiniteDataset

_CHANNELS = (1, 3, 4)


def _as_tensors(
    x: np.ndarray, labels: np.ndarray | None, source: str
) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """(x, labels, levels) as tensors laid out as (N, d) or (N, C, H, W)."""
    if x.dtype.kind not in "biuf":
        raise DataError(f"{source}: unsupported dtype {x.dtype} (need numbers)")
    if labels is not None and labels.dtype.kind not in "iu":
        raise DataError(f"{source}: labels must be integers, got dtype {labels.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim == 4 and x.shape[1] not in _CHANNELS and x.shape[-1] in _CHANNELS:
        x = x.transpose(0, 3, 1, 2)
    if x.ndim not in (2, 4):
        raise DataError(f"{source}: expected (N, d) vectors or (N, [C,] H, W) images, got shape {x.shape}")
    quantised = x.ndim == 4 and x.dtype.kind != "f"
    x = x.astype(np.uint8 if x.dtype == np.uint8 else np.int64 if quantised else np.float32)
    y = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    return torch.from_numpy(np.ascontiguousarray(x)), y, 256 if quantised else None


def array_dataset(
    name: str,
    x: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 0.1,
    source: str | None = None,
) -> FiniteDataset:
    """A seeded train/test split of ``x`` (and ``labels``), read as the module doc says."""
    source = source or name
    x_t, y_t, levels = _as_tensors(np.asarray(x), None if labels is None else np.asarray(labels), source)
    return FiniteDataset.from_arrays(name, x_t, y_t, levels=levels, seed=seed,
                                     test_fraction=test_fraction, source=source)


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """All arrays in a .npy file (as key "x") or a .npz file."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            return {"x": data}
        with data:
            return {key: data[key] for key in data.files}
    except ValueError as err:  # numpy suggests allow_pickle for anything that is not a plain array: never taken
        if "pickle" in str(err):
            raise DataError(f"{path}: not a plain numeric .npy/.npz array (not in NumPy's format, or it holds "
                            "Python objects); fastfm never unpickles data files") from None
        raise DataError(f"{path}: unreadable .npy/.npz file ({err})") from err
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: unreadable .npy/.npz file ({err})") from err


def file_dataset(
    path: str | Path, *, name: str | None = None, seed: int = 0, test_fraction: float = 0.1
) -> FiniteDataset:
    """Data from a .npy file, or a .npz file with key "x" (else its first array other
    than "y") and optional integer labels under "y"."""
    path = Path(path)
    arrays = read_arrays(path)
    key = "x" if "x" in arrays else next((k for k in arrays if k != "y"), None)
    if key is None:
        raise DataError(f"{path}: holds no data array (expected key 'x')")
    return array_dataset(name or f"npy:{path}", arrays[key], arrays.get("y"), seed=seed,
                         test_fraction=test_fraction, source=str(path))
