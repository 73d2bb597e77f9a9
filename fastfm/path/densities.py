"""Source (base) densities: what x0 is drawn from, and the prior log-density at t = 0.

Every density samples a batch with ``sample(shape, generator)`` (``shape`` includes the batch
dimension) and scores it with ``log_prob(x)``, summed over all non-batch dimensions.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Density(Protocol):
    """A sampleable density over tensors of a fixed per-sample shape."""

    has_log_prob: bool

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor: ...

    def log_prob(self, x: Tensor) -> Tensor: ...


class Gaussian:
    """Isotropic N(0, std^2 I): log p(x) = -|x|^2 / (2 std^2) - D/2 log(2 pi std^2)."""

    has_log_prob = True

    def __init__(self, std: float = 1.0) -> None:
        if not std > 0:
            raise ValueError(f"Gaussian std must be positive, got {std}")
        self.std = float(std)

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
        return self.std * torch.randn(shape, generator=generator, device=device)

    def log_prob(self, x: Tensor) -> Tensor:
        x = x.float().flatten(1)
        d = x.shape[1]
        return -0.5 * (x / self.std).pow(2).sum(1) - d * (math.log(self.std) + 0.5 * math.log(2 * math.pi))

    def __repr__(self) -> str:
        return f"Gaussian(std={self.std})"


class SampleDensity:
    """Adapts any object with ``sample(n, generator)`` (and optionally ``log_prob``) — a data set,
    a Gaussian mixture — into a source density for stochastic interpolants."""

    def __init__(self, source: object, scale: float = 1.0) -> None:
        if not hasattr(source, "sample"):
            raise TypeError(f"{source!r} has no sample(n, generator) method")
        self.source = source
        self.scale = float(scale)

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
        out = self.source.sample(shape[0], generator)
        x = out[0] if isinstance(out, tuple) else out
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"source density gives samples of shape {tuple(x.shape)}, the path needs {tuple(shape)}")
        return (self.scale * x).to(device) if device is not None else self.scale * x

    @property
    def has_log_prob(self) -> bool:
        return bool(getattr(self.source, "has_log_prob", hasattr(self.source, "log_prob")))

    def log_prob(self, x: Tensor) -> Tensor:
        require_log_prob(self)
        d = x[0].numel()
        return self.source.log_prob(x / self.scale) - d * math.log(self.scale)

    def __repr__(self) -> str:
        """The source by its name where it has one ("data set 'moons'"), as errors name it."""
        name = getattr(self.source, "name", None)
        source = repr(self.source) if name is None else f"data set {name!r}"
        return source if self.scale == 1.0 else f"{source} scaled by {self.scale:g}"


def require_log_prob(density: Density) -> None:
    """ValueError unless ``density`` has a log-density: likelihoods need a base with a known density."""
    if not density.has_log_prob:
        raise ValueError(f"the source ({density!r}) has no log_prob: likelihoods need a base with a known density")


def scaled(density: Density, scale: float) -> Density:
    """The law of ``scale * X`` for X ~ density (scale = sigma_0 gives a path's prior)."""
    if scale == 1.0:
        return density
    if isinstance(density, Gaussian):
        return Gaussian(density.std * scale)
    if isinstance(density, SampleDensity):
        return SampleDensity(density.source, density.scale * scale)
    raise TypeError(f"cannot scale density {density!r}")
