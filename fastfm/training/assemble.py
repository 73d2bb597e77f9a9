"""A training config assembled into what the run holds: its model for the data and its ``RunMeta``."""

from __future__ import annotations

from torch import nn

import fastfm
from fastfm.training.config import TrainConfig
from fastfm.data import Dataset
from fastfm.models import build_model, config_for_data
from fastfm.run.meta import DataMeta, RunMeta


def model_for(cfg: TrainConfig, data: Dataset) -> nn.Module:
    """The model of a training config for its data set: the model's own defaults for that data
    (``fastfm.models.config_for_data``), then ``cfg.model_args``."""
    return build_model(config_for_data(cfg.model, data=data.name, kind=data.kind, shape=data.shape,
                                       num_classes=data.num_classes, class_cond=cfg.class_cond, superres=cfg.superres,
                                       overrides=cfg.model_args))


def run_meta(cfg: TrainConfig, data: Dataset, model: nn.Module) -> RunMeta:
    """What sampling, evaluation and export need to rebuild the run (written as model.json)."""
    return RunMeta(model=model.config, path=cfg.path, path_args=dict(cfg.path_args), source=cfg.source, seed=cfg.seed,
                   target=cfg.target, superres=cfg.superres, fastfm_version=fastfm.__version__,
                   data=DataMeta(name=cfg.data, args=dict(cfg.data_args), shape=tuple(data.shape), kind=data.kind,
                                 levels=data.levels, num_classes=data.num_classes))
