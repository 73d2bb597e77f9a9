"""Conditional Flow Matching loss.

Theorem 2 (Lipman et al. 2022) on Gaussian data q = N(mu, s^2 I): the marginal velocity of an affine
path is closed-form,

    u_t(x) = alpha'_t mu + (sigma'_t sigma_t + alpha'_t alpha_t s^2) / (sigma_t^2 + alpha_t^2 s^2) (x - alpha_t mu),

so the gradients of the FM loss (regress on u_t(x_t)) and of fastfm's CFM loss (regress on u_t(x_t | x1))
can be compared on the same Monte Carlo samples, within their Monte Carlo standard error.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastfm.training.losses import cfm_loss
from fastfm.path.affine import get_path

D = 3
MU = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
S = 0.7


class LinearField(nn.Module):
    """v(x, t) = W x + b + t c."""

    def __init__(self, seed: int, dtype=torch.float64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(0.5 * torch.randn(D, D, generator=g, dtype=dtype))
        self.b = nn.Parameter(torch.randn(D, generator=g, dtype=dtype))
        self.c = nn.Parameter(torch.randn(D, generator=g, dtype=dtype))

    def forward(self, x, t):
        return x @ self.W.T + self.b + t.to(x.dtype)[:, None] * self.c


def _mc(n: int, seed: int, t_max: float):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, D, generator=g, dtype=torch.float64)
    x1 = MU + S * torch.randn(n, D, generator=g, dtype=torch.float64)
    t = t_max * torch.rand(n, generator=g, dtype=torch.float32)
    return x0, x1, t


def _schedule(path, t):
    s = path.scheduler(t)
    return tuple(_c.double()[:, None] for _c in (s.alpha_t, s.sigma_t, s.d_alpha_t, s.d_sigma_t))


def _targets(path, x0, x1, t, target):
    """x_t, the conditional target and the marginal (Theorem 2) target, float64."""
    a, sg, da, ds = _schedule(path, t)
    x_t = sg * x0 + a * x1
    var = sg ** 2 + a ** 2 * S ** 2
    if target == "velocity":
        cond = ds * x0 + da * x1
        marg = da * MU + (ds * sg + da * a * S ** 2) / var * (x_t - a * MU)
        cond_var = (ds ** 2 + da ** 2 * S ** 2) - (ds * sg + da * a * S ** 2) ** 2 / var
    else:  # x1: the posterior mean E[x1 | x_t]
        cond = x1
        marg = MU + a * S ** 2 / var * (x_t - a * MU)
        cond_var = S ** 2 - (a * S ** 2) ** 2 / var
    return x_t, cond, marg, cond_var[:, 0]


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.detach().flatten().clone() for p in model.parameters()])


@pytest.mark.parametrize("name, kwargs, t_max, target", [
    ("condot", {}, 1.0, "velocity"),
    ("condot", {"sigma_min": 0.01}, 1.0, "velocity"),
    ("vp", {}, 0.95, "velocity"),   # sigma'_t ~ (1-t)^-1/2 at t -> 1: keep the MC variance finite
    ("trig", {}, 0.95, "velocity"),
    ("condot", {}, 1.0, "x1"),
    ("vp", {}, 0.95, "x1"),
])
def test_cfm_gradient_equals_fm_gradient(name, kwargs, t_max, target):
    path = get_path(name, **kwargs)
    n = 200_000
    x0, x1, t = _mc(n, seed=11, t_max=t_max)
    x_t, cond, marg, cond_var = _targets(path, x0, x1, t, target)

    model = LinearField(seed=12)
    out = cfm_loss(model, path, x0, x1, t, target=target)
    g_cfm = _grads(model, out.loss)

    v = model(x_t, t)
    fm_per_sample = (v - marg).pow(2).mean(1)
    g_fm = _grads(model, fm_per_sample.mean())

    # per-sample gradient of (cfm - fm) for the linear model: (2/D)(marg - cond) times the features
    r = (2.0 / D) * (marg - cond).detach()
    per = torch.cat([(r[:, :, None] * x_t[:, None, :]).flatten(1), r, t.double()[:, None] * r], 1)
    torch.testing.assert_close(g_cfm - g_fm, per.mean(0), rtol=1e-4, atol=1e-6)  # the bookkeeping is right
    se = per.std(0) / math.sqrt(n)
    z = (g_cfm - g_fm) / se
    assert z.abs().max() < 4.5, f"CFM and FM gradients differ by {z.abs().max():.2f} standard errors"
    # the check has power: the gradient is far larger than its MC error
    assert g_fm.norm() > 30 * se.norm()

    # loss values differ by the positive, parameter-free constant E_t Var(target | x_t) (per dim)
    per_cfm = out.per_sample.detach().double()
    delta = per_cfm - fm_per_sample.detach()
    const = cond_var.mean()
    assert float(const) > 0 and float(out.loss.detach()) > float(fm_per_sample.detach().mean())
    assert abs(float(delta.mean() - const)) < 4.5 * float((delta - cond_var).std() / math.sqrt(n))

    other = LinearField(seed=13)
    out2 = cfm_loss(other, path, x0, x1, t, target=target)
    delta2 = out2.per_sample.detach().double() - (other(x_t, t) - marg).pow(2).mean(1).detach()
    assert abs(float(delta2.mean() - const)) < 4.5 * float((delta2 - cond_var).std() / math.sqrt(n))


def test_gradient_check_detects_a_wrong_target():
    """Control: regressing on a wrong conditional target (sign of sigma' flipped) is caught."""
    path = get_path("condot")
    n = 200_000
    x0, x1, t = _mc(n, seed=14, t_max=1.0)
    x_t, cond, marg, _ = _targets(path, x0, x1, t, "velocity")
    model = LinearField(seed=15)
    wrong = (model(x_t, t) - (x0 + x1)).pow(2).mean(1).mean()
    g_wrong = _grads(model, wrong)
    g_fm = _grads(model, (model(x_t, t) - marg).pow(2).mean(1).mean())
    r = (2.0 / D) * (marg - cond)
    per = torch.cat([(r[:, :, None] * x_t[:, None, :]).flatten(1), r, t.double()[:, None] * r], 1)
    se = per.std(0) / math.sqrt(n)
    assert ((g_wrong - g_fm) / se).abs().max() > 20


# ---------------------------------------------------------------- API behaviour

class Recorder(nn.Module):
    """Scaled identity that records what it was called with and returns bf16 when asked."""

    def __init__(self, out_dtype=None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.out_dtype = out_dtype
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append((x.shape, t.shape, t.dtype, y))
        out = self.scale * x + (0.0 if y is None else y.float()[:, None].reshape(-1, *([1] * (x.dim() - 1))))
        return out.to(self.out_dtype) if self.out_dtype is not None else out


@pytest.mark.parametrize("shape", [(5, 3), (7, 2, 3, 3)])
def test_per_sample_shape_and_value(shape):
    g = torch.Generator().manual_seed(16)
    x0, x1 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.rand(shape[0], generator=g)
    model, path = Recorder(), get_path("condot")
    out = cfm_loss(model, path, x0, x1, t)
    assert out.per_sample.shape == (shape[0],) and out.per_sample.dtype == torch.float32
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    tt = t.reshape(-1, *([1] * (len(shape) - 1)))
    x_t, u = (1 - tt) * x0 + tt * x1, x1 - x0
    expected = (0.5 * x_t - u).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out.per_sample, expected)
    torch.testing.assert_close(out.loss, expected.mean())
    # the model saw x_t, fp32 t of shape (B,), and the conditioning passed through
    cfm_loss(model, path, x0, x1, t, y=torch.arange(shape[0]))
    xs, ts, tdt, y = model.calls[-1]
    assert xs == shape and ts == (shape[0],) and tdt == torch.float32
    assert torch.equal(y, torch.arange(shape[0]))


def test_bf16_inputs_give_fp32_loss():
    g = torch.Generator().manual_seed(17)
    x0 = torch.randn(5, 3, generator=g).bfloat16()
    x1 = torch.randn(5, 3, generator=g).bfloat16()
    t = torch.rand(5, generator=g)
    model = Recorder(out_dtype=torch.bfloat16)
    out = cfm_loss(model, get_path("vp"), x0, x1, t)
    assert out.per_sample.shape == (5,)
    assert out.per_sample.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.scale.grad is not None and torch.isfinite(model.scale.grad)


class Oracle(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x, t):
        return self.value


@pytest.mark.parametrize("name, target", [("condot", "velocity"), ("linear", "velocity"), ("trig", "velocity"),
                                          ("vp", "x1"), ("ve", "x0"), ("condot", "x1")])
def test_zero_loss_for_exact_target(name, target):
    g = torch.Generator().manual_seed(19)
    x0, x1, t = torch.randn(5, 2, 3, generator=g), torch.randn(5, 2, 3, generator=g), torch.rand(5, generator=g)
    tt = t[:, None, None]
    h = 0.5 * math.pi
    exact = {
        ("condot", "velocity"): x1 - x0,
        ("linear", "velocity"): x1 - x0,
        ("trig", "velocity"): h * torch.cos(h * tt) * x1 - h * torch.sin(h * tt) * x0,
        ("vp", "x1"): x1, ("ve", "x0"): x0, ("condot", "x1"): x1,
    }[(name, target)]
    out = cfm_loss(Oracle(exact), get_path(name), x0, x1, t, target=target)
    assert float(out.loss) < 1e-12
    assert out.per_sample.abs().max() < 1e-12
