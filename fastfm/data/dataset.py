"""The ``Dataset`` abstraction: a training stream plus a fixed held-out set, in model space.

``GeneratedDataset`` draws fresh points on every call (toys, mixtures);
``FiniteDataset`` holds a train/test split of finite arrays and serves the
training rows as an epoch-wise shuffled stream whose position can be saved.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from fastfm import seeding
from fastfm.data.mixtures import GaussianMixture
from fastfm.data.pixels import dequantise
from fastfm.data.toys import Sampler


class DataError(ValueError):
    """Bad input data; the message names the source (file) and what is wrong."""


@dataclass(kw_only=True, eq=False)
class Dataset(ABC):
    """Samples in model space (float32): raw values for vectors, [-1, 1] for images.

    ``test`` is a fixed held-out set (deterministic for a given seed); ``levels`` is
    the number of quantisation levels of discrete data, None for continuous data.
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    test: torch.Tensor = field(repr=False)
    test_labels: torch.Tensor | None = field(default=None, repr=False)
    num_classes: int | None = None
    levels: int | None = None

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """n training samples in model space (float32) and their labels (int64) or None."""

    @property
    def paired(self) -> bool:
        """Whether training rows come with their own source points (``sample_pairs``: a reflow data set)."""
        return False

    def sample_pairs(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                        torch.Tensor | None]:
        """(x0, x1, labels) of n training rows whose source points x0 are part of the data (``paired``)."""
        raise DataError(f"data set {self.name!r} holds no source points: it is not a paired (reflow) data set")

    @property
    def has_log_prob(self) -> bool:
        return False

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density of model-space points, where it is known."""
        raise NotImplementedError(f"dataset {self.name!r} has no known density")

    def state_dict(self) -> dict[str, Any]:
        """Position of the training stream (empty: the generator state alone suffices)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by ``state_dict``."""


@dataclass(kw_only=True, eq=False)
class GeneratedDataset(Dataset):
    """An infinite stream: every ``sample`` call draws fresh points from ``sampler``."""

    sampler: Sampler = field(repr=False)
    density: GaussianMixture | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls,
        name: str,
        sampler: Sampler,
        *,
        seed: int = 0,
        n_test: int = 2000,
        num_classes: int | None = None,
        density: GaussianMixture | None = None,
    ) -> GeneratedDataset:
        """Wrap ``sampler``; the test set is ``n_test`` points drawn from the stream ``data/test``
        (``fastfm.seeding``)."""
        if n_test < 1:
            raise ValueError(f"n_test must be >= 1, got {n_test}")
        test, test_labels = sampler(n_test, seeding.generator(seed, "data/test"))
        return cls(name=name, shape=tuple(test.shape[1:]), kind="vector", test=test,
                   test_labels=test_labels, num_classes=num_classes, sampler=sampler, density=density)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.sampler(n, generator)

    @property
    def has_log_prob(self) -> bool:
        return self.density is not None

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if self.density is None:
            return super().log_prob(x)
        return self.density.log_prob(x)


def _check(x: torch.Tensor, labels: torch.Tensor | None, levels: int | None, source: str) -> None:
    """Raise DataError (naming ``source``) unless x and labels are valid data."""
    if x.ndim not in (2, 4):
        raise DataError(f"{source}: expected (N, d) vectors or (N, C, H, W) images, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x[0].numel() == 0:
        raise DataError(f"{source}: is empty (shape {tuple(x.shape)})")
    if levels is None and not bool(torch.isfinite(x).all()):
        raise DataError(f"{source}: contains NaN or Inf values")
    if levels is not None:
        if x.is_floating_point() or x.dtype == torch.bool:
            raise DataError(f"{source}: quantised data must be integers, got {x.dtype}")
        if not 2 <= levels <= 256 or int(x.min()) < 0 or int(x.max()) >= levels:
            raise DataError(f"{source}: values must lie in 0..{levels - 1} (2 <= levels <= 256), "
                            f"got {int(x.min())}..{int(x.max())}")
    if labels is None:
        return
    if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
        raise DataError(f"{source}: {x.shape[0]} samples but labels of shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool or int(labels.min()) < 0:
        raise DataError(f"{source}: labels must be non-negative integers")


@dataclass(kw_only=True, eq=False)
class FiniteDataset(Dataset):
    """A finite train/test split; ``sample`` walks a fresh permutation each epoch.

    ``train`` holds uint8 pixel values when ``levels`` is set (``sample`` dequantises
    them with the caller's generator), else float32 model-space rows. ``test_raw`` is
    the integer test set (None for continuous data); ``test`` is it dequantised once
    from the stream ``data/test-noise`` (``fastfm.seeding``).
    """

    train: torch.Tensor = field(repr=False)
    train_labels: torch.Tensor | None = field(default=None, repr=False)
    test_raw: torch.Tensor | None = field(default=None, repr=False)
    _epoch: int = field(default=0, init=False, repr=False)
    _index: int = field(default=0, init=False, repr=False)
    _perm: torch.Tensor | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_split(
        cls,
        name: str,
        train: torch.Tensor,
        test: torch.Tensor,
        *,
        train_labels: torch.Tensor | None = None,
        test_labels: torch.Tensor | None = None,
        levels: int | None = None,
        num_classes: int | None = None,
        seed: int = 0,
        source: str | None = None,
    ) -> FiniteDataset:
        """Validate a given split; (N, d) rows are vectors, (N, C, H, W) rows images."""
        source = source or name
        _check(train, train_labels, levels, f"{source} (train)")
        _check(test, test_labels, levels, f"{source} (test)")
        if train.shape[1:] != test.shape[1:] or (train_labels is None) != (test_labels is None):
            raise DataError(f"{source}: train and test parts differ in sample shape or in having labels")
        if train_labels is not None:
            seen = int(max(train_labels.max(), test_labels.max())) + 1
            if num_classes is not None and seen > num_classes:
                raise DataError(f"{source}: label {seen - 1} is out of range for {num_classes} classes")
            num_classes = num_classes or seen
        if levels is None:
            train, test, test_raw = train.to(torch.float32), test.to(torch.float32), None
        else:
            train, test_raw = train.to(torch.uint8), test.to(torch.uint8)
            test = dequantise(test_raw, levels, seeding.generator(seed, "data/test-noise"))
        as_labels = (lambda y: None if y is None else y.to(torch.int64))
        return cls(name=name, shape=tuple(train.shape[1:]), kind="image" if train.ndim == 4 else "vector",
                   test=test, test_labels=as_labels(test_labels), num_classes=num_classes, levels=levels,
                   train=train, train_labels=as_labels(train_labels), test_raw=test_raw)

    @classmethod
    def from_arrays(
        cls,
        name: str,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        test_fraction: float = 0.1,
        seed: int = 0,
        **kwargs: Any,
    ) -> FiniteDataset:
        """Split off round(test_fraction N) rows (at least 1 each side) by the permutation
        drawn from the stream ``data/split`` (``fastfm.seeding``); ``kwargs`` go to ``from_split``."""
        source = kwargs.get("source") or name
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        if x.ndim == 0 or x.shape[0] < 2:
            raise DataError(f"{source}: need at least 2 samples to split, got shape {tuple(x.shape)}")
        if labels is not None and labels.shape[:1] != x.shape[:1]:
            raise DataError(f"{source}: {x.shape[0]} samples but labels of shape {tuple(labels.shape)}")
        n = x.shape[0]
        n_test = min(max(round(test_fraction * n), 1), n - 1)
        perm = torch.randperm(n, generator=seeding.generator(seed, "data/split"))
        test_idx, train_idx = perm[:n_test].sort().values, perm[n_test:].sort().values
        pick = (lambda y, idx: None if y is None else y[idx])
        return cls.from_split(name, x[train_idx], x[test_idx], train_labels=pick(labels, train_idx),
                              test_labels=pick(labels, test_idx), seed=seed, **kwargs)

    @property
    def num_train(self) -> int:
        return self.train.shape[0]

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, index within the epoch's permutation) of the next training row."""
        return self._epoch, self._index

    def _next_indices(self, n: int, generator: torch.Generator) -> torch.Tensor:
        chunks = [torch.empty(0, dtype=torch.int64)]
        while n > 0:
            if self._perm is None:
                self._perm = torch.randperm(self.num_train, generator=generator)
            take = min(n, self.num_train - self._index)
            chunks.append(self._perm[self._index:self._index + take])
            self._index, n = self._index + take, n - take
            if self._index == self.num_train:
                self._epoch, self._index, self._perm = self._epoch + 1, 0, None
        return torch.cat(chunks)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = self._next_indices(n, generator)
        x = self.train[idx]
        if self.levels is not None:
            x = dequantise(x, self.levels, generator)
        return x, None if self.train_labels is None else self.train_labels[idx]

    def state_dict(self) -> dict[str, Any]:
        perm = None if self._perm is None else self._perm.clone()
        return {"epoch": self._epoch, "index": self._index, "perm": perm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        perm = state["perm"]
        if (perm is None and state["index"] != 0) or (perm is not None and perm.shape != (self.num_train,)):
            raise ValueError(f"state does not fit dataset {self.name!r} with {self.num_train} training rows")
        self._epoch, self._index = int(state["epoch"]), int(state["index"])
        self._perm = None if perm is None else perm.clone().to(torch.int64)
