"""Data sets for fastfm: 2-D toys, Gaussian mixtures, digits/MNIST, arrays and image folders.

``get_dataset(name, seed=..., path=...)`` returns a ``Dataset`` whose ``sample(n,
generator)`` yields model-space training batches and whose ``test`` is a fixed
held-out set; see ``DATASETS`` (a ``fastfm.registry.Registry``) for the names and their options.
"""

from fastfm.data.arrays import array_dataset, file_dataset
from fastfm.data.dataset import DataError, Dataset, FiniteDataset, GeneratedDataset
from fastfm.data.images import digits_dataset, folder_dataset, mnist5k_dataset, torchvision_dataset
from fastfm.data.mixtures import GaussianMixture, sphere_mixture
from fastfm.data.pairs import PairDataset
from fastfm.data.pixels import dequantise, to_pixels
from fastfm.data.registry import DATASETS, check_dataset, get_dataset
from fastfm.data.toys import TOYS

__all__ = [
    "DATASETS", "TOYS", "DataError", "Dataset", "FiniteDataset", "GaussianMixture", "GeneratedDataset", "PairDataset",
    "array_dataset", "check_dataset", "dequantise", "digits_dataset", "file_dataset", "folder_dataset",
    "get_dataset", "mnist5k_dataset", "sphere_mixture", "to_pixels", "torchvision_dataset",
]
