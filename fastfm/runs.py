"""Assembly shared by the entry points: data set, source density, path and model from a
config or from a checkpoint's model.json, so train, sample, evaluate and export agree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fastfm
from fastfm import seeding
from fastfm.checkpoint import CheckpointError, load_inference
from fastfm.config import TrainConfig
from fastfm.data import Dataset, get_dataset
from fastfm.densities import Density, SampleDensity
from fastfm.models import build_model, config_for_data
from fastfm.paths import AffinePath, get_path


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; a CUDA request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def build_source(name: str, seed: int, shape: tuple[int, ...]) -> Density | None:
    """None (standard normal) for 'gaussian', else a data set (of the data's shape) as an interpolant's base."""
    if name == "gaussian":
        return None
    source = get_dataset(name, seed=seeding.derive(seed, seeding.SOURCE))
    if tuple(source.shape) != tuple(shape):
        raise ValueError(f"source {name!r} has samples of shape {tuple(source.shape)}, the data {tuple(shape)}")
    return SampleDensity(source)


def path_from_meta(meta: dict[str, Any]) -> AffinePath:
    p = meta["path"]
    source = build_source(meta["source"], meta.get("seed", 0), tuple(meta["data"]["shape"]))
    return get_path(p["name"], source, **p.get("args", {}))


def model_for(cfg: TrainConfig, data: Dataset) -> nn.Module:
    """The model of a training config for its data set: the model's own defaults for that data
    (``fastfm.models.config_for_data``), then ``cfg.model_args``."""
    return build_model(config_for_data(cfg.model, data=data.name, kind=data.kind, shape=data.shape,
                                       num_classes=data.num_classes, class_cond=cfg.class_cond, superres=cfg.superres,
                                       overrides=cfg.model_args))


def run_meta(cfg: TrainConfig, data: Dataset, model: nn.Module) -> dict[str, Any]:
    """What sampling, evaluation and export need to rebuild the run (written as model.json)."""
    return {
        "fastfm_version": fastfm.__version__, "model": model.config,
        "path": {"name": cfg.path, "args": cfg.path_args}, "source": cfg.source, "seed": cfg.seed,
        "target": cfg.target, "superres": cfg.superres,
        "data": {"name": cfg.data, "args": cfg.data_args, "shape": list(data.shape), "kind": data.kind,
                 "levels": data.levels, "num_classes": data.num_classes},
    }


@dataclass
class LoadedRun:
    """A trained model (EMA weights, eval mode) with the path and metadata it was trained with."""

    model: nn.Module
    path: AffinePath
    meta: dict[str, Any]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.meta["data"]["shape"])


def load_run(source: str | Path, device: torch.device | str = "cpu") -> LoadedRun:
    """Rebuild model and path from a run directory, its ema.safetensors or a checkpoint.pt."""
    weights, meta = load_inference(source)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: model metadata must be a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("model", "path", "source", "target", "data") if k not in meta]
    if missing:
        raise CheckpointError(f"{source}: model metadata lacks {missing}")
    model = build_model(meta["model"])
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: weights do not match the model config: {e}") from None
    return LoadedRun(model.to(device).eval().requires_grad_(False), path_from_meta(meta), meta)
