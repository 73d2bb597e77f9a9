"""Classifier-free guidance: label dropout at training, one batched guided call at sampling."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


def drop_labels(y: Tensor, p: float, null_class: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by the null class independently with probability p."""
    if p <= 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


def guided_model(model: nn.Module, y: Tensor | None, scale: float,
                 **conditioning: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """v(x, t) = v_u + w (v_c - v_u); conditional and unconditional passes in one batch of 2B.

    w = 1 is the plain conditional model (one pass); ``y=None`` gives the unconditional model.
    """
    if y is None or scale == 1.0:
        cond = dict(conditioning, y=y) if y is not None else conditioning
        return lambda x, t: model(x, t, **cond)
    null = getattr(model, "num_classes", None)
    if null is None:
        raise ValueError("guidance needs a class-conditional model (num_classes is None)")
    y2 = torch.cat([y, torch.full_like(y, null)])
    cond2 = {k: torch.cat([v, v]) for k, v in conditioning.items()}

    def field(x: Tensor, t: Tensor) -> Tensor:
        v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), y=y2, **cond2).chunk(2)
        return v_u + scale * (v_c - v_u)

    return field
