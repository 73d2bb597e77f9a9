"""Quantised pixels <-> continuous model space in [-1, 1].

A pixel value x in {0, ..., L-1} (L = ``levels``) owns the bin [x, x+1); uniform
dequantisation maps it to y = 2 (x + u) / L - 1 with u ~ U[0, 1), and
``to_pixels`` inverts this with x = clamp(floor((y + 1) L / 2), 0, L-1).
"""

from __future__ import annotations

import torch


def _bins(y: torch.Tensor, levels: int) -> torch.Tensor:
    """floor((y + 1) L / 2) clamped to {0, ..., L-1}, as float."""
    return torch.floor((y + 1) * (levels / 2)).clamp_(0, levels - 1)


def dequantise(x: torch.Tensor, levels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """y = 2 (x + u) / L - 1, u ~ U[0, 1) from ``generator``; float32 in [-1, 1).

    The rare values (about 1e-6) that float32 rounding pushes into a neighbouring
    bin are put at the bin centre, so ``to_pixels(dequantise(x), L) == x`` exactly.
    """
    x = x.to(torch.float32)
    u = torch.rand(x.shape, generator=generator, device=x.device)
    y = (x + u) * (2 / levels) - 1
    centre = (x + 0.5) * (2 / levels) - 1
    return torch.where(_bins(y, levels) == x, y, centre)


def to_pixels(y: torch.Tensor, levels: int) -> torch.Tensor:
    """Model space -> integer pixel values clamp(floor((y + 1) L / 2), 0, L-1) as uint8."""
    if not 2 <= levels <= 256:
        raise ValueError(f"to_pixels needs 2 <= levels <= 256 for uint8 output, got {levels}")
    return _bins(y.detach().float(), levels).to(torch.uint8)
