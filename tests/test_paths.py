"""Affine probability paths: x_t, u_t, end points, target conversion, priors, time samplers.

Every schedule is checked against a closed form written here (float64), independently of the
scheduler code; derivatives are checked by autograd, forward-mode AD and central differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from fastfm.path.densities import Gaussian
from fastfm.path.affine import AffinePath, AffineScheduler, get_path
from fastfm.training.timesteps import get_time_sampler

F = Callable[[torch.Tensor], torch.Tensor]
B, D = 7, 3


# ---------------------------------------------------------------- closed forms (float64, written by hand)

def _vp_alpha(t, b_min=0.1, b_max=20.0):
    s = 1 - t
    return torch.exp(-0.5 * (b_min * s + 0.5 * (b_max - b_min) * s ** 2))


def _vp_d_alpha(t, b_min=0.1, b_max=20.0):
    s = 1 - t
    return _vp_alpha(t, b_min, b_max) * 0.5 * (b_min + (b_max - b_min) * s)


def _vp_sigma(t, b_min=0.1, b_max=20.0):
    return torch.sqrt(1 - _vp_alpha(t, b_min, b_max) ** 2)


def _vp_d_sigma(t, b_min=0.1, b_max=20.0):
    a = _vp_alpha(t, b_min, b_max)
    return -a * _vp_d_alpha(t, b_min, b_max) / torch.sqrt(1 - a ** 2)


LOG_VE = math.log(50.0 / 0.01)
E2 = math.expm1(2.0)


@dataclass
class Spec:
    id: str
    make: Callable[[], AffinePath]
    alpha: F
    sigma: F
    d_alpha: F
    d_sigma: F
    ends: tuple[float, float, float, float]  # alpha_0, sigma_0, alpha_1, sigma_1


def _affine_with_derivatives() -> AffinePath:
    return AffinePath(AffineScheduler(lambda t: t ** 2, lambda t: (1 - t) ** 1.5,
                                      lambda t: 2 * t, lambda t: -1.5 * (1 - t) ** 0.5))


def _affine_autodiff() -> AffinePath:
    return AffinePath(AffineScheduler(lambda t: torch.expm1(2 * t) / E2,
                                      lambda t: torch.cos(0.5 * math.pi * t) ** 2))


def _affine_mixed() -> AffinePath:
    """d_alpha given, d_sigma by forward-mode AD."""
    return AffinePath(AffineScheduler(lambda t: t ** 2, lambda t: (1 - t) ** 1.5, d_alpha=lambda t: 2 * t))


SPECS = [
    Spec("condot", lambda: get_path("condot"),
         lambda t: t, lambda t: 1 - t, lambda t: torch.ones_like(t), lambda t: -torch.ones_like(t),
         (0.0, 1.0, 1.0, 0.0)),
    Spec("condot-0.01", lambda: get_path("condot", sigma_min=0.01),
         lambda t: t, lambda t: 1 - 0.99 * t, lambda t: torch.ones_like(t), lambda t: -0.99 * torch.ones_like(t),
         (0.0, 1.0, 1.0, 0.01)),
    Spec("vp", lambda: get_path("vp"), _vp_alpha, _vp_sigma, _vp_d_alpha, _vp_d_sigma,
         (math.exp(-0.5 * (0.1 + 0.5 * 19.9)), math.sqrt(1 - math.exp(-(0.1 + 0.5 * 19.9))), 1.0, 0.0)),
    Spec("vp-0.5-8", lambda: get_path("vp", beta_min=0.5, beta_max=8.0),
         lambda t: _vp_alpha(t, 0.5, 8.0), lambda t: _vp_sigma(t, 0.5, 8.0),
         lambda t: _vp_d_alpha(t, 0.5, 8.0), lambda t: _vp_d_sigma(t, 0.5, 8.0),
         (math.exp(-0.5 * (0.5 + 3.75)), math.sqrt(1 - math.exp(-(0.5 + 3.75))), 1.0, 0.0)),
    Spec("ve", lambda: get_path("ve"),
         lambda t: torch.ones_like(t), lambda t: 0.01 * 5000.0 ** (1 - t),
         lambda t: torch.zeros_like(t), lambda t: -LOG_VE * 0.01 * 5000.0 ** (1 - t),
         (1.0, 50.0, 1.0, 0.01)),
    Spec("ve-0.1-5", lambda: get_path("ve", sigma_min=0.1, sigma_max=5.0),
         lambda t: torch.ones_like(t), lambda t: 0.1 * 50.0 ** (1 - t),
         lambda t: torch.zeros_like(t), lambda t: -math.log(50.0) * 0.1 * 50.0 ** (1 - t),
         (1.0, 5.0, 1.0, 0.1)),
    Spec("linear", lambda: get_path("linear"),
         lambda t: t, lambda t: 1 - t, lambda t: torch.ones_like(t), lambda t: -torch.ones_like(t),
         (0.0, 1.0, 1.0, 0.0)),
    Spec("trig", lambda: get_path("trig"),
         lambda t: torch.sin(0.5 * math.pi * t), lambda t: torch.cos(0.5 * math.pi * t),
         lambda t: 0.5 * math.pi * torch.cos(0.5 * math.pi * t), lambda t: -0.5 * math.pi * torch.sin(0.5 * math.pi * t),
         (0.0, 1.0, 1.0, 0.0)),
    Spec("affine-given-derivatives", _affine_with_derivatives,
         lambda t: t ** 2, lambda t: (1 - t) ** 1.5, lambda t: 2 * t, lambda t: -1.5 * (1 - t) ** 0.5,
         (0.0, 1.0, 1.0, 0.0)),
    Spec("affine-mixed", _affine_mixed,
         lambda t: t ** 2, lambda t: (1 - t) ** 1.5, lambda t: 2 * t, lambda t: -1.5 * (1 - t) ** 0.5,
         (0.0, 1.0, 1.0, 0.0)),
    Spec("affine-autodiff", _affine_autodiff,
         lambda t: torch.expm1(2 * t) / E2, lambda t: torch.cos(0.5 * math.pi * t) ** 2,
         lambda t: 2 * torch.exp(2 * t) / E2, lambda t: -0.5 * math.pi * torch.sin(math.pi * t),
         (0.0, 1.0, 1.0, 0.0)),
]

spec_params = pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])


def _data(seed: int, shape=(B, D), lo=0.01, hi=0.99):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    x1 = 2.0 + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    t = lo + (hi - lo) * torch.rand(shape[0], generator=g, dtype=torch.float64)
    return x0, x1, t


def _col(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return c.reshape(-1, *([1] * (x.dim() - 1)))


def _psi(spec: Spec, t, x0, x1):
    return _col(spec.sigma(t), x0) * x0 + _col(spec.alpha(t), x1) * x1


def _u(spec: Spec, t, x0, x1):
    return _col(spec.d_sigma(t), x0) * x0 + _col(spec.d_alpha(t), x1) * x1


def _close(actual, expected, rtol=2e-5, atol=2e-5):
    """Compare an fp32 result with a float64 reference, atol scaled by the reference's magnitude."""
    expected = expected.double()
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * scale)


# ---------------------------------------------------------------- x_t and u_t

@spec_params
def test_sample_matches_closed_form(spec: Spec):
    path = spec.make()
    x0, x1, t = _data(0)
    ps = path.sample(x0.float(), x1.float(), t.float())
    assert ps.x_t.shape == (B, D) and ps.target.shape == (B, D)
    assert ps.x_t.dtype == torch.float32 and ps.target.dtype == torch.float32
    tf = t.float().double()  # the time the path actually saw
    _close(ps.x_t, _psi(spec, tf, x0.float().double(), x1.float().double()))
    _close(ps.target, _u(spec, tf, x0.float().double(), x1.float().double()))


@spec_params
def test_sample_broadcasts_over_image_shapes(spec: Spec):
    path = spec.make()
    x0, x1, t = _data(1, shape=(5, 2, 3, 3))
    ps = path.sample(x0.float(), x1.float(), t.float())
    assert ps.x_t.shape == (5, 2, 3, 3)
    tf = t.float().double()
    _close(ps.x_t, _psi(spec, tf, x0.float().double(), x1.float().double()))
    _close(ps.target, _u(spec, tf, x0.float().double(), x1.float().double()))


@spec_params
def test_velocity_is_time_derivative_autograd(spec: Spec):
    """u_t = d/dt psi_t(x0) by reverse-mode autograd through the closed form, and by torch.func.jvp
    through the scheduler's own alpha_t, sigma_t (float64)."""
    path = spec.make()
    x0, x1, t = _data(2)
    t = t.float().double().requires_grad_(True)
    psi = _psi(spec, t, x0, x1)
    dpsi = torch.stack([torch.autograd.grad(psi[:, j].sum(), t, retain_graph=True)[0] for j in range(D)], 1)
    u = path.sample(x0.float(), x1.float(), t.detach().float()).target
    _close(u, dpsi)

    sched = path.scheduler

    def psi_sched(tt):
        s = sched(tt)
        return _col(s.sigma_t, x0) * x0 + _col(s.alpha_t, x1) * x1

    td = t.detach()
    _, jvp = torch.func.jvp(psi_sched, (td,), (torch.ones_like(td),))
    torch.testing.assert_close(jvp, dpsi, rtol=1e-9, atol=1e-9)
    _close(u, jvp)


@spec_params
def test_velocity_is_time_derivative_finite_differences(spec: Spec):
    """Central differences in float64, of the closed form and of the scheduler evaluated in float64."""
    path = spec.make()
    x0, x1, t = _data(3)
    h = 1e-5
    fd = (_psi(spec, t + h, x0, x1) - _psi(spec, t - h, x0, x1)) / (2 * h)
    torch.testing.assert_close(_u(spec, t, x0, x1), fd, rtol=1e-7, atol=1e-7)
    _close(path.sample(x0.float(), x1.float(), t.float()).target, _u(spec, t.float().double(), x0.float().double(),
                                                                      x1.float().double()))

    s, sp, sm = path.scheduler(t), path.scheduler(t + h), path.scheduler(t - h)
    assert s.alpha_t.dtype == torch.float64
    torch.testing.assert_close(s.d_alpha_t, (sp.alpha_t - sm.alpha_t) / (2 * h), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(s.d_sigma_t, (sp.sigma_t - sm.sigma_t) / (2 * h), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(s.alpha_t, spec.alpha(t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.sigma_t, spec.sigma(t), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- end points

@spec_params
def test_end_points(spec: Spec):
    path = spec.make()
    x0, x1, _ = _data(4)
    x0, x1 = x0.float(), x1.float()
    a0, s0, a1, s1 = spec.ends
    assert float(spec.alpha(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(a0, abs=1e-12)
    for t_val, a, s in ((0.0, a0, s0), (1.0, a1, s1)):
        t = torch.full((B,), t_val)
        sch = path.scheduler(t)
        torch.testing.assert_close(sch.alpha_t, torch.full((B,), a), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(sch.sigma_t, torch.full((B,), s), rtol=1e-6, atol=1e-7)
        x_t = path.sample(x0, x1, t).x_t
        _close(x_t, s * x0.double() + a * x1.double(), rtol=1e-6, atol=1e-6)


def test_end_point_values_of_named_paths():
    """The documented end points, spelled out: data at t = 1, sigma_min x0 left over for condot/ve."""
    g = torch.Generator().manual_seed(5)
    x0, x1 = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    one, zero = torch.ones(B), torch.zeros(B)
    for name in ("linear", "trig", "vp"):
        torch.testing.assert_close(get_path(name).sample(x0, x1, one).x_t, x1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(get_path("condot").sample(x0, x1, one).x_t, x1)
    torch.testing.assert_close(get_path("condot", sigma_min=0.01).sample(x0, x1, one).x_t, x1 + 0.01 * x0)
    torch.testing.assert_close(get_path("ve").sample(x0, x1, one).x_t, x1 + 0.01 * x0, rtol=1e-5, atol=1e-6)
    for name in ("linear", "trig", "condot"):
        torch.testing.assert_close(get_path(name).sample(x0, x1, zero).x_t, x0)
    vp0 = get_path("vp").scheduler(zero)
    assert float(vp0.alpha_t[0]) == pytest.approx(0.0066, abs=1e-4)
    torch.testing.assert_close(get_path("ve").sample(x0, x1, zero).x_t, 50.0 * x0 + x1, rtol=1e-5, atol=1e-4)


def test_vp_velocity_finite_near_t1():
    """sigma_t -> 0 at t = 1 for VP: sigma'_t is clamped, never inf/nan."""
    path = get_path("vp")
    s = path.scheduler(torch.tensor([0.999, 0.99999, 1.0]))
    assert torch.isfinite(s.d_sigma_t).all() and torch.isfinite(s.sigma_t).all()


# ---------------------------------------------------------------- prediction targets

@spec_params
@pytest.mark.parametrize("target", ["x1", "x0"])
def test_to_velocity_recovers_conditional_velocity(spec: Spec, target: str):
    path = spec.make()
    x0, x1, t = _data(6, lo=0.05, hi=0.95)
    x0, x1, t = x0.float(), x1.float(), t.float()
    ps = path.sample(x0, x1, t)
    pred = x1 if target == "x1" else x0
    v = path.to_velocity(pred, ps.x_t, t, target)
    assert v.shape == (B, D)
    _close(v, _u(spec, t.double(), x0.double(), x1.double()), rtol=1e-4, atol=1e-4)
    # the regression target of that parametrisation is the true x1 / x0
    torch.testing.assert_close(path.sample(x0, x1, t, target).target, pred)
    # velocity passes through unchanged
    assert path.to_velocity(ps.target, ps.x_t, t, "velocity") is ps.target


@spec_params
def test_coefficients(spec: Spec):
    path = spec.make()
    t = _data(7)[2]
    tf = t.float().double()
    for target, (c, d) in {"x1": (0.0, 1.0), "x0": (1.0, 0.0)}.items():
        co = path.coefficients(t.float(), target)
        for v in (co.a, co.b, co.c, co.d):
            assert v.shape == (B,) and v.dtype == torch.float32
        torch.testing.assert_close(co.c, torch.full((B,), c))
        torch.testing.assert_close(co.d, torch.full((B,), d))
        _close(co.a, spec.sigma(tf))
        _close(co.b, spec.alpha(tf))
    co = path.coefficients(t, "velocity")  # float64 t is accepted, coefficients are fp32
    assert co.c.dtype == torch.float32
    _close(co.c, spec.d_sigma(tf))
    _close(co.d, spec.d_alpha(tf))


def test_unknown_target_raises():
    path = get_path("condot")
    x, t = torch.zeros(B, D), torch.full((B,), 0.5)
    with pytest.raises(ValueError, match="unknown prediction target 'eps'"):
        path.coefficients(t, "eps")
    with pytest.raises(ValueError, match="unknown prediction target 'eps'"):
        path.to_velocity(x, x, t, "eps")
    with pytest.raises(ValueError, match="shapes differ"):
        path.sample(torch.zeros(B, D), torch.zeros(B, D + 1), t)


# ---------------------------------------------------------------- priors

@spec_params
def test_prior_is_gaussian_with_std_sigma0(spec: Spec):
    path = spec.make()
    sigma0 = spec.ends[1]
    assert isinstance(path.prior, Gaussian)
    assert path.prior.std == pytest.approx(sigma0, rel=1e-6)
    g = torch.Generator().manual_seed(8)
    x = path.prior.sample((5, D), generator=g)
    expected = (-0.5 * (x.double() / sigma0) ** 2 - math.log(sigma0) - 0.5 * math.log(2 * math.pi)).sum(1)
    torch.testing.assert_close(path.prior.log_prob(x).double(), expected, rtol=1e-5, atol=1e-5)
    big = path.prior.sample((20000, 1), generator=g)
    assert float(big.std()) == pytest.approx(sigma0, rel=0.03)


def test_ve_prior_is_sigma_max():
    assert get_path("ve", sigma_min=0.02, sigma_max=7.0).prior.std == pytest.approx(7.0)


# ---------------------------------------------------------------- construction errors

@pytest.mark.parametrize("name, kwargs, match", [
    ("nope", {}, "unknown path 'nope'"),
    ("condot", {"sigma_min": 1.5}, "sigma_min"),
    ("condot", {"sigma_min": -0.1}, "sigma_min"),
    ("condot", {"beta_min": 0.1}, "bad parameters for path 'condot'"),
    ("vp", {"beta_min": 5.0, "beta_max": 1.0}, "beta_min"),
    ("vp", {"beta_min": -1.0}, "beta_min"),
    ("vp", {"sigma_min": 0.1}, "bad parameters for path 'vp'"),
    ("ve", {"sigma_min": 0.0}, "sigma_min"),
    ("ve", {"sigma_min": 10.0, "sigma_max": 1.0}, "sigma_min"),
    ("linear", {"sigma_min": 0.1}, "bad parameters for path 'linear'"),
    ("trig", {"foo": 1.0}, "bad parameters for path 'trig'"),
])
def test_get_path_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_path(name, **kwargs)


def test_gaussian_std_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        Gaussian(0.0)


# ---------------------------------------------------------------- time samplers

def test_uniform_time_sampler():
    n = 100_000
    t = get_time_sampler("uniform")(n, generator=torch.Generator().manual_seed(9))
    assert t.shape == (n,) and t.dtype == torch.float32
    assert float(t.min()) >= 0.0 and float(t.max()) < 1.0
    se = math.sqrt(1 / 12 / n)
    assert abs(float(t.double().mean()) - 0.5) < 5 * se
    # every decile holds about 10%
    counts = torch.histc(t, bins=10, min=0.0, max=1.0)
    assert (counts - n / 10).abs().max() < 5 * math.sqrt(n * 0.1 * 0.9)
    t2 = get_time_sampler("uniform")(n, generator=torch.Generator().manual_seed(9))
    assert torch.equal(t, t2)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.5, 0.8), (-1.0, 1.5)])
def test_logit_normal_time_sampler(mean, std):
    n = 100_000
    t = get_time_sampler("logit-normal", mean=mean, std=std)(n, generator=torch.Generator().manual_seed(10))
    assert t.shape == (n,) and t.dtype == torch.float32
    assert float(t.min()) > 0.0 and float(t.max()) < 1.0
    m = 1 / (1 + math.exp(-mean))
    # sample median: SE = 1 / (2 f(m) sqrt(n)), f(m) = phi(0) / (std m (1 - m))
    se_med = std * m * (1 - m) / (2 * 0.3989 * math.sqrt(n))
    assert abs(float(t.median()) - m) < 5 * se_med
    z = torch.logit(t.double())
    assert abs(float(z.mean()) - mean) < 5 * std / math.sqrt(n)
    assert float(z.std()) == pytest.approx(std, rel=0.02)


def test_time_sampler_errors():
    with pytest.raises(ValueError, match="unknown time sampler 'beta'"):
        get_time_sampler("beta")
    with pytest.raises(ValueError, match="std"):
        get_time_sampler("logit-normal", std=0.0)
