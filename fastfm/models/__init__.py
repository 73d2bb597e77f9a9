"""Velocity models ``model(x, t, **conditioning)`` and their config registry."""

from fastfm.models.embeddings import ConditionEmbedding, SinusoidalEmbedding
from fastfm.models.mlp import MLP
from fastfm.models.registry import MODELS, build_model, config_for_data
from fastfm.models.unet import UNet

__all__ = ["MLP", "MODELS", "ConditionEmbedding", "SinusoidalEmbedding", "UNet", "build_model", "config_for_data"]
