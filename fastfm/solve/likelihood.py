"""Log-likelihood by the instantaneous change of variables, integrated from data (t = 1) to noise (t = 0).

    log p_1(x) = log p_0(x(0)) - int_0^1 div v(x(t), t) dt

Bits per dimension for L-level discrete data scaled to [-1, 1] by y = 2 (x + u) / L - 1, u ~ U[0, 1):
the scaling's log-determinant D log(2 / L) turns the density of y into one over x, so

    bpd = -(log p(y) + D log(2 / L)) / (D log 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastfm.solve.divergence import augmented_field
from fastfm.path.affine import AffinePath
from fastfm.solve.ode import velocity_field
from fastfm.solve.solvers import ADAPTIVE_TOL, DEFAULT_SOLVER, DEFAULT_STEPS, solve


@dataclass
class LikelihoodResult:
    """log p_1(x) in nats (B,), field evaluations, and the latent x(0)."""

    log_prob: Tensor
    nfe: int
    x0: Tensor


def ode_likelihood(model: nn.Module, path: AffinePath, x1: Tensor, *, solver: str = DEFAULT_SOLVER,
                   steps: int = DEFAULT_STEPS, grid: Tensor | None = None, target: str = "velocity",
                   probes: Tensor | None = None, y: Tensor | None = None, rtol: float = ADAPTIVE_TOL,
                   atol: float = ADAPTIVE_TOL,
                   **conditioning: Tensor) -> LikelihoodResult:
    """Exact divergence when ``probes`` is None, Hutchinson with probes of shape (k, *x1.shape) otherwise.

    Without a grid it integrates over ``path.time_interval(target)``, backwards.
    """
    if not torch.isfinite(x1).all():
        raise ValueError("log_likelihood: input contains NaN or Inf")
    if grid is not None:
        grid = grid.flip(0) if bool(grid[0] < grid[-1]) else grid
    return integrate_log_likelihood(model, path, x1, solver=solver, steps=steps, grid=grid, target=target,
                                    probes=probes, y=y, rtol=rtol, atol=atol, **conditioning)


def integrate_log_likelihood(model: nn.Module, path: AffinePath, x1: Tensor, *, solver: str = DEFAULT_SOLVER,
                             steps: int = DEFAULT_STEPS, grid: Tensor | None = None, target: str = "velocity",
                             probes: Tensor | None = None, y: Tensor | None = None, rtol: float = ADAPTIVE_TOL,
                             atol: float = ADAPTIVE_TOL, **conditioning: Tensor) -> LikelihoodResult:
    """The solve behind :func:`ode_likelihood`, unchecked: ``grid`` (if given) must run from data to noise.

    No host syncs or data-dependent branches with a fixed-step solver, so torch.export traces it.
    """
    v = velocity_field(model, path, target, y, 1.0, **conditioning)
    zero = torch.zeros(x1.shape[0], device=x1.device, dtype=torch.float32)
    t_start, t_end = path.time_interval(target)
    res = solve(augmented_field(v, probes, 1.0), (x1, zero), solver=solver, steps=steps, grid=grid,
                t0=t_end, t1=t_start, rtol=rtol, atol=atol)
    x0, delta = res.y
    return LikelihoodResult(path.prior.log_prob(x0) + delta, res.nfe, x0)


def bits_per_dim(log_prob: Tensor, dim: int, levels: int = 256) -> Tensor:
    """bits/dim of L-level data from log p(y) of its dequantised [-1, 1] scaling (see module doc)."""
    return -(log_prob + dim * math.log(2.0 / levels)) / (dim * math.log(2.0))


def nll_summary(log_prob: Tensor, dim: int, levels: int | None, **info: Any) -> dict[str, Any]:
    """Mean NLL in nats with its standard error, and for discrete data bits/dim with its own standard error
    (bits/dim is affine in log p, so its standard error is the nats one over D log 2)."""
    out: dict[str, Any] = {"nll_nats": float(-log_prob.mean()),
                           "nll_nats_stderr": float(log_prob.std() / math.sqrt(len(log_prob))), **info,
                           "n": len(log_prob)}
    if levels is not None:
        bpd = bits_per_dim(log_prob, dim, levels)
        out["bits_per_dim"] = float(bpd.mean())
        out["bits_per_dim_stderr"] = float(bpd.std() / math.sqrt(len(bpd)))
    return out
