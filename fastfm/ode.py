"""ODE sampling: integrate dx/dt = v(x, t) from the prior at t = 0 to data at t = 1."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastfm.divergence import VectorField, augmented_field
from fastfm.guidance import guided_model
from fastfm.paths import AffinePath
from fastfm.solvers import ADAPTIVE_TOL, DEFAULT_SOLVER, DEFAULT_STEPS, solve
from fastfm.transport import kinetic_start, straightness, with_kinetic


@dataclass
class SampleResult:
    """Samples x(1), field evaluations, optional log p_1 of the samples and states on the grid, and (with
    ``transport``) per-sample kinetic energy int |v|^2 dt and straightness (``fastfm.transport``)."""

    x: Tensor
    nfe: int
    log_prob: Tensor | None = None
    intermediates: Tensor | None = None
    kinetic: Tensor | None = None
    straightness: Tensor | None = None


def velocity_field(model: nn.Module, path: AffinePath, target: str = "velocity", y: Tensor | None = None,
                   guidance: float = 1.0, **conditioning: Tensor) -> VectorField:
    """v(x, t) with scalar t broadcast to (B,) fp32, guidance applied and the prediction converted to velocity."""
    g = guided_model(model, y, guidance, **conditioning)

    def v(x: Tensor, t: Tensor) -> Tensor:
        tb = t.float().expand(x.shape[0])
        return path.to_velocity(g(x, tb), x, tb, target)

    return v


def sample(model: nn.Module, path: AffinePath, x0: Tensor, *, solver: str = DEFAULT_SOLVER,
           steps: int = DEFAULT_STEPS, grid: Tensor | None = None, target: str = "velocity", y: Tensor | None = None,
           guidance: float = 1.0, return_intermediates: bool = False, log_likelihood: bool = False,
           probes: Tensor | None = None, rtol: float = ADAPTIVE_TOL, atol: float = ADAPTIVE_TOL,
           transport: bool = False, **conditioning: Tensor) -> SampleResult:
    """Push x0 (drawn from ``path.prior``) to t = 1 (to ``path.time_interval(target)`` without a grid).

    With ``log_likelihood`` the divergence is integrated alongside, d/dt log p = -div v, starting
    from log p_0(x0): the samples' log-likelihood in the same pass (exact, or Hutchinson with ``probes``).
    With ``transport`` |v|^2 is integrated alongside too (same solve, the solver's quadrature): per-sample
    kinetic energy and straightness over the solved interval (``fastfm.transport``).
    """
    v = velocity_field(model, path, target, y, guidance, **conditioning)
    t0, t1 = path.time_interval(target)
    opts = dict(solver=solver, steps=steps, grid=grid, t0=t0, t1=t1, rtol=rtol, atol=atol,
                return_intermediates=return_intermediates)
    if log_likelihood:
        f, state = augmented_field(v, probes, -1.0), (x0, path.prior.log_prob(x0))
    else:
        f, state = (lambda t, x: v(x, t)), (x0,)
    if transport:
        f, state = with_kinetic(f), (*state, kinetic_start(x0))
    res = solve(f, state if len(state) > 1 else state[0], **opts)
    ys = res.y if isinstance(res.y, tuple) else (res.y,)
    inter = res.intermediates if res.intermediates is None or isinstance(res.intermediates, Tensor) \
        else res.intermediates[0]
    out = SampleResult(ys[0], res.nfe, ys[1] if log_likelihood else None, inter)
    if transport:
        first, last = (grid[0], grid[-1]) if grid is not None else (t0, t1)
        out.kinetic = ys[-1]
        out.straightness = straightness(ys[-1], x0, ys[0], abs(float(last) - float(first)))
    return out


def draw_prior(path: AffinePath, n: int, shape: tuple[int, ...], generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """n samples of the path's prior, the law of x at t = 0."""
    return path.prior.sample((n, *shape), generator=generator, device=device)
