"""Reference implementations of the engine's hot ops: the spec the fused kernels are tested against."""

from __future__ import annotations

from torch import Tensor

from fastfm.paths import Coefficients, expand_like


def affine_path(x0: Tensor, x1: Tensor, coef: Coefficients) -> tuple[Tensor, Tensor]:
    """x_t = a x0 + b x1 and target = c x0 + d x1 with per-sample fp32 coefficients (B,)."""
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 shapes differ: {tuple(x0.shape)} vs {tuple(x1.shape)}")
    a, b, c, d = (expand_like(v, x1) for v in (coef.a, coef.b, coef.c, coef.d))
    return a * x0 + b * x1, c * x0 + d * x1


def cfm_loss(v: Tensor, target: Tensor) -> Tensor:
    """Per-sample CFM loss: mean over non-batch dims of (v - target)^2, reduced in fp32."""
    return (v.float() - target.float()).pow(2).flatten(1).mean(1)
