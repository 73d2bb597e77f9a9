"""Transport diagnostics against closed forms, for N(0, I) -> N(m, s^2 I) in 2D (m, s of test_endpoints).

* OT map x1 = m + s x0: the straight field v(x, t) = m + (s - 1)(x - t m) / (1 + (s - 1) t) moves every point at
  the constant velocity m + (s - 1) x0: per-sample K_i = |m + (s - 1) x0_i|^2, S_i = 0, E K = W2^2 = |m|^2 + d(1 - s)^2.
* Linear interpolant, independent coupling: the exact marginal flow (test_endpoints.Imperfect with no error) is
  x_t = t m + sigma_t z, sigma_t = sqrt((1 - t)^2 + t^2 s^2), z = x0, so v = m + sigma'_t z and per sample
  K_i = |m|^2 + 2 (s - 1) m.z_i + J |z_i|^2,  S_i = (J - (s - 1)^2) |z_i|^2,  J = int_0^1 sigma'_t^2 dt > (s - 1)^2.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import call
from scipy.integrate import quad
from test_endpoints import MU, S, Imperfect
from torch import nn

from fastfm import evaluate
from fastfm.run.meta import RunMeta
from fastfm.solve import EagerSampler, InferenceSettings
from fastfm.path.affine import get_path
from fastfm.solve.ode import ode_sample
from fastfm.solve.solvers import FIXED_SOLVERS
from fastfm.solve.transport import transport_report, straightness, transport_summary, w2_squared

F64 = torch.float64
D = 2
W2_GAUSS = float(MU.pow(2).sum()) + D * (1 - S) ** 2


def _dsigma(t: float) -> float:
    return (t * S ** 2 - (1 - t)) / math.sqrt((1 - t) ** 2 + t ** 2 * S ** 2)


J = quad(lambda t: _dsigma(t) ** 2, 0.0, 1.0, epsabs=1e-13, epsrel=1e-13)[0]


class StraightMap(nn.Module):
    """Velocity of the OT map x1 = m + s x0 (straight lines at constant speed)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.double()[:, None]
        return MU + (S - 1) * (x - t * MU) / (1 + (S - 1) * t)


def x0s(n: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


def marginal_exact(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sq = z.pow(2).sum(1)
    k = float(MU.pow(2).sum()) + 2 * (S - 1) * (z @ MU) + J * sq
    return k, (J - (S - 1) ** 2) * sq


@pytest.mark.parametrize("solver", list(FIXED_SOLVERS))
def test_straight_ot_map_has_kinetic_energy_w2(solver):
    x0 = x0s()
    res = ode_sample(StraightMap(), get_path("linear"), x0, solver=solver, steps=4, transport=True)
    assert torch.allclose(res.x, MU + S * x0, atol=1e-12)
    assert torch.allclose(res.kinetic, (MU + (S - 1) * x0).pow(2).sum(1), atol=1e-10)
    assert float(res.straightness.abs().max()) < 1e-10
    # E K_i = W2^2 of the two Gaussians: the sample mean within 4 standard errors
    summary = transport_summary(res.kinetic, res.straightness)
    assert abs(summary["kinetic_energy"] - W2_GAUSS) < 4 * summary["kinetic_energy_stderr"]


def test_marginal_flow_kinetic_energy_and_straightness_closed_form():
    """rk4 with 64 steps reproduces the per-sample closed forms; the flow is curved (S > 0) and costs more than W2^2."""
    path, x0 = get_path("linear"), x0s()
    res = ode_sample(Imperfect(path, "velocity", 0.0), path, x0, solver="rk4", steps=64, transport=True)
    k, s = marginal_exact(x0)
    assert torch.allclose(res.kinetic, k, rtol=1e-7, atol=1e-7)
    assert torch.allclose(res.straightness, s, rtol=1e-6, atol=1e-7)
    assert J > (S - 1) ** 2 + 0.05 and float(res.straightness.mean()) > 0.05
    expected = float(MU.pow(2).sum()) + D * J  # E K over z ~ N(0, I)
    assert expected > W2_GAUSS + 0.1


@pytest.mark.parametrize("solver,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_kinetic_quadrature_converges_at_the_solver_order(solver, order):
    """The stage quadrature's error falls like h^order as the steps double (it converges to the exact value)."""
    path, x0 = get_path("linear"), x0s(64)
    k, _ = marginal_exact(x0)
    errs = []
    for steps in (16, 32, 64):
        res = ode_sample(Imperfect(path, "velocity", 0.0), path, x0, solver=solver, steps=steps, transport=True)
        errs.append(float(((res.kinetic - k) / k).abs().max()))  # relative, worst trajectory
    assert errs[-1] < 0.03 / 16 ** (order - 1)
    for coarse, fine in zip(errs, errs[1:]):
        assert coarse * 2 ** (-order) * 0.8 < fine < coarse * 2 ** (-order) * 1.25


def test_transport_rides_along_with_the_likelihood_solve():
    """Same samples and log-likelihoods with and without the kinetic integrand in the state."""
    path, x0 = get_path("linear"), x0s(64)
    model = Imperfect(path, "velocity", 0.01)
    a = ode_sample(model, path, x0, steps=8, log_likelihood=True)
    b = ode_sample(model, path, x0, steps=8, log_likelihood=True, transport=True)
    assert torch.equal(a.x, b.x) and torch.equal(a.log_prob, b.log_prob)
    assert b.kinetic.shape == (64,) and a.kinetic is None
    inter = ode_sample(model, path, x0, steps=8, transport=True, return_intermediates=True).intermediates
    assert inter.shape == (9, 64, 2)


def test_straightness_is_the_deviation_from_the_chord():
    x0, x1 = torch.zeros(3, 2), torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    kinetic = torch.tensor([1.0, 5.0, 25.0])
    assert torch.allclose(straightness(kinetic, x0, x1), torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(straightness(kinetic, x0, x1, duration=0.5), torch.zeros(3))  # clipped below 0
    with pytest.raises(ValueError, match="positive length"):
        straightness(kinetic, x0, x1, duration=0.0)
    with pytest.raises(ValueError, match="one shape"):
        transport_summary(kinetic, kinetic[:2])


def test_pot_w2_matches_the_gaussian_closed_form():
    """W2^2 of 2000 + 2000 samples of N(0, I) and N(m, s^2 I) within a statistical tolerance of |m|^2 + d (1 - s)^2
    (the empirical plan's bias in 2D is O(log n / n) and the cross term's sd ~ 0.1 here)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2000, D, generator=g, dtype=F64)
    y = MU + S * torch.randn(2000, D, generator=g, dtype=F64)
    assert w2_squared(x, y) == pytest.approx(W2_GAUSS, abs=0.25)
    assert w2_squared(x[:50], x[:50]) == pytest.approx(0.0, abs=1e-12)
    assert w2_squared(torch.zeros(1, 3), torch.ones(4, 3)) == pytest.approx(3.0)


def test_w2_refuses_bad_input():
    x = torch.zeros(20, 2)
    with pytest.raises(ValueError, match="too slow above 10"):
        w2_squared(x, x, max_points=10)
    with pytest.raises(ValueError, match="dimensions differ"):
        w2_squared(x, torch.zeros(20, 3))
    with pytest.raises(ValueError, match="non-finite"):
        w2_squared(x, torch.full((5, 2), float("nan")))
    with pytest.raises(ValueError, match="batch of samples"):
        w2_squared(torch.zeros(5), x)
    assert w2_squared(x, x, max_points=None) == 0.0


def test_generate_batches_and_the_report():
    path = get_path("linear")
    model = Imperfect(path, "velocity", 0.0).double()
    model.register_parameter("anchor", nn.Parameter(torch.zeros((), dtype=F64)))  # generate reads the device
    sampler = EagerSampler(model, path, RunMeta.bare((D,)), settings=InferenceSettings(solver="rk4", steps=16, batch_size=128))
    res = sampler.sample(300, transport=True, progress=False)
    assert res.kinetic.shape == res.straightness.shape == (300,)
    ref = MU + S * torch.randn(2500, D, generator=torch.Generator().manual_seed(1))
    rep = transport_report(res, path, ref, w2_points=2000)  # the empirical W2^2 is biased up, ~1/sqrt(n) in 2D
    assert rep["n"] == 300 and rep["w2_n"] == 2000
    assert rep["kinetic_energy"] == pytest.approx(float(MU.pow(2).sum()) + D * J, rel=0.15)
    assert rep["w2_sq_pot"] == pytest.approx(W2_GAUSS, rel=0.05)
    assert rep["w2_sq_pot"] < rep["kinetic_energy"]
    with pytest.raises(ValueError, match="transport=True"):
        transport_report(sampler.sample(8, progress=False), path, ref, w2_points=8)


def test_train_and_evaluate_report_transport(toy_run, tmp_path):
    block = toy_run.summary["transport"]
    assert block["n"] == 50 and block["w2_n"] == 50 and block["straightness"] >= 0
    assert block["kinetic_energy"] > 0 and block["w2_sq_pot"] > 0
    out = evaluate.main
    result = __import__("json").loads(call(out, ["--checkpoint", str(toy_run.dir), "--n", "20", "--n-samples", "40",
                                                 "--steps", "4", "--device", "cpu"]))
    tr = result["transport"]
    assert tr["n"] == 40 and tr["w2_n"] == 40 and tr["solver"] == "midpoint" and tr["steps"] == 4
    assert set(tr) >= {"kinetic_energy", "kinetic_energy_stderr", "straightness", "w2_sq_pot"}
