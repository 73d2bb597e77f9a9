"""Classifier-free guidance: label dropout at training, one batched guided call at sampling."""

from __future__ import annotations

import math
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
                 **conditioning: Tensor) -> Callable[..., Tensor]:
    """v(x, t) = v_u + w (v_c - v_u); conditional and unconditional passes in one batch of 2B. Per-call keywords
    (a flow map's step ``h``, (B,)) go to the model with x and t: ``field(x, t, h=h)``.

    w = 1 is the plain conditional model (one pass); ``y=None`` gives the unconditional model.
    """
    if y is None or scale == 1.0:
        cond = dict(conditioning, y=y) if y is not None else conditioning
        return lambda x, t, **step: model(x, t, **cond, **step)
    null = getattr(model, "num_classes", None)
    if null is None:
        raise ValueError("guidance needs a class-conditional model (num_classes is None)")
    y2 = torch.cat([y, torch.full_like(y, null)])
    cond2 = {k: torch.cat([v, v]) for k, v in conditioning.items()}

    def field(x: Tensor, t: Tensor, **step: Tensor) -> Tensor:
        doubled = {k: torch.cat([v, v]) for k, v in step.items()}
        v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), y=y2, **cond2, **doubled).chunk(2)
        return v_u + scale * (v_c - v_u)

    return field


def check_conditioning(num_classes: int | None, guidance: float, class_label: int | None) -> None:
    """The one rule set for labels and guidance at inference (eager runs and engines alike): a class label
    names one of the model's classes; a guidance scale w != 1 is finite and needs a class-conditional model."""
    if class_label is not None and (num_classes is None or not 0 <= class_label < num_classes):
        have = "no classes" if num_classes is None else f"classes 0..{num_classes - 1}"
        raise ValueError(f"class label {class_label} invalid: the model has {have} (--class-label {class_label})")
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be finite, got {guidance}")
    if guidance != 1.0 and num_classes is None:
        raise ValueError(f"guidance {guidance} needs a class-conditional model; this one has no classes "
                         f"(--guidance {guidance})")


def default_labels(n: int, num_classes: int | None, class_label: int | None) -> Tensor | None:
    """Labels of n samples: all ``class_label``, or cycling through the classes; None for an unconditional model."""
    if num_classes is None:
        return None
    return torch.full((n,), class_label) if class_label is not None else torch.arange(n) % num_classes
