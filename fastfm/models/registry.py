"""Name -> model class registry, so checkpoints can store ``model.config`` as JSON, and each model's defaults
for a data set."""

from __future__ import annotations

from typing import Any

from torch import nn

from fastfm.models.mlp import MLP
from fastfm.models.sit import SiT
from fastfm.models.unet import UNet
from fastfm.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")
MODELS.register("mlp", "time-conditioned MLP, for vector data (flow_map=true: two times, u(x, t, h))", MLP)
MODELS.register("unet", "ADM-style UNet, for image data (flow_map=true: two times, u(x, t, h))", UNet)
MODELS.register("sit", "SiT/DiT transformer, for image data (size=S|B|L|XL patch=2|4|8, LightningDiT's norm=rms, "
                "mlp=swiglu, rope=true, qk_norm=true; flow_map=true: two times, u(x, t, h))", SiT)


def build_model(config: dict[str, Any]) -> nn.Module:
    """Build a model from ``{"name": <registered name>, **constructor_kwargs}``.

    Inverse of ``model.config``: ``build_model(model.config)`` has the same architecture
    (and accepts ``model.state_dict()``). Raises ValueError for an unknown name or bad kwargs.
    """
    kwargs = dict(config)
    return MODELS.build(kwargs.pop("name", None), **kwargs)


def config_for_data(name: str, *, data: str, kind: str, shape: tuple[int, ...], num_classes: int | None,
                    class_cond: bool = False, superres: int = 0, overrides: dict[str, Any] | None = None,
                    ) -> dict[str, Any]:
    """The config ``build_model`` takes for a data set: model ``name`` ("auto": unet for images, mlp for vectors)
    with its defaults for data ``kind`` and ``shape`` (the model class's ``config_for_data``), then ``overrides``.

    ``data`` names the data set in errors; ``num_classes`` is its label count (None: unlabelled), which the model
    conditions on with ``class_cond``. ValueError where the model and the data do not fit.
    """
    if name == "auto":
        name = "unet" if kind == "image" else "mlp"
    model = MODELS.entry(name).factory
    if class_cond and num_classes is None:
        raise ValueError(f"--class-cond needs a labelled data set; {data!r} has no labels")
    base = model.config_for_data(data=data, kind=kind, shape=tuple(shape),  # type: ignore[attr-defined]
                                 num_classes=num_classes if class_cond else None, superres=superres)
    return {**base, **(overrides or {})}
