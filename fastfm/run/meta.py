"""``RunMeta``: what sampling, evaluation and export need to rebuild a run, saved as its model.json.

    model        the model's config (``fastfm.models.build_model`` rebuilds it): num_classes, low_res_channels
    path         the path's registered name and its arguments; source: 'gaussian' or a data set (interpolants)
    target       what the model predicts (velocity, x1, x0); seed: the run's seed (data split, source)
    superres     factor f of super-resolution (0: none): the model takes low_res = avg_pool(x1, f) as input
    data         name, args, shape, kind ('vector' | 'image'), levels (discrete data), num_classes

The conditioning of a batch lives here once: labels ``y`` for class-conditional models and ``low_res``, the
images average-pooled by f (:meth:`RunMeta.conditioning`), checked for shape and finite values where a user gives
it (:meth:`RunMeta.check_conditioning`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Cond = dict[str, Tensor]
KINDS = ("vector", "image")


class MetaError(ValueError):
    """A model.json that does not describe a run; the message names the field."""


def rows(cond: Cond, i: int, m: int, device: torch.device | str | None = None) -> Cond:
    """Rows i..i+m of per-sample conditioning (on ``device`` if given)."""
    return {k: v[i:i + m].to(device) if device is not None else v[i:i + m] for k, v in cond.items()}


def downsample(images: Tensor, factor: int) -> Tensor:
    """The low-resolution input of super-resolution: ``images`` average-pooled over factor x factor blocks."""
    return F.avg_pool2d(images, factor)


@dataclass(frozen=True)
class DataMeta:
    """The data set a run trained on (same name, args and seed give the same test split)."""

    name: str
    shape: tuple[int, ...]
    kind: str
    args: dict[str, Any] = field(default_factory=dict)
    levels: int | None = None
    num_classes: int | None = None

    @property
    def dim(self) -> int:
        return math.prod(self.shape)


@dataclass
class RunMeta:
    """A run's model.json, typed (see the module doc); ``path_args`` change while a learned path trains."""

    model: dict[str, Any]
    path: str
    source: str
    target: str
    data: DataMeta
    path_args: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    superres: int = 0
    fastfm_version: str = ""

    @staticmethod
    def bare(shape: tuple[int, ...], *, target: str = "velocity", kind: str = "vector",
             num_classes: int | None = None, flow_map: bool = False) -> RunMeta:
        """The metadata of a model that no fastfm run trained (a field of one's own behind ``EagerSampler``):
        data of ``shape`` and ``kind``, a Gaussian source, ``num_classes`` classes (None: unconditional), a flow map
        ``model(x, t, h=)`` or a velocity ``model(x, t)``."""
        return RunMeta(model={"num_classes": num_classes, "flow_map": flow_map}, path="custom", source="gaussian",
                       target=target,
                       data=DataMeta(name="custom", shape=tuple(shape), kind=kind, num_classes=num_classes))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def num_classes(self) -> int | None:
        return self.model.get("num_classes")

    @property
    def flow_map(self) -> bool:
        """Whether the model takes two times (a flow map u(x, t, h): MeanFlow, shortcut models)."""
        return bool(self.model.get("flow_map", False))

    @property
    def low_res_shape(self) -> tuple[int, ...] | None:
        """Per-row shape (C_low, H / f, W / f) of the ``low_res`` input of a super-resolution model, else None."""
        if not self.superres:
            return None
        _, h, w = self.data.shape
        return (int(self.model["low_res_channels"]), h // self.superres, w // self.superres)

    def conditioning(self, images: Tensor | None = None, labels: Tensor | None = None) -> Cond:
        """The model's conditioning of a batch: ``y`` = labels (class-conditional models, if given) and
        ``low_res`` = the batch's images downsampled by the factor (super-resolution models)."""
        cond: Cond = {}
        if labels is not None and self.num_classes is not None:
            cond["y"] = labels
        if self.superres and images is not None:
            cond["low_res"] = downsample(images, self.superres)
        return cond

    def check_conditioning(self, cond: Cond, what: str = "low_res") -> None:
        """A user's ``low_res`` fits this run: only for super-resolution models, shape (N, *low_res_shape) with
        N >= 1, finite. ``what`` names where it came from in the error."""
        low = cond.get("low_res")
        if low is None:
            return
        want = self.low_res_shape
        if want is None:
            raise ValueError(f"{what} given, but the model was not trained for super-resolution")
        if low.dim() != 4 or tuple(low.shape[1:]) != want or low.shape[0] == 0:
            h, w = self.data.shape[1:]
            raise ValueError(f"{what}: expected shape (N, {', '.join(map(str, want))}) with N >= 1 (the {h}x{w} "
                             f"images pooled by {self.superres}), got {tuple(low.shape)}")
        if not bool(torch.isfinite(low).all()):
            raise ValueError(f"{what} holds NaN/Inf values")

    def to_json(self) -> dict[str, Any]:
        """The model.json object."""
        d = self.data
        return {"fastfm_version": self.fastfm_version, "model": self.model,
                "path": {"name": self.path, "args": self.path_args}, "source": self.source, "seed": self.seed,
                "target": self.target, "superres": self.superres,
                "data": {"name": d.name, "args": d.args, "shape": list(d.shape), "kind": d.kind, "levels": d.levels,
                         "num_classes": d.num_classes}}

    @staticmethod
    def from_json(obj: Any, where: str = "model.json") -> RunMeta:
        """Validated: every required field present with its type (MetaError naming ``where`` and the field)."""
        def need(d: Any, key: str, kind: type | tuple[type, ...], prefix: str = "") -> Any:
            if not isinstance(d, dict) or key not in d:
                raise MetaError(f"{where}: model metadata lacks {prefix + key!r}")
            if not isinstance(d[key], kind) or isinstance(d[key], bool) and kind is int:
                raise MetaError(f"{where}: {prefix}{key} must be {getattr(kind, '__name__', kind)}, got {d[key]!r}")
            return d[key]

        if not isinstance(obj, dict):
            raise MetaError(f"{where}: model metadata must be a JSON object, got {type(obj).__name__}")
        missing = [k for k in ("model", "path", "source", "target", "data") if k not in obj]
        if missing:
            raise MetaError(f"{where}: model metadata lacks {missing}")
        path, data = need(obj, "path", dict), need(obj, "data", dict)
        shape = need(data, "shape", list, "data.")
        if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
            raise MetaError(f"{where}: data.shape must be a list of positive integers, got {shape!r}")
        kind = need(data, "kind", str, "data.")
        if kind not in KINDS:
            raise MetaError(f"{where}: data.kind must be one of {KINDS}, got {kind!r}")
        superres = obj.get("superres") or 0
        if not isinstance(superres, int) or superres < 0 or superres and (kind != "image" or len(shape) != 3):
            raise MetaError(f"{where}: superres must be 0 or a factor >= 1 of image data, got {superres!r}")
        return RunMeta(model=need(obj, "model", dict), path=need(path, "name", str, "path."),
                       path_args=dict(path.get("args") or {}), source=need(obj, "source", str),
                       target=need(obj, "target", str), seed=int(obj.get("seed", 0)), superres=superres,
                       fastfm_version=str(obj.get("fastfm_version", "")),
                       data=DataMeta(name=need(data, "name", str, "data."), shape=tuple(shape), kind=kind,
                                     args=dict(data.get("args") or {}), levels=data.get("levels"),
                                     num_classes=data.get("num_classes")))
