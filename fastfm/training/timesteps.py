"""Training-time distributions of t in [0, 1], always returned in fp32, by name from ``TIME_SAMPLERS``."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from fastfm.registry import Registry


class TimeSampler(Protocol):
    def __call__(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        """n times in [0, 1], fp32."""
        ...


TIME_SAMPLERS: Registry[TimeSampler] = Registry("time sampler")


@TIME_SAMPLERS.register("uniform", "t ~ U[0, 1)")
class UniformTime:
    """t ~ U[0, 1)."""

    def __call__(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        return torch.rand(n, generator=generator, device=device, dtype=torch.float32)


@TIME_SAMPLERS.register("logit-normal", "t = sigmoid(mean + std n), n ~ N(0, 1) (Esser et al. 2024)")
class LogitNormalTime:
    """t = sigmoid(mean + std n), n ~ N(0, 1)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        if std <= 0:
            raise ValueError(f"logit-normal std must be positive, got {std}")
        self.mean, self.std = mean, std

    def __call__(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
        return torch.sigmoid(self.mean + self.std * z)


@TIME_SAMPLERS.register("u-shaped", "p(t) ~ cosh(a (t - 1/2)): more weight at both ends (2-rectified flow++, "
                        "Lee et al. 2024; a = 4)")
class UShapedTime:
    """p(t) proportional to cosh(a (t - 1/2)) on [0, 1], by its inverse CDF: t = 1/2 + asinh((2u - 1) sinh(a/2)) / a,
    u ~ U[0, 1)."""

    def __init__(self, a: float = 4.0) -> None:
        if not a > 0:
            raise ValueError(f"u-shaped a must be positive, got {a}")
        self.a = a

    def __call__(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
        half = torch.sinh(torch.tensor(self.a / 2, dtype=torch.float32, device=u.device))
        return (0.5 + torch.asinh((2 * u - 1) * half) / self.a).clamp(0.0, 1.0)


def get_time_sampler(name: str = "uniform", **params: Any) -> TimeSampler:
    """The time sampler ``name`` of ``TIME_SAMPLERS`` with ``params``; ValueError for an unknown name or parameter."""
    return TIME_SAMPLERS.build(name, **params)
