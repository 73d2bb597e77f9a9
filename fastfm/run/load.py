"""A run rebuilt from its files: model (EMA weights), source density and path, from its model.json, so sample,
evaluate and export agree with the trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastfm import seeding
from fastfm.run.checkpoint import CheckpointError, load_inference
from fastfm.data import Dataset, get_dataset
from fastfm.path.densities import Density, SampleDensity
from fastfm.models import build_model
from fastfm.path.affine import AffinePath, get_path

from .meta import MetaError, RunMeta


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


def path_of(meta: RunMeta) -> AffinePath:
    """The run's path with its source density."""
    return get_path(meta.path, build_source(meta.source, meta.seed, meta.shape), **meta.path_args)


def dataset_of(meta: RunMeta) -> Dataset:
    """The data set a run was trained on (same seed, so the same test split)."""
    return get_dataset(meta.data.name, seed=meta.seed, **meta.data.args)


@dataclass
class LoadedRun:
    """A trained model (EMA weights, eval mode) with the path and metadata it was trained with."""

    model: nn.Module
    path: AffinePath
    meta: RunMeta

    @property
    def shape(self) -> tuple[int, ...]:
        return self.meta.shape


def load_run(source: str | Path, device: torch.device | str = "cpu") -> LoadedRun:
    """Rebuild model and path from a run directory, its ema.safetensors or a checkpoint.pt."""
    weights, obj = load_inference(source)
    try:
        meta = RunMeta.from_json(obj, str(source))
    except MetaError as e:
        raise CheckpointError(str(e)) from None
    model = build_model(meta.model)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: weights do not match the model config: {e}") from None
    return LoadedRun(model.to(device).eval().requires_grad_(False), path_of(meta), meta)
