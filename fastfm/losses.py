"""Conditional Flow Matching loss: E_{t, x0, x1} w(t) || v_theta(x_t, t) - target ||^2 (Theorem 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from fastfm import ops
from fastfm.paths import AffinePath


@dataclass
class LossOutput:
    """Weighted mean loss (scalar, fp32) and the unweighted per-sample losses (B,)."""

    loss: Tensor
    per_sample: Tensor


def cfm_loss(model: nn.Module, path: AffinePath, x0: Tensor, x1: Tensor, t: Tensor, target: str = "velocity",
             weight: Callable[[Tensor], Tensor] | None = None, **conditioning: Tensor) -> LossOutput:
    """Regress the model on the path's target at x_t; ``weight(t)`` reweights samples per t."""
    ps = path.sample(x0, x1, t, target)
    per_sample = ops.cfm_loss(model(ps.x_t, t, **conditioning), ps.target)
    w = per_sample if weight is None else weight(t).float() * per_sample
    return LossOutput(w.mean(), per_sample)
