"""SDE sampling with the flow's marginals (Albergo & Vanden-Eijnden, 2022): for any eps(t) >= 0,

    dX = [v(X, t) + eps(t)/2 * score(X, t)] dt + sqrt(eps(t)) dW

has the same marginals p_t as the ODE dX = v dt (eps = 0). The score comes from the model in closed
form (``fastfm.solve.score``), so any Gaussian-base affine path and any prediction target works.

Fixed-step Euler-Maruyama over ``score_interval`` (t = 1 moved in by T_EPS where sigma_1 = 0, the
score diverging there), then, when the interval stops short of t = 1, one denoising jump to the
model's E[x1 | x_t] (``fastfm.solve.ode.jump_to_data``, the ODE sampler's jump). The noise is an input
(``noise``: steps x the state's shape, standard normal) or drawn from a generator; no host syncs, so
the solve traces like the ODE sampler.

Diffusion schedules (``parse_diffusion``): a number C is eps(t) = C; ``sin2:C`` is
eps(t) = C sin^2(pi t), which vanishes at both ends (no noise where the score is largest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from fastfm.solve.guidance import guided_model
from fastfm.path.affine import AffinePath
from fastfm.solve.ode import SampleResult, jump_to_data
from fastfm.solve.score import score_from_prediction, score_interval
from fastfm.solve.solvers import time_grid

Diffusion = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class DiffusionSchedule:
    """eps(t) = scale (``const``) or scale * sin^2(pi t) (``sin2``)."""

    kind: str
    scale: float

    def __call__(self, t: Tensor) -> Tensor:
        if self.kind == "const":
            return torch.full_like(t, self.scale)
        return self.scale * torch.sin(math.pi * t) ** 2

    def __str__(self) -> str:
        return f"{self.scale:g}" if self.kind == "const" else f"{self.kind}:{self.scale:g}"


def parse_diffusion(text: str) -> DiffusionSchedule:
    """'C' (constant eps = C) or 'sin2:C'; C a finite number >= 0."""
    kind, _, value = text.rpartition(":")
    kind = kind or "const"
    try:
        scale = float(value)
    except ValueError:
        raise ValueError(f"diffusion {text!r}: expected a number C or sin2:C") from None
    if kind not in ("const", "sin2") or not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"diffusion {text!r}: expected C or sin2:C with a finite C >= 0")
    return DiffusionSchedule(kind, scale)


def sde_sample(model: nn.Module, path: AffinePath, x0: Tensor, *, diffusion: Diffusion, steps: int = 100,
               target: str = "velocity", noise: Tensor | None = None, generator: torch.Generator | None = None,
               denoise: bool = True, y: Tensor | None = None, guidance: float = 1.0,
               **conditioning: Tensor) -> SampleResult:
    """Push x0 (drawn from ``path.prior``) to t = 1 with Euler-Maruyama (see the module doc).

    ``noise`` (steps, *x0.shape) standard normal draws, or drawn here from ``generator``. NFE counts
    model calls: one per step, plus one for the denoising jump.
    """
    if noise is None:  # drawn where the generator lives, then moved to the state's device
        where = generator.device if generator is not None else x0.device
        noise = torch.randn((steps, *x0.shape), generator=generator, dtype=x0.dtype, device=where).to(x0.device)
    if noise.shape != (steps, *x0.shape):
        raise ValueError(f"noise must have shape {(steps, *x0.shape)}, got {tuple(noise.shape)}")
    g = guided_model(model, y, guidance, **conditioning)
    lo, hi = score_interval(path, target)
    grid = time_grid(steps, lo, hi, device=x0.device)
    x = x0
    for i in range(steps):
        t, h = grid[i], grid[i + 1] - grid[i]
        tb = t.expand(x.shape[0])
        pred = g(x, tb)
        v = path.to_velocity(pred, x, tb, target)
        eps = diffusion(t).to(x.dtype)
        drift = v + 0.5 * eps * score_from_prediction(path, pred, x, tb, target)
        x = x + h * drift + torch.sqrt(eps * h) * noise[i]
    if denoise and hi < 1.0:
        return SampleResult(jump_to_data(g, path, x, grid[-1], target), steps + 1)
    return SampleResult(x, steps)
