"""Conditional Flow Matching loss: E_{t, x0, x1} || v_theta(x_t, t) - target ||^2 (Theorem 2).

x_t comes from the fused path op and the loss from the fused CFM loss op (fastfm.kernels.ops):
neither the target nor, with ``x0=None``, the noise x0 = std * N(0, I) is ever stored; the
backward pass regenerates the noise from the state ``rng = [seed, offset]`` (an int64 tensor on
the data's device, fastfm.kernels.rng).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastfm.path.densities import Gaussian
from fastfm.kernels import ops
from fastfm.path.affine import AffinePath


LOSSES = ("squared", "pseudo-huber")
"""The per-sample loss of a regression: the squared error (1/D) |delta|^2, or pseudo-Huber (``robust``)."""
HUBER_C = 0.00054
"""2-rectified flow++'s pseudo-Huber scale per sqrt(dimension): c = 0.00054 sqrt(D) (Lee et al. 2024)."""


def robust(sum_sq: Tensor, dim: int) -> Tensor:
    """Pseudo-Huber loss sqrt(|delta|^2 + c^2) - c, c = HUBER_C sqrt(D), of per-sample |delta|^2 (B,): quadratic
    below c, linear above (2-rectified flow++: fewer large gradients from outliers than the squared error)."""
    c = HUBER_C * math.sqrt(dim)
    return torch.sqrt(sum_sq + c * c) - c


def noise_std(path: AffinePath, x0: Tensor | None) -> float:
    """The std of the Gaussian source the kernels draw x0 from when ``x0`` is None (1.0 where x0 is given from
    another source); ValueError for in-kernel noise from a source that is not Gaussian."""
    if isinstance(path.source, Gaussian):
        return path.source.std
    if x0 is None:
        raise ValueError(f"in-kernel noise needs a Gaussian source; this path's source is {path.source!r}: pass x0")
    return 1.0


@dataclass
class LossOutput:
    """Mean loss (scalar, fp32) and the per-sample losses (B,)."""

    loss: Tensor
    per_sample: Tensor


def cfm_loss(model: nn.Module, path: AffinePath, x0: Tensor | None, x1: Tensor, t: Tensor, target: str = "velocity",
             rng: Tensor | None = None, **conditioning: Tensor) -> LossOutput:
    """Regress the model on the path's target at x_t: the mean over samples of |model(x_t, t) - target|^2.

    x0 = None draws the source noise inside the kernels from the stream of ``rng`` (Gaussian sources
    only; a shard of a batch passes its rows' offset, see ``fastfm.kernels.ops.noise_state``).
    """
    std = noise_std(path, x0)
    coef = path.coefficients(t, target)
    x_t, _ = ops.affine_path(x1, coef.a, coef.b, coef.c, coef.d, x0, rng, std, write_target=False)
    v = model(x_t, t, **conditioning)
    per_sample = ops.cfm_loss(v.to(x1.dtype), x1, coef.c, coef.d, x0, rng, std)
    return LossOutput(per_sample.mean(), per_sample)
