"""Classic 2-D toy distributions (FFJORD / torchcfm style), drawn with torch ops.

Every sampler maps (n, generator) to (x, labels): x is (n, 2) float32 within
roughly [-4, 4]^2, labels is (n,) int64 (the component a point came from) or None.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Sampler = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]]


def _coin(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """n integers uniform on {0, ..., k-1}."""
    return torch.randint(0, k, (n,), generator=generator)


def _polar(r: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    return torch.stack([r * angle.cos(), r * angle.sin()], dim=1)


def checkerboard(n: int, generator: torch.Generator) -> tuple[torch.Tensor, None]:
    """Uniform on the 8 squares of side 2 in [-4, 4]^2 with floor(x1/2) + floor(x2/2) even."""
    x1 = torch.rand(n, generator=generator) * 4 - 2
    x2 = torch.rand(n, generator=generator) - 2 * _coin(n, 2, generator) + torch.floor(x1) % 2
    return 2 * torch.stack([x1, x2], dim=1), None


def eight_gaussians(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_k + 0.5 eps) / sqrt 2 with c_k = 4 (cos pi k/4, sin pi k/4), k ~ U{0..7}."""
    k = _coin(n, 8, generator)
    centres = _polar(torch.full((n,), 4.0), k * (math.pi / 4))
    return (centres + 0.5 * torch.randn(n, 2, generator=generator)) / math.sqrt(2), k


def moons(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved half circles, t ~ U[0, pi]: (cos t, sin t) and (1 - cos t, 1/2 - sin t);
    noise 0.1, then scaled by 2 and shifted by (-1, -0.2)."""
    k = _coin(n, 2, generator)
    t = torch.rand(n, generator=generator) * math.pi
    upper = torch.stack([t.cos(), t.sin()], dim=1)
    lower = torch.stack([1 - t.cos(), 0.5 - t.sin()], dim=1)
    x = torch.where(k[:, None] == 0, upper, lower) + 0.1 * torch.randn(n, 2, generator=generator)
    return 2 * x + torch.tensor([-1.0, -0.2]), k


def circles(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Concentric circles of radius 3 (label 0) and 1.5 (label 1), isotropic noise 0.24."""
    k = _coin(n, 2, generator)
    angle = torch.rand(n, generator=generator) * (2 * math.pi)
    x = _polar(1.0 - 0.5 * k, angle) + 0.08 * torch.randn(n, 2, generator=generator)
    return 3 * x, k


def two_spirals(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Point reflections of one spiral: m = 3 pi sqrt(u), d = (-m cos m, m sin m) + U[0, 1/2)^2;
    x = +-d / 3 + 0.1 eps, the sign giving the label."""
    k = _coin(n, 2, generator)
    m = torch.rand(n, generator=generator).sqrt() * (3 * math.pi)
    d = torch.stack([-m * m.cos(), m * m.sin()], dim=1) + 0.5 * torch.rand(n, 2, generator=generator)
    sign = (1 - 2 * k).to(torch.float32)[:, None]
    return sign * d / 3 + 0.1 * torch.randn(n, 2, generator=generator), k


def pinwheel(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Five arms: f = (1 + 0.3 e1, 0.1 e2) rotated by 2 pi k / 5 + 0.25 exp(f1), times 2."""
    k = _coin(n, 5, generator)
    f = torch.randn(n, 2, generator=generator) * torch.tensor([0.3, 0.1]) + torch.tensor([1.0, 0.0])
    angle = k * (2 * math.pi / 5) + 0.25 * f[:, 0].exp()
    c, s = angle.cos(), angle.sin()
    return 2 * torch.stack([c * f[:, 0] - s * f[:, 1], s * f[:, 0] + c * f[:, 1]], dim=1), k


TOYS: dict[str, tuple[Sampler, int | None]] = {
    "checkerboard": (checkerboard, None),
    "8gaussians": (eight_gaussians, 8),
    "moons": (moons, 2),
    "circles": (circles, 2),
    "2spirals": (two_spirals, 2),
    "pinwheel": (pinwheel, 5),
}
"""Toy name -> (sampler, number of classes its labels take, or None)."""
