"""The checkerboard's exact field (fastfm.experiments.exact): its E[x1 | x_t] against a Monte Carlo posterior mean
over data draws, and its velocity against the path's identity v = alpha' E[x1 | x_t] + sigma' E[x0 | x_t]."""

from __future__ import annotations

import pytest
import torch

from fastfm.data.toys import checkerboard
from fastfm.experiments.exact import CheckerboardVelocity, posterior_x1
from fastfm.path.affine import get_path

F64 = torch.float64


@pytest.mark.parametrize("t", [0.0, 0.3, 0.7, 0.95, 0.999])
def test_posterior_mean_matches_monte_carlo(t):
    """E[x1 | t x1 + (1 - t) x0 = x] against the self-normalised average of 200,000 checkerboard draws
    weighted by N(x; t x1, (1 - t)^2 I), at points of the path's own marginal."""
    g = torch.Generator().manual_seed(0)
    data = checkerboard(200_000, g)[0].double()
    a, s = torch.tensor(t, dtype=F64), torch.tensor(1 - t, dtype=F64)
    x = a * checkerboard(32, g)[0].double() + s * torch.randn(32, 2, generator=g, dtype=F64)
    model = CheckerboardVelocity(get_path("linear"))
    exact = posterior_x1(x, a.expand(32)[:, None], s.expand(32)[:, None], model.corners)
    weights = torch.softmax(-((x[:, None] - a * data[None]) ** 2).sum(-1) / (2 * s * s), dim=1)
    mc = (weights[..., None] * data[None]).sum(1)
    assert float((exact - mc).abs().max()) < 0.03


def test_velocity_is_the_affine_identity():
    """For the trig path too: v = alpha' x1_hat + sigma' (x - alpha x1_hat) / sigma; at t = 0 the posterior is the
    prior, whose mean is 0 (the checkerboard is symmetric), so v(x, 0) = sigma'_0 x."""
    path = get_path("trig")
    model = CheckerboardVelocity(path)
    x, t = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(1)), torch.full((16,), 0.4, dtype=F64)
    s = path.scheduler(t)
    x1 = posterior_x1(x, s.alpha_t[:, None], s.sigma_t[:, None], model.corners)
    v = s.d_alpha_t[:, None] * x1 + s.d_sigma_t[:, None] * (x - s.alpha_t[:, None] * x1) / s.sigma_t[:, None]
    torch.testing.assert_close(model(x, t), v)
    torch.testing.assert_close(model(x, torch.zeros(16, dtype=F64)), path.scheduler(torch.zeros(1)).d_sigma_t * x,
                               atol=1e-3, rtol=0)
