"""Time and class embeddings shared by all velocity models."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn


def fp32_region(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device_type`` (a no-op where autocast does not exist, e.g. ``meta``,
    on which the CPU tests trace programs to see device bugs)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class SinusoidalEmbedding(nn.Module):
    """Transformer/ADM sinusoidal embedding of ``s = scale * t``.

    ``emb(t) = [cos(s * w_0), ..., cos(s * w_{h-1}), sin(s * w_0), ..., sin(s * w_{h-1})]``
    with ``w_i = max_period^(-i / h)`` and ``h = dim // 2`` (zero-padded when ``dim`` is odd).
    Always computed in float32, with autocast disabled, so that bf16 does not destroy the
    resolution of t near 0 and 1. The w_i are a non-persistent fp32 buffer (not in the state
    dict): no factory op runs in forward, which torch.export cannot lift out of torch.func.jvp.
    """

    freqs: Tensor

    def __init__(self, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"SinusoidalEmbedding needs dim >= 2, got {dim}")
        self.dim = dim
        self.max_period = max_period
        self.scale = scale
        half = dim // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(max_period) / half))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        """Map times ``t`` of shape (B,) to float32 embeddings of shape (B, dim)."""
        with fp32_region(t.device.type):
            args = (t.to(torch.float32) * self.scale)[:, None] * self.freqs.float()[None, :]
            emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
            if self.dim % 2:
                emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb


def _time_mlp(freq_dim: int, emb_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


class ConditionEmbedding(nn.Module):
    """Embedding of the conditioning ``(t, y)`` (a flow map's ``(t, h, y)``) into one vector of size ``emb_dim``.

    ``e = T(sinusoidal(t)) [+ H(sinusoidal(h))] + E[y]`` with ``T``, ``H`` two-layer SiLU MLPs and ``E`` an
    ``nn.Embedding(num_classes + 1, emb_dim)`` whose last row (index ``num_classes``) is the NULL class used for
    classifier-free guidance; ``y=None`` means the NULL class. With ``flow_map`` the model also takes the step
    ``h`` >= 0 from its time t (the average velocity u(x, t, t + h) of MeanFlow, the step d of a shortcut model);
    ``h=None`` means h = 0, the instantaneous velocity. ``H``'s last layer starts at zero.
    """

    def __init__(self, freq_dim: int, emb_dim: int, num_classes: int | None = None, flow_map: bool = False) -> None:
        super().__init__()
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes}")
        self.num_classes = num_classes
        self.sinusoidal = SinusoidalEmbedding(freq_dim)
        self.time = _time_mlp(freq_dim, emb_dim)
        self.step = _time_mlp(freq_dim, emb_dim) if flow_map else None
        if self.step is not None:  # a fresh step embedding adds nothing: a flow map initialised from a velocity
            nn.init.zeros_(self.step[2].weight)  # model (--init) starts as that model at every step h
            nn.init.zeros_(self.step[2].bias)
        self.label = None if num_classes is None else nn.Embedding(num_classes + 1, emb_dim)

    def forward(self, t: Tensor, y: Tensor | None = None, h: Tensor | None = None) -> Tensor:
        """Return the (B, emb_dim) conditioning vector for times (B,), labels (B,) or None, steps (B,) or None."""
        dtype = self.time[0].weight.dtype  # casts are no-ops unless the weights are cast
        emb = self.time(self.sinusoidal(t).to(dtype))
        if self.step is not None:
            emb = emb + self.step(self.sinusoidal(torch.zeros_like(t) if h is None else h).to(dtype))
        elif h is not None:
            raise ValueError("a step h was given to a model of one time: build it with flow_map=true (--model-args "
                             "flow_map=true) to condition on two times")
        if self.label is None:
            if y is not None:
                raise ValueError("class labels y were given to a model built with num_classes=None")
            return emb
        if y is None:
            y = torch.full_like(t, self.num_classes, dtype=torch.long)
        return emb + self.label(y)
