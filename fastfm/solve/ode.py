"""ODE sampling: integrate dx/dt = v(x, t) from the prior at t = 0 to data at t = 1.

Where the sampled field is singular at t = 1 (``AffinePath.time_interval`` stops at 1 - T_EPS: an x1 or x0
prediction on a path with sigma_1 = 0, any target on VP), the solve stops there and ends with one jump to the
model's E[x1 | x_t] (:func:`jump_to_data`, shared with the SDE sampler). The solve's last stretch is stiff
(x1 on trig at t = 0.999: dv/dx = sigma'/sigma ~ -1000, h dv/dx ~ -62 at 16 steps), so an explicit solver can
end far from the data; the jump reads the model's answer instead: exact for an exact model of a point mass,
O(sigma_t) from the flow's end otherwise (sigma_t = 1.6e-3 at t = 0.999 on trig).

NFE rule: steps x stages of a fixed-step solver (the adaptive solver's count), plus 1 for the jump. The
jump cannot reuse an evaluation: no stage of the last step is evaluated at the final state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from fastfm.solve.divergence import VectorField, augmented_field
from fastfm.solve.guidance import guided_model
from fastfm.path.affine import AffinePath, expand_like
from fastfm.solve.score import posterior_x0
from fastfm.solve.solvers import ADAPTIVE_TOL, DEFAULT_SOLVER, DEFAULT_STEPS, solve
from fastfm.solve.transport import kinetic_start, straightness, with_kinetic

Prediction = Callable[[Tensor, Tensor], Tensor]
"""A model's prediction of its target at (x, t), t of shape (B,) (``fastfm.solve.guidance.guided_model``)."""


@dataclass
class SampleResult:
    """Samples x(1), field evaluations, optional log p_1 of the samples and states on the grid, and (with
    ``transport``) per-sample kinetic energy int |v|^2 dt and straightness (``fastfm.solve.transport``)."""

    x: Tensor
    nfe: int
    log_prob: Tensor | None = None
    intermediates: Tensor | None = None
    kinetic: Tensor | None = None
    straightness: Tensor | None = None


def velocity_field(model: nn.Module, path: AffinePath, target: str = "velocity", y: Tensor | None = None,
                   guidance: float = 1.0, **conditioning: Tensor) -> VectorField:
    """v(x, t) with scalar t broadcast to (B,) fp32, guidance applied and the prediction converted to velocity."""
    return _as_velocity(guided_model(model, y, guidance, **conditioning), path, target)


def _as_velocity(predict: Prediction, path: AffinePath, target: str) -> VectorField:
    def v(x: Tensor, t: Tensor) -> Tensor:
        tb = t.float().expand(x.shape[0])
        return path.to_velocity(predict(x, tb), x, tb, target)

    return v


def posterior_x1(path: AffinePath, pred: Tensor, x: Tensor, t: Tensor, target: str) -> Tensor:
    """E[x1 | x_t = x] from a prediction of ``target`` at times t (B,): the prediction itself for x1,
    else (x - sigma_t E[x0 | x_t]) / alpha_t (``fastfm.solve.score.posterior_x0``)."""
    if target == "x1":
        return pred
    s = path.scheduler(t.to(x.dtype))
    return (x - expand_like(s.sigma_t, x) * posterior_x0(path, pred, x, t, target)) / expand_like(s.alpha_t, x)


def jump_to_data(predict: Prediction, path: AffinePath, x: Tensor, t: Tensor, target: str) -> Tensor:
    """The final jump x -> E[x1 | x_t = x] at the solve's last time t (a 0-d tensor): one model call."""
    tb = t.float().expand(x.shape[0])
    return posterior_x1(path, predict(x, tb), x, tb, target)


def jumps(path: AffinePath, target: str = "velocity") -> bool:
    """Whether :func:`ode_sample` ends with the jump (one more NFE): its interval stops short of t = 1."""
    return path.time_interval(target)[1] < 1.0


def ode_sample(model: nn.Module, path: AffinePath, x0: Tensor, *, solver: str = DEFAULT_SOLVER,
           steps: int = DEFAULT_STEPS, grid: Tensor | None = None, target: str = "velocity", y: Tensor | None = None,
           guidance: float = 1.0, return_intermediates: bool = False, log_likelihood: bool = False,
           probes: Tensor | None = None, rtol: float = ADAPTIVE_TOL, atol: float = ADAPTIVE_TOL,
           transport: bool = False, denoise: bool = True, **conditioning: Tensor) -> SampleResult:
    """Push x0 (drawn from ``path.prior``) to t = 1 (over ``path.time_interval(target)`` without a grid),
    then, if that interval stops short of t = 1 and ``denoise``, jump from the grid's last time to E[x1 | x_t]
    (see the module doc; NFE counts the jump).

    With ``log_likelihood`` the divergence is integrated alongside, d/dt log p = -div v, starting
    from log p_0(x0): the samples' log-likelihood in the same pass (exact, or Hutchinson with ``probes``).
    With ``transport`` |v|^2 is integrated alongside too (same solve, the solver's quadrature): per-sample
    kinetic energy and straightness over the solved interval (``fastfm.solve.transport``). Both describe the solve
    up to its last time: ``log_prob`` is log p_t of the state before the jump, the time at which
    ``fastfm.solve.likelihood`` places data too.
    """
    g = guided_model(model, y, guidance, **conditioning)
    v = _as_velocity(g, path, target)
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
    if denoise and jumps(path, target):
        end = grid[-1] if grid is not None else torch.tensor(t1, device=x0.device)
        out.x, out.nfe = jump_to_data(g, path, out.x, end, target), out.nfe + 1
    if transport:
        first, last = (grid[0], grid[-1]) if grid is not None else (t0, t1)
        out.kinetic = ys[-1]
        out.straightness = straightness(ys[-1], x0, ys[0], abs(float(last) - float(first)))
    return out


def draw_prior(path: AffinePath, n: int, shape: tuple[int, ...], generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """n samples of the path's prior, the law of x at t = 0."""
    return path.prior.sample((n, *shape), generator=generator, device=device)
