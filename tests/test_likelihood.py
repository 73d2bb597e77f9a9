"""Log-likelihoods by the instantaneous change of variables, divergences, and bits per dimension.

Exact references: a linear flow v = A x (or (A + t B) x) pushes N(0, I) to N(0, Phi Phi^T) with
log det Phi = int_0^1 tr(A + t B) dt (Liouville); and for Gaussian data N(mu, s^2 I) the Theorem 2
marginal velocity of an affine path pushes the prior exactly onto the data density.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.stats import multivariate_normal
from torch import nn

from fastfm.solve.divergence import divergence_exact, divergence_hutchinson, make_probes
from fastfm.solve.likelihood import bits_per_dim, ode_likelihood
from fastfm.path.affine import T_EPS, get_path
from fastfm.solve.ode import draw_prior, ode_sample
from fastfm.solve.solvers import time_grid

F64 = torch.float64


def _rand(seed, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


class LinearFlow(nn.Module):
    """v(x, t) = (A + t B) x."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
        super().__init__()
        self.a, self.b = a, (torch.zeros_like(a) if b is None else b)

    def forward(self, x, t):
        return x @ self.a.T + t.to(x.dtype)[:, None] * (x @ self.b.T)


class TanhMLP(nn.Module):
    """A small nonlinear, time-dependent field v(x, t) = W2 tanh(W1 x + t c + b1) + b2."""

    def __init__(self, d: int = 4, hidden: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(hidden, d, generator=g, dtype=F64) / math.sqrt(d)
        self.c = torch.randn(hidden, generator=g, dtype=F64)
        self.b1 = 0.3 * torch.randn(hidden, generator=g, dtype=F64)
        self.w2 = torch.randn(d, hidden, generator=g, dtype=F64) / math.sqrt(hidden)
        self.b2 = 0.3 * torch.randn(d, generator=g, dtype=F64)

    def forward(self, x, t):
        h = torch.tanh(x @ self.w1.T + t.to(x.dtype)[:, None] * self.c + self.b1)
        return h @ self.w2.T + self.b2


def _jacobian_trace(model, x, t):
    tb = torch.full((1,), float(t), dtype=torch.float32)
    return torch.stack([torch.trace(torch.autograd.functional.jacobian(lambda z: model(z[None], tb)[0], xi))
                        for xi in x])


A3 = torch.tensor([[-0.4, 1.2, 0.1], [-0.9, 0.2, 0.3], [0.2, -0.5, -0.3]], dtype=F64)
B3 = torch.tensor([[0.3, -0.2, 0.0], [0.1, -0.6, 0.4], [-0.3, 0.2, 0.5]], dtype=F64)


def _flow_map(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Phi(1) for dPhi/dt = (A + t B) Phi, Phi(0) = I, by a tight adaptive solve."""
    a_, b_ = a.numpy(), b.numpy()
    d = a_.shape[0]
    sol = solve_ivp(lambda t, p: ((a_ + t * b_) @ p.reshape(d, d)).ravel(), (0.0, 1.0), np.eye(d).ravel(),
                    method="DOP853", rtol=1e-12, atol=1e-12)
    return sol.y[:, -1].reshape(d, d)


# ---------------------------------------------------------------- exact log-densities of linear flows

@pytest.mark.parametrize("time_dependent", [False, True])
def test_log_likelihood_of_linear_flow_is_exact(time_dependent):
    b = B3 if time_dependent else torch.zeros_like(A3)
    phi = _flow_map(A3, b)
    if not time_dependent:
        np.testing.assert_allclose(phi, torch.linalg.matrix_exp(A3).numpy(), rtol=1e-9, atol=1e-9)
    x0 = _rand(1, 5, 3)
    x1 = x0 @ torch.from_numpy(phi).T
    exact = multivariate_normal(mean=np.zeros(3), cov=phi @ phi.T).logpdf(x1.numpy())
    # Liouville: log p1(x1) = log N(x0) - int tr(A + t B) dt
    liouville = multivariate_normal(mean=np.zeros(3)).logpdf(x0.numpy()) - float(torch.trace(A3) + torch.trace(b) / 2)
    np.testing.assert_allclose(exact, liouville, rtol=1e-9, atol=1e-9)

    res = ode_likelihood(LinearFlow(A3, b), get_path("condot"), x1, solver="rk4", steps=16)
    assert res.log_prob.shape == (5,)
    assert res.nfe == 16 * 4
    np.testing.assert_allclose(res.log_prob.double().numpy(), exact, rtol=0, atol=1e-4)
    torch.testing.assert_close(res.x0, x0, rtol=1e-6, atol=1e-6)  # the latent is recovered


def test_log_likelihood_float32():
    model = LinearFlow(A3.float(), B3.float())
    phi = _flow_map(A3, B3)
    x0 = _rand(2, 7, 3)
    x1 = (x0 @ torch.from_numpy(phi).T).float()
    exact = multivariate_normal(mean=np.zeros(3), cov=phi @ phi.T).logpdf(x1.double().numpy())
    res = ode_likelihood(model, get_path("linear"), x1, solver="rk4", steps=16)
    assert res.log_prob.dtype == torch.float32
    np.testing.assert_allclose(res.log_prob.double().numpy(), exact, rtol=0, atol=1e-3)


def test_ve_prior_in_log_likelihood():
    """Under a VE path the prior is N(0, sigma_max^2 I)."""
    path = get_path("ve", sigma_min=0.01, sigma_max=5.0)
    m = torch.linalg.matrix_exp(A3)
    x1 = (5.0 * _rand(3, 5, 3)) @ m.T
    exact = multivariate_normal(mean=np.zeros(3), cov=25.0 * (m @ m.T).numpy()).logpdf(x1.numpy())
    res = ode_likelihood(LinearFlow(A3), path, x1, solver="rk4", steps=16)
    np.testing.assert_allclose(res.log_prob.double().numpy(), exact, rtol=0, atol=1e-4)
    # with the condot prior N(0, I) the answer would differ by a lot
    wrong = ode_likelihood(LinearFlow(A3), get_path("condot"), x1, solver="rk4", steps=16)
    assert (wrong.log_prob - res.log_prob).abs().min() > 1.0


def test_grid_direction_does_not_matter():
    phi = _flow_map(A3, B3)
    x1 = _rand(4, 5, 3) @ torch.from_numpy(phi).T
    model, path = LinearFlow(A3, B3), get_path("condot")
    grid = torch.linspace(0, 1, 33) ** 2
    up = ode_likelihood(model, path, x1, solver="rk4", grid=grid)
    down = ode_likelihood(model, path, x1, solver="rk4", grid=grid.flip(0))
    torch.testing.assert_close(up.log_prob, down.log_prob)
    exact = multivariate_normal(mean=np.zeros(3), cov=phi @ phi.T).logpdf(x1.numpy())
    np.testing.assert_allclose(up.log_prob.double().numpy(), exact, rtol=0, atol=1e-3)


def test_dopri5_log_likelihood():
    phi = _flow_map(A3, B3)
    x1 = _rand(5, 5, 3) @ torch.from_numpy(phi).T
    res = ode_likelihood(LinearFlow(A3, B3), get_path("condot"), x1, solver="dopri5", rtol=1e-8, atol=1e-8)
    assert res.nfe > 0
    exact = multivariate_normal(mean=np.zeros(3), cov=phi @ phi.T).logpdf(x1.numpy())
    np.testing.assert_allclose(res.log_prob.double().numpy(), exact, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- Gaussian data, marginal velocity (Theorem 2)

MU = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
S = 0.6


class MarginalVelocity(nn.Module):
    """The exact marginal velocity (velocity target) or posterior mean E[x1 | x_t] (x1 target) of an
    affine path from N(0, I) to N(mu, s^2 I)."""

    def __init__(self, path, target="velocity") -> None:
        super().__init__()
        self.path, self.target = path, target

    def forward(self, x, t):
        s = self.path.scheduler(t.double())
        a, sg, da, ds = (v[:, None] for v in (s.alpha_t, s.sigma_t, s.d_alpha_t, s.d_sigma_t))
        var = sg ** 2 + a ** 2 * S ** 2
        if self.target == "x1":
            return MU + a * S ** 2 / var * (x - a * MU)
        return da * MU + (ds * sg + da * a * S ** 2) / var * (x - a * MU)


@pytest.mark.parametrize("name", ["condot", "trig"])
def test_marginal_flow_likelihood_is_data_density(name):
    path = get_path(name)
    x1 = MU + S * _rand(6, 5, 3)
    exact = multivariate_normal(mean=MU.numpy(), cov=S ** 2 * np.eye(3)).logpdf(x1.numpy())
    res = ode_likelihood(MarginalVelocity(path), path, x1, solver="rk4", steps=16)
    np.testing.assert_allclose(res.log_prob.double().numpy(), exact, rtol=0, atol=1e-3)
    # its latent is (x1 - mu) / s: the flow between two Gaussians is affine
    torch.testing.assert_close(res.x0, (x1 - MU) / S, rtol=1e-4, atol=1e-4)


def test_x1_prediction_samples_like_velocity_prediction():
    path = get_path("condot")
    x0 = draw_prior(path, 7, (3,), generator=torch.Generator().manual_seed(7)).double()
    v = ode_sample(MarginalVelocity(path), path, x0, solver="midpoint", steps=16)
    torch.testing.assert_close(v.x, MU + S * x0, rtol=1e-4, atol=1e-4)
    # x1-prediction divides by sigma_1 = 0, so it stops at t = 1 - T_EPS; compare on that interval
    assert path.time_interval("x1") == (0.0, 1.0 - T_EPS)
    x1 = ode_sample(MarginalVelocity(path, "x1"), path, x0, solver="midpoint", steps=16, target="x1")
    torch.testing.assert_close(x1.x, v.x, rtol=1e-4, atol=1e-4)  # the final jump lands on the flow's end
    assert x1.nfe == v.nfe + 1
    unjumped = ode_sample(MarginalVelocity(path, "x1"), path, x0, solver="midpoint", steps=16, target="x1",
                      denoise=False)
    v_eps = ode_sample(MarginalVelocity(path), path, x0, solver="midpoint", grid=time_grid(16, 0.0, 1.0 - T_EPS))
    torch.testing.assert_close(unjumped.x, v_eps.x, rtol=1e-4, atol=1e-4)


def test_time_interval_moves_singular_ends():
    assert get_path("condot").time_interval("velocity") == (0.0, 1.0)
    assert get_path("condot", sigma_min=0.01).time_interval("x1") == (0.0, 1.0)
    assert get_path("trig").time_interval("x0") == (T_EPS, 1.0 - T_EPS)
    assert get_path("ve").time_interval("x0") == (0.0, 1.0)
    assert get_path("vp").time_interval("velocity") == (0.0, 1.0 - T_EPS)


# ---------------------------------------------------------------- divergences

def test_divergence_exact_of_linear_field_is_trace():
    x = _rand(8, 5, 3)
    t = torch.tensor(0.3)
    fx, div = divergence_exact(lambda z, tt: z @ A3.T, x, t)
    torch.testing.assert_close(fx, x @ A3.T)
    assert div.shape == (5,)
    torch.testing.assert_close(div.double(), torch.full((5,), float(torch.trace(A3)), dtype=F64), rtol=0, atol=1e-6)


def test_divergence_exact_of_mlp_matches_jacobian_trace():
    model = TanhMLP()
    x = _rand(9, 5, 4)
    t = torch.tensor(0.4)
    _, div = divergence_exact(lambda z, tt: model(z, tt.expand(z.shape[0])), x, t)
    torch.testing.assert_close(div.double(), _jacobian_trace(model, x, 0.4), rtol=1e-6, atol=1e-6)
    # image-shaped states: divergence sums over all non-batch dims
    lin = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=F64)
    _, div_img = divergence_exact(lambda z, tt: z * lin.reshape(1, 1, 2, 2), _rand(10, 3, 1, 2, 2), t)
    torch.testing.assert_close(div_img.double(), torch.full((3,), float(lin.sum()), dtype=F64))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(kind):
    model = TanhMLP()
    n_pts, k = 3, 4000
    x = _rand(11, n_pts, 4)
    t = torch.tensor(0.6)
    field = lambda z, tt: model(z, tt.expand(z.shape[0]))  # noqa: E731
    exact = _jacobian_trace(model, x, 0.6)

    # k independent single-probe estimates per point, in one batched call
    g = torch.Generator().manual_seed(12)
    xr = x.repeat(k, 1)
    probes = make_probes(1, tuple(xr.shape), kind, generator=g).double()
    fx, est = divergence_hutchinson(field, xr, t, probes)
    torch.testing.assert_close(fx, field(xr, t))
    est = est.double().reshape(k, n_pts)
    mean, se = est.mean(0), est.std(0) / math.sqrt(k)
    assert ((mean - exact).abs() / se).max() < 4.0, (mean, exact, se)
    assert (se > 1e-4).all()  # a real estimator, not the exact trace in disguise
    if kind == "gaussian":
        assert (est.std(0) > 0.05).all()

    # a k-probe estimate is the mean of its probes' eps^T J eps
    p8 = make_probes(8, (n_pts, 4), kind, generator=g).double()
    _, est8 = divergence_hutchinson(field, x, t, p8)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda z: model(z[None], t.expand(1))[0], xi) for xi in x])
    manual = torch.einsum("kbi,bij,kbj->kb", p8, jac, p8).mean(0)
    torch.testing.assert_close(est8.double(), manual, rtol=1e-5, atol=1e-5)


def test_make_probes():
    g = torch.Generator().manual_seed(13)
    r = make_probes(2000, (4,), "rademacher", generator=g)
    assert r.shape == (2000, 4) and set(r.unique().tolist()) == {-1.0, 1.0}
    for p in (r, make_probes(4000, (4,), "gaussian", generator=g)):
        cov = p.T.double() @ p.double() / p.shape[0]
        torch.testing.assert_close(cov, torch.eye(4, dtype=F64), rtol=0, atol=0.1)
    with pytest.raises(ValueError, match="unknown probe distribution 'sphere'"):
        make_probes(1, (4,), "sphere")
    with pytest.raises(ValueError, match="at least one"):
        make_probes(0, (4,))
    with pytest.raises(ValueError, match="probes must have shape"):
        divergence_hutchinson(lambda z, t: z, torch.zeros(3, 4), torch.tensor(0.0), torch.zeros(2, 3, 5))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_log_likelihood_agrees_with_exact(kind):
    model = TanhMLP(seed=1)
    path = get_path("condot")
    x1 = _rand(14, 3, 4)
    exact = ode_likelihood(model, path, x1, solver="rk4", steps=8)
    reps = 256
    probes = make_probes(1, (reps * 3, 4), kind, generator=torch.Generator().manual_seed(15)).double()
    hutch = ode_likelihood(model, path, x1.repeat(reps, 1), solver="rk4", steps=8, probes=probes)
    torch.testing.assert_close(hutch.x0, exact.x0.repeat(reps, 1))
    est = hutch.log_prob.double().reshape(reps, 3)
    mean, se = est.mean(0), est.std(0) / math.sqrt(reps)
    assert ((mean - exact.log_prob.double()).abs() / se).max() < 4.0, (mean, exact.log_prob, se)
    assert (se > 1e-4).all()


# ---------------------------------------------------------------- sampling with log-likelihood

@pytest.mark.parametrize("probe_kind", [None, "rademacher"])
def test_sample_log_prob_matches_log_likelihood(probe_kind):
    model = TanhMLP(seed=2)
    path = get_path("condot")
    g = torch.Generator().manual_seed(16)
    x0 = draw_prior(path, 5, (4,), generator=g).double()
    probes = None if probe_kind is None else make_probes(2, (5, 4), probe_kind, generator=g).double()
    fwd = ode_sample(model, path, x0, solver="rk4", steps=16, log_likelihood=True, probes=probes,
                 return_intermediates=True)
    assert fwd.log_prob.shape == (5,) and fwd.nfe == 16 * 4
    assert fwd.intermediates.shape == (17, 5, 4) and torch.equal(fwd.intermediates[0], x0)
    plain = ode_sample(model, path, x0, solver="rk4", steps=16)
    assert plain.log_prob is None
    torch.testing.assert_close(fwd.x, plain.x)
    back = ode_likelihood(model, path, fwd.x, solver="rk4", steps=16, probes=probes)
    torch.testing.assert_close(back.x0, x0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fwd.log_prob.double().numpy(), back.log_prob.double().numpy(), rtol=0, atol=1e-3)


def test_sample_log_prob_of_linear_flow_is_exact():
    path = get_path("condot")
    x0 = draw_prior(path, 5, (3,), generator=torch.Generator().manual_seed(17)).double()
    res = ode_sample(LinearFlow(A3, B3), path, x0, solver="rk4", steps=16, log_likelihood=True)
    phi = _flow_map(A3, B3)
    exact = multivariate_normal(mean=np.zeros(3), cov=phi @ phi.T).logpdf(res.x.numpy())
    np.testing.assert_allclose(res.log_prob.double().numpy(), exact, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- bits per dim and input checks

@pytest.mark.parametrize("levels", [2, 16, 256])
@pytest.mark.parametrize("dim", [1, 3, 3072])
def test_bits_per_dim_of_uniform_density(levels, dim):
    """p uniform on [-1, 1]^D has log p = -D log 2 and is exactly log2(L) bits/dim for L-level data."""
    log_p = torch.full((4,), -dim * math.log(2.0), dtype=F64)
    torch.testing.assert_close(bits_per_dim(log_p, dim, levels), torch.full((4,), math.log2(levels), dtype=F64))


def test_bits_per_dim_formula():
    log_p = torch.tensor([-100.0, 0.0, 37.5], dtype=F64)
    d, lv = 12, 256
    expected = -(log_p + d * math.log(2.0 / lv)) / (d * math.log(2.0))
    torch.testing.assert_close(bits_per_dim(log_p, d, lv), expected)
    # one extra nat of log-likelihood is 1 / (D log 2) fewer bits per dim
    torch.testing.assert_close(bits_per_dim(log_p + 1, d, lv), expected - 1 / (d * math.log(2.0)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises(bad):
    x = torch.zeros(3, 4)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        ode_likelihood(TanhMLP(), get_path("condot"), x.double())
