"""Time-conditioned MLP velocity field for vector data of shape (B, dim)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fastfm.models.embeddings import ConditionEmbedding
from fastfm.models.options import POSITIVE, Limit, checked_options

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
}


class MLP(nn.Module):
    """``v(x, t, y) = MLP([x, e(t, y)])`` with ``e`` from :class:`ConditionEmbedding`.

    ``depth`` hidden layers of width ``hidden``; the conditioning vector (size ``time_dim``)
    is concatenated to the input. ``flow_map``: also conditioned on a step h, u(x, t, h) (see
    :class:`ConditionEmbedding`). With ``num_classes`` set, label ``num_classes`` (or
    ``y=None``) is the NULL class for classifier-free guidance.
    """

    @checked_options("mlp", {"dim": POSITIVE, "hidden": POSITIVE, "depth": POSITIVE, "time_dim": Limit(2)})
    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 4,
        time_dim: int = 64,
        num_classes: int | None = None,
        activation: str = "silu",
        flow_map: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        self.config = dict(
            name="mlp", dim=dim, hidden=hidden, depth=depth, time_dim=time_dim,
            num_classes=num_classes, activation=activation, flow_map=flow_map,
        )
        self.dim = dim
        self.num_classes = num_classes
        self.flow_map = flow_map
        self.cond = ConditionEmbedding(time_dim, time_dim, num_classes, flow_map)
        act = ACTIVATIONS[activation]
        layers: list[nn.Module] = [nn.Linear(dim + time_dim, hidden), act()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), act()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    @staticmethod
    def config_for_data(*, data: str, kind: str, shape: tuple[int, ...], num_classes: int | None,
                        superres: int = 0) -> dict[str, Any]:
        """The MLP's config for vector data of ``shape`` (dim = prod(shape)), before the user's overrides."""
        if kind != "vector" or superres:
            raise ValueError(f"the mlp model takes vector data without superres; {data!r} is {kind} data of shape "
                             f"{tuple(shape)}")
        return {"name": "mlp", "dim": math.prod(shape), "num_classes": num_classes}

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, h: Tensor | None = None) -> Tensor:
        """Velocity of shape (B, dim) at points x (B, dim), times t (B,), labels y (B,); with ``flow_map`` the
        average velocity over the steps h (B,) from t."""
        emb = self.cond(t, y, h)
        return self.net(torch.cat([x, emb], dim=-1))
