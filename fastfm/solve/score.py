"""The score of the marginal p_t from a trained model, for affine paths with a Gaussian base.

With x_t = sigma_t x0 + alpha_t x1 and x0 ~ N(0, s^2 I), p(x_t | x1) = N(alpha_t x1, sigma_t^2 s^2 I), so

    grad log p_t(x) = -E[x0 | x_t = x] / (sigma_t s^2).

The model gives E[x0 | x_t] in closed form from its prediction (Albergo & Vanden-Eijnden, 2022):

    velocity v = sigma' x0_hat + alpha' x1_hat, with x = sigma x0_hat + alpha x1_hat:
        x0_hat = (alpha v - alpha' x) / (alpha sigma' - alpha' sigma)
    x1 prediction:  x0_hat = (x - alpha x1_hat) / sigma
    x0 prediction:  x0_hat itself

The score is singular where sigma_t = 0 (t = 1 on CondOT with sigma_min = 0, linear, trig, VP):
:func:`score_interval` moves that end in by T_EPS, as ``AffinePath.time_interval`` does for sampling.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from fastfm.path.densities import Gaussian
from fastfm.solve.guidance import guided_model
from fastfm.path.affine import T_EPS, TARGETS, AffinePath, expand_like

ScoreField = Callable[[Tensor, Tensor], Tensor]


def _base_std(path: AffinePath) -> float:
    if not isinstance(path.source, Gaussian):
        raise ValueError(f"the score from a model needs a Gaussian base; this path's source is {path.source!r}")
    return path.source.std


def posterior_x0(path: AffinePath, pred: Tensor, x: Tensor, t: Tensor, target: str = "velocity") -> Tensor:
    """E[x0 | x_t = x] from the model's prediction ``pred`` of ``target`` at times t (B,)."""
    if target not in TARGETS:
        raise ValueError(f"unknown prediction target {target!r}; choose one of {TARGETS}")
    if target == "x0":
        return pred
    s = path.scheduler(t.to(x.dtype))
    a, sg = expand_like(s.alpha_t, x), expand_like(s.sigma_t, x)
    if target == "x1":
        return (x - a * pred) / sg
    da, ds = expand_like(s.d_alpha_t, x), expand_like(s.d_sigma_t, x)
    return (a * pred - da * x) / (a * ds - da * sg)


def score_from_prediction(path: AffinePath, pred: Tensor, x: Tensor, t: Tensor, target: str = "velocity") -> Tensor:
    """grad log p_t(x) = -E[x0 | x_t = x] / (sigma_t s^2) from a prediction of ``target`` (see the module doc)."""
    std = _base_std(path)
    sg = expand_like(path.scheduler(t.to(x.dtype)).sigma_t, x)
    return -posterior_x0(path, pred, x, t, target) / (sg * std * std)


def score_field(model: nn.Module, path: AffinePath, target: str = "velocity", y: Tensor | None = None,
                guidance: float = 1.0, **conditioning: Tensor) -> ScoreField:
    """score(x, t) of the model's marginal, t a scalar or (B,) tensor (guidance applied to the prediction)."""
    _base_std(path)
    g = guided_model(model, y, guidance, **conditioning)

    def score(x: Tensor, t: Tensor) -> Tensor:
        tb = t.float().expand(x.shape[0])
        return score_from_prediction(path, g(x, tb), x, tb, target)

    return score


def score_interval(path: AffinePath, target: str = "velocity") -> tuple[float, float]:
    """The sampling interval ``path.time_interval(target)``, with t = 1 moved in by T_EPS where sigma_1 = 0
    (the score diverges there)."""
    lo, hi = path.time_interval(target)
    return lo, min(hi, 1.0 - T_EPS) if path.ends.sigma_1 == 0.0 else hi
