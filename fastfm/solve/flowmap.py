"""Sampling with a flow map: the average velocity u(x, s, t) = (X_{s->t}(x) - x) / (t - s) of the ODE's flow,
learned by a model of two times (``flow_map=true``: ``model(x, s, h=t - s)``), steps from s to t in one call:

    x_{t_{i+1}} = x_{t_i} + (t_{i+1} - t_i) u(x_{t_i}, t_i, t_{i+1})        (k steps: k model calls)

A MeanFlow model (``fastfm.training.objectives``) is exact in one step where it has learned u exactly; a shortcut
model reads h as its step size d. A flow map has no density without the ODE (its likelihood is refused by the
plan, ``fastfm.solve.plan``).
"""

from __future__ import annotations

from torch import Tensor, nn

from fastfm.solve.guidance import guided_model
from fastfm.solve.ode import SampleResult


def flow_map_sample(model: nn.Module, x0: Tensor, grid: Tensor, *, y: Tensor | None = None, guidance: float = 1.0,
                    **conditioning: Tensor) -> SampleResult:
    """Push x0 along ``grid`` (fp32 times t_0 < ... < t_k on x0's device) with the map's steps (see the module
    doc); NFE = k. Times and steps reach the model in fp32, broadcast to (B,)."""
    u = guided_model(model, y, guidance, **conditioning)
    x = x0
    n = x.shape[0]
    for i in range(grid.shape[0] - 1):
        step = (grid[i + 1] - grid[i]).float()
        x = x + step.to(x.dtype) * u(x, grid[i].float().expand(n), h=step.expand(n)).to(x.dtype)
    return SampleResult(x, grid.shape[0] - 1)
