"""SDE sampling: same marginals as the ODE for any diffusion eps(t), checked in law on a Gaussian mixture.

The model is the mixture path's exact velocity (tests/test_score.py), so any discrepancy in law is the
sampler's. Two permutation tests, fixed seeds:
- energy distance (800 + 800 points) must accept the SDE's samples for several paths and eps;
- the spread about the mixture's means (mean squared distance to the nearest mean, 4000 + 4000 points),
  a statistic aimed at what a wrong score changes, must accept them and reject a score planted 10% too
  large: with eps = 5 that narrows the clusters by ~9% in mean squared distance, about 4 standard
  errors at this size (energy distance does not see it at 1500-2000 points: measured p = 0.29-0.51).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import call, cli_error, last_json
from test_score import MU, SK, W, MixturePredictor

from fastfm import sample as sample_cli
from fastfm.solve import sde
from fastfm.evaluation.metrics import energy_distance
from fastfm.path.affine import get_path
from fastfm.solve.ode import draw_prior, ode_sample
from fastfm.solve.score import score_interval
from fastfm.solve.solvers import time_grid

F64 = torch.float64


def mixture(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(W, n, replacement=True, generator=g)
    return MU[k] + SK[k, None] * torch.randn(n, 2, generator=g, dtype=F64)


def permutation_pvalue(x: torch.Tensor, y: torch.Tensor, stat=energy_distance, rounds: int = 100,
                       seed: int = 0) -> float:
    """P(stat of a random split of the pooled samples >= the observed stat(x, y))."""
    g = torch.Generator().manual_seed(seed)
    observed = float(stat(x, y))
    pooled, n = torch.cat([x, y]), len(x)
    hits = 0
    for _ in range(rounds):
        p = pooled[torch.randperm(len(pooled), generator=g)]
        hits += float(stat(p[:n], p[n:])) >= observed
    return (hits + 1) / (rounds + 1)


def spread_gap(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|difference of the mean squared distance to the nearest mixture mean| of two samples."""
    def spread(z: torch.Tensor) -> torch.Tensor:
        return torch.cdist(z, MU).min(1).values.pow(2).mean()
    return (spread(x) - spread(y)).abs()


def sde_samples(name: str, diffusion: str, n: int = 800, steps: int = 200, seed: int = 1) -> torch.Tensor:
    path = get_path(name)
    g = torch.Generator().manual_seed(seed)
    x0 = draw_prior(path, n, (2,), g).to(F64)
    return sde.sde_sample(MixturePredictor(path, "velocity"), path, x0, diffusion=sde.parse_diffusion(diffusion),
                          steps=steps, generator=g).x


@pytest.mark.parametrize("diffusion", ["0.5", "2", "sin2:3"])
@pytest.mark.parametrize("name", ["condot", "trig", "vp"])
def test_sde_samples_the_mixture(name, diffusion):
    assert permutation_pvalue(sde_samples(name, diffusion), mixture(800, 2)) > 0.01


def test_spread_matches_and_a_planted_score_error_is_rejected(monkeypatch):
    """The spread test accepts the SDE's samples and rejects a score 10% too large (samples pulled too
    hard toward the modes): the tests of this file can fail."""
    truth = mixture(4000, 2)
    assert permutation_pvalue(sde_samples("condot", "5", n=4000, steps=1500), truth, spread_gap, 1000) > 0.01
    real = sde.score_from_prediction
    monkeypatch.setattr(sde, "score_from_prediction", lambda *a, **k: 1.1 * real(*a, **k))
    assert permutation_pvalue(sde_samples("condot", "5", n=4000, steps=1500), truth, spread_gap, 1000) < 0.01


@pytest.mark.parametrize("name,target", [("trig", "x1"), ("vp", "velocity")])
def test_zero_diffusion_is_the_euler_ode(name, target):
    """eps = 0 is the ODE by Euler, final jump to E[x1 | x_t] included (one jump, shared): same samples, same NFE."""
    path = get_path(name)
    x0 = draw_prior(path, 64, (2,), torch.Generator().manual_seed(3)).to(F64)
    model = MixturePredictor(path, target)
    got = sde.sde_sample(model, path, x0, diffusion=sde.parse_diffusion("0"), steps=20, target=target)
    ode = ode_sample(model, path, x0, solver="euler", grid=time_grid(20, *score_interval(path, target)), target=target)
    torch.testing.assert_close(got.x, ode.x, rtol=1e-12, atol=1e-12)
    assert got.nfe == ode.nfe == 21


def test_given_noise_is_used_and_checked():
    path = get_path("condot")
    x0 = torch.randn(4, 2, dtype=F64)
    model = MixturePredictor(path, "velocity")
    noise = torch.randn(5, 4, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    a = sde.sde_sample(model, path, x0, diffusion=sde.parse_diffusion("1"), steps=5, noise=noise).x
    b = sde.sde_sample(model, path, x0, diffusion=sde.parse_diffusion("1"), steps=5, noise=noise).x
    c = sde.sde_sample(model, path, x0, diffusion=sde.parse_diffusion("1"), steps=5, noise=-noise).x
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="noise must have shape"):
        sde.sde_sample(model, path, x0, diffusion=sde.parse_diffusion("1"), steps=4, noise=noise)


@pytest.mark.parametrize("text,ok", [("0.5", True), ("sin2:2", True), ("0", True), ("-1", False),
                                     ("cos:1", False), ("nan", False), ("abc", False)])
def test_parse_diffusion(text, ok):
    if ok:
        eps = sde.parse_diffusion(text)
        t = torch.tensor([0.0, 0.5, 1.0])
        assert torch.all(eps(t) >= 0) and str(eps) in (text, f"sin2:{float(text.split(':')[-1]):g}")
    else:
        with pytest.raises(ValueError, match="diffusion"):
            sde.parse_diffusion(text)


def test_sample_cli_sde(toy_run, tmp_path):
    """python -m fastfm.sample --sde --diffusion: writes samples, reports the sampler; bad requests are errors."""
    base = ["--checkpoint", str(toy_run.dir), "--n", "64", "--steps", "8"]
    out = last_json(call(sample_cli.main, [*base, "--sde", "--diffusion", "sin2:2", "--out", str(tmp_path)]))
    assert out["solver"] == "euler-maruyama" and out["diffusion"] == "sin2:2" and out["steps"] == 8
    assert out["nfe"] == 9 and np.isfinite(np.load(tmp_path / "samples.npy")).all()  # 8 steps + the denoising jump
    assert "diffusion" in cli_error(sample_cli.main, [*base, "--sde", "--diffusion", "-1"])
    assert "no --grid" in cli_error(sample_cli.main, [*base, "--sde", "--grid", "0,0.5,1"])
    assert "no --log-likelihood" in cli_error(sample_cli.main, [*base, "--sde", "--log-likelihood"])
