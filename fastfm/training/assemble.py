"""A training config assembled into what the run holds: its model for the data and its ``RunMeta``."""

from __future__ import annotations

import torch
from torch import nn

import fastfm
from fastfm.training.config import TrainConfig
from fastfm.training.objectives import OBJECTIVES
from fastfm.data import Dataset
from fastfm.models import build_model, config_for_data
from fastfm.run.checkpoint import CheckpointError, load_inference
from fastfm.run.meta import DataMeta, RunMeta

FRESH_IN_FLOW_MAP = "cond.step."
"""The parameters a flow map adds to a model of one time (its step embedding): fresh when initialised from one."""


def model_for(cfg: TrainConfig, data: Dataset) -> nn.Module:
    """The model of a training config for its data set: the model's own defaults for that data
    (``fastfm.models.config_for_data``), two times for a flow-map objective, then ``cfg.model_args``."""
    two_times = {"flow_map": True} if OBJECTIVES.entry(cfg.objective).factory.flow_map else {}
    return build_model(config_for_data(cfg.model, data=data.name, kind=data.kind, shape=data.shape,
                                       num_classes=data.num_classes, class_cond=cfg.class_cond, superres=cfg.superres,
                                       overrides={**two_times, **cfg.model_args}))


def init_from(model: nn.Module, run: str) -> None:
    """Copy the EMA weights of the run in ``run`` (a run directory, ema.safetensors or checkpoint.pt) into
    ``model``: every tensor of the model must come from it, but a flow map's step embedding where the run's model
    has one time (distilling a velocity model into a flow map). CheckpointError naming what does not fit."""
    weights, _ = load_inference(run)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in weights and not k.startswith(FRESH_IN_FLOW_MAP))
    unexpected = sorted(k for k in weights if k not in own)
    shapes = sorted(k for k in own if k in weights and weights[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(f"--init {run}: its weights do not fit this model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, other shapes {shapes[:3]}): give the teacher's "
                              "--model and --model-args")
    with torch.no_grad():
        for k, w in weights.items():
            own[k].copy_(w)


def run_meta(cfg: TrainConfig, data: Dataset, model: nn.Module) -> RunMeta:
    """What sampling, evaluation and export need to rebuild the run (written as model.json)."""
    return RunMeta(model=model.config, path=cfg.path, path_args=dict(cfg.path_args), source=cfg.source, seed=cfg.seed,
                   target=cfg.target, superres=cfg.superres, fastfm_version=fastfm.__version__,
                   data=DataMeta(name=cfg.data, args=dict(cfg.data_args), shape=tuple(data.shape), kind=data.kind,
                                 levels=data.levels, num_classes=data.num_classes))
