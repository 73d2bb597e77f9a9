"""Data sets by name: ``get_dataset("moons")``, ``get_dataset("npy:data.npz")``, ..."""

from __future__ import annotations

from typing import Any

from fastfm.data.arrays import file_dataset
from fastfm.data.dataset import Dataset, GeneratedDataset
from fastfm.data.images import digits_dataset, folder_dataset, mnist5k_dataset, torchvision_dataset
from fastfm.data.mixtures import sphere_mixture
from fastfm.data.toys import TOYS

DATASETS: tuple[str, ...] = (
    *TOYS, "gmm", "digits", "mnist5k", "array", "folder", "mnist", "cifar10",
)
"""Valid names; "array" and "folder" need ``path`` (or use "npy:PATH" / "folder:PATH")."""

_PREFIXES = {"npy": "array", "npz": "array", "folder": "folder"}
_NEEDS_PATH = ("array", "folder")
_TAKES_PATH = (*_NEEDS_PATH, "mnist", "cifar10")


def _resolve(name: str, path: str | None) -> tuple[str, str | None]:
    """Canonical name and path, from "prefix:PATH" forms where given."""
    prefix, colon, rest = name.partition(":")
    if colon and prefix in _PREFIXES:
        if path is not None:
            raise ValueError(f"dataset {name!r}: give the path either in the name or as path=, not both")
        name, path = _PREFIXES[prefix], rest
    elif name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}, "
                         "npy:PATH, npz:PATH, folder:PATH")
    if name in _NEEDS_PATH and not path:
        raise ValueError(f"dataset {name!r} needs a path (path=... or the PREFIX:PATH name form)")
    if name not in _TAKES_PATH and path is not None:
        raise ValueError(f"dataset {name!r} takes no path")
    return name, path


def get_dataset(name: str, *, seed: int = 0, path: str | None = None, **kwargs: Any) -> Dataset:
    """The data set ``name`` (see ``DATASETS``); ``seed`` fixes test sets, splits and
    random mixture means. Keyword options:

    * toys: ``n_test`` (default 2000);
    * "gmm": ``dim`` (2), ``n_components`` (8), ``radius`` (4.0), ``std`` (0.5), ``n_test``;
    * "digits", "mnist5k", "array", "folder": ``test_fraction`` (0.1);
    * "mnist", "cifar10": ``path`` is the download root (default ~/.cache/fastfm).
    """
    canonical, path = _resolve(name, path)
    if canonical in TOYS:
        sampler, num_classes = TOYS[canonical]
        return GeneratedDataset.create(canonical, sampler, seed=seed, num_classes=num_classes, **kwargs)
    if canonical == "gmm":
        n_test = kwargs.pop("n_test", 2000)
        mixture = sphere_mixture(seed=seed, **kwargs)
        return GeneratedDataset.create("gmm", mixture.sample_with_components, seed=seed, n_test=n_test,
                                       num_classes=mixture.n_components, density=mixture)
    if canonical == "digits":
        return digits_dataset(seed=seed, **kwargs)
    if canonical == "mnist5k":
        return mnist5k_dataset(seed=seed, **kwargs)
    if canonical == "array":
        return file_dataset(path, seed=seed, **kwargs)
    if canonical == "folder":
        return folder_dataset(path, seed=seed, **kwargs)
    return torchvision_dataset(canonical, root=path, seed=seed, **kwargs)
