"""Name -> model class registry, so checkpoints can store ``model.config`` as JSON."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from fastfm.models.mlp import MLP
from fastfm.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "unet": UNet}


def build_model(config: dict[str, Any]) -> nn.Module:
    """Build a model from ``{"name": <registered name>, **constructor_kwargs}``.

    Inverse of ``model.config``: ``build_model(model.config)`` has the same architecture
    (and accepts ``model.state_dict()``). Raises ValueError for an unknown name or bad kwargs.
    """
    kwargs = dict(config)
    name = kwargs.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; available: {sorted(MODELS)}")
    cls = MODELS[name]
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        raise ValueError(f"bad config for model {name!r}: {err}") from err
    return cls(**kwargs)
