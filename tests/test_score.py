"""Score from velocity (and x1/x0 predictions) against the exact score of a Gaussian mixture's marginal.

Data x1 ~ sum_k w_k N(mu_k, s_k^2 I), base x0 ~ N(0, s^2 I): under x_t = sigma_t x0 + alpha_t x1 the marginal
is the mixture sum_k w_k N(alpha_t mu_k, (sigma_t^2 s^2 + alpha_t^2 s_k^2) I), whose score autograd gives.
The model is the exact conditional expectation of its target under that mixture.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastfm.path.densities import Gaussian
from fastfm.path.affine import PATHS, T_EPS, AffinePath, AffineScheduler, get_path
from fastfm.solve.score import score_field, score_from_prediction, score_interval

F64 = torch.float64
MU = torch.tensor([[2.0, 0.0], [-1.0, 1.5], [0.5, -2.0]], dtype=F64)
SK = torch.tensor([0.3, 0.6, 0.45], dtype=F64)
W = torch.tensor([0.5, 0.3, 0.2], dtype=F64)


def _terms(path: AffinePath, x: torch.Tensor, t: torch.Tensor):
    """Per-component log densities of the marginal (B, K) and the schedule at t, in float64."""
    s = path.scheduler(t.to(F64))
    a, sg = s.alpha_t[:, None], s.sigma_t[:, None]
    var = sg ** 2 * path.source.std ** 2 + a ** 2 * SK[None] ** 2  # (B, K)
    diff = x[:, None, :] - a[..., None] * MU[None]  # (B, K, D)
    logp = W.log() - 0.5 * (diff ** 2).sum(-1) / var - 0.5 * x.shape[1] * torch.log(2 * math.pi * var)
    return logp, s, var, diff


def exact_score(path: AffinePath, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    logp, *_ = _terms(path, x, t)
    (g,) = torch.autograd.grad(torch.logsumexp(logp, 1).sum(), x)
    return g


class MixturePredictor(nn.Module):
    """E[target | x_t] of the mixture path: E[x1 | x_t] componentwise, E[x0 | x_t] from x_t = sigma x0 + alpha x1."""

    def __init__(self, path: AffinePath, target: str) -> None:
        super().__init__()
        self.path, self.target = path, target

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logp, s, var, diff = _terms(self.path, x, t)
        r = torch.softmax(logp, 1)[..., None]  # (B, K, 1)
        a = s.alpha_t[:, None, None]
        x1_k = MU[None] + a * SK[None, :, None] ** 2 / var[..., None] * diff
        x1 = (r * x1_k).sum(1)
        sg = s.sigma_t[:, None]
        x0 = (x - s.alpha_t[:, None] * x1) / sg
        if self.target == "x1":
            return x1
        if self.target == "x0":
            return x0
        return s.d_sigma_t[:, None] * x0 + s.d_alpha_t[:, None] * x1


def _points(path: AffinePath, n: int = 64):
    g = torch.Generator().manual_seed(0)
    lo, hi = score_interval(path)
    t = lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)
    t = t.clamp(max(lo, 0.02), min(hi, 0.98))  # x0/x1 recovery divides by alpha, sigma: off the very ends
    x = 3 * torch.randn(n, 2, generator=g, dtype=F64)
    return x, t


@pytest.mark.parametrize("target", ["velocity", "x1", "x0"])
@pytest.mark.parametrize("name", PATHS)
def test_score_from_prediction_is_the_exact_mixture_score(name, target):
    path = get_path(name)
    x, t = _points(path)
    pred = MixturePredictor(path, target)(x, t)
    torch.testing.assert_close(score_from_prediction(path, pred, x, t, target), exact_score(path, x, t),
                               rtol=1e-5, atol=1e-5)


def test_score_with_a_wider_base_and_a_custom_schedule():
    """A base N(0, 2^2 I) and a schedule given only as code (derivatives by forward AD)."""
    path = AffinePath(AffineScheduler(lambda t: t ** 2, lambda t: 1 - t), Gaussian(2.0))
    x, t = _points(path)
    field = score_field(MixturePredictor(path, "velocity"), path)
    torch.testing.assert_close(field(x, t), exact_score(path, x, t), rtol=1e-5, atol=1e-5)


def test_score_at_t0_is_the_base_score():
    """At t = 0 (alpha = 0) the velocity formula still holds: the score of N(0, sigma_0^2 s^2 I)."""
    path = get_path("condot")
    x = torch.randn(8, 2, dtype=F64)
    t = torch.zeros(8, dtype=F64)
    got = score_from_prediction(path, MixturePredictor(path, "velocity")(x, t), x, t)
    torch.testing.assert_close(got, -x, rtol=1e-10, atol=1e-10)


def test_planted_error_is_seen():
    """A velocity 10% off changes the score beyond the tolerance (the test above can fail)."""
    path = get_path("trig")
    x, t = _points(path)
    pred = 1.1 * MixturePredictor(path, "velocity")(x, t)
    assert not torch.allclose(score_from_prediction(path, pred, x, t), exact_score(path, x, t), rtol=1e-3, atol=1e-3)


def test_singular_end_and_bad_requests():
    assert score_interval(get_path("condot")) == (0.0, 1.0 - T_EPS)  # sigma_1 = 0
    assert score_interval(get_path("condot", sigma_min=0.01)) == (0.0, 1.0)
    assert score_interval(get_path("ve")) == (0.0, 1.0)
    data_source = AffinePath(get_path("linear").scheduler, source=type("S", (), {"sample": None})())
    with pytest.raises(ValueError, match="Gaussian base"):
        score_field(nn.Identity(), data_source)
    with pytest.raises(ValueError, match="unknown prediction target"):
        score_from_prediction(get_path("condot"), torch.zeros(2, 2), torch.zeros(2, 2), torch.full((2,), 0.5),
                              "eps")
