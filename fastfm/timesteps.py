"""Training-time distributions of t in [0, 1], always returned in fp32."""

from __future__ import annotations

import torch
from torch import Tensor

TIME_SAMPLERS = ("uniform", "logit-normal")


class TimeSampler:
    """t ~ U[0, 1) (``uniform``) or t = sigmoid(m + s n), n ~ N(0, 1) (``logit-normal``, Esser et al. 2024)."""

    def __init__(self, name: str = "uniform", mean: float = 0.0, std: float = 1.0) -> None:
        if name not in TIME_SAMPLERS:
            raise ValueError(f"unknown time sampler {name!r}; choose one of {TIME_SAMPLERS}")
        if std <= 0:
            raise ValueError(f"logit-normal std must be positive, got {std}")
        self.name, self.mean, self.std = name, mean, std

    def __call__(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        if self.name == "uniform":
            return torch.rand(n, generator=generator, device=device, dtype=torch.float32)
        z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
        return torch.sigmoid(self.mean + self.std * z)
