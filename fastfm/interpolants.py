"""Learned interpolants (Albergo & Vanden-Eijnden 2022, Sec. 2.4): the path itself is optimised to shorten transport.

A Fourier interpolant with the end conditions built in (x0 the source sample, x1 the data sample):

    x_t = sigma(t) x0 + alpha(t) x1
    sigma(t) = 1 - t + sum_k a_k sin(pi k t),     sigma'(t) = -1 + sum_k pi k a_k cos(pi k t)
    alpha(t) =     t + sum_k b_k sin(pi k t),     alpha'(t) =  1 + sum_k pi k b_k cos(pi k t)

so sigma(0) = alpha(1) = 1 and sigma(1) = alpha(0) = 0 for every (a, b); a = b = 0 is the linear interpolant.
(The paper's optional gamma(t) z term is left out: it is not an affine path of (x0, x1), and with a Gaussian
source it adds nothing an affine path lacks.)

Max-min training: for a fixed interpolant I the velocity minimises

    G(v) = E_{t ~ U[0, 1], x0, x1} [ |v(x_t, t)|^2 - 2 d_t I_t . v(x_t, t) ]       (d_t I_t = sigma' x0 + alpha' x1)

which is the CFM loss E|v - d_t I_t|^2 less the v-independent E|d_t I_t|^2. Its minimiser is the marginal velocity
v*_t(x) = E[d_t I_t | x_t = x], and min_v G = -int_0^1 E|v*_t|^2 dt is minus the flow's kinetic energy; the
interpolant's parameters *maximise* min_v G, so they minimise the kinetic energy (never below W2^2(p0, p1)).
By the envelope theorem the gradient of min_v G in (a, b) is that of G at the current v, with v held fixed,
flowing through x_t and d_t I_t (:func:`interpolant_objective`).

The fused path and loss kernels are not differentiable in their coefficients, so the objective is computed here
in plain PyTorch; the velocity's own steps keep using the kernels with the (detached) coefficients of
:class:`LearnedScheduler`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from fastfm.paths import Endpoints, Scheduler, SchedulerOutput, expand_like

MAX_MODES = 64


class FourierInterpolant(nn.Module):
    """sigma(t), alpha(t) with ``modes`` sine corrections each (parameters ``sigma_coef`` a, ``alpha_coef`` b);
    calling it gives the schedule and its time derivatives at t, differentiable in the parameters."""

    def __init__(self, modes: int = 4, sigma_coef: Sequence[float] | None = None,
                 alpha_coef: Sequence[float] | None = None) -> None:
        super().__init__()
        if isinstance(modes, bool) or not isinstance(modes, int) or not 1 <= modes <= MAX_MODES:
            raise ValueError(f"interpolant modes must be an integer in [1, {MAX_MODES}], got {modes!r}")
        coefs = []
        for name, given in (("sigma_coef", sigma_coef), ("alpha_coef", alpha_coef)):
            c = torch.zeros(modes) if given is None else torch.as_tensor(given, dtype=torch.float32)
            if c.shape != (modes,) or not bool(torch.isfinite(c).all()):
                raise ValueError(f"{name} must be {modes} finite numbers (one per mode), got {given!r}")
            coefs.append(c)
        self.modes = modes
        self.sigma_coef = nn.Parameter(coefs[0].clone())
        self.alpha_coef = nn.Parameter(coefs[1].clone())

    def forward(self, t: Tensor) -> SchedulerOutput:
        """(alpha, sigma, alpha', sigma') at t (B,), in t's floating dtype (fp32 for integer t)."""
        dtype = t.dtype if t.is_floating_point() else torch.float32
        t = t.to(dtype)
        freq = math.pi * torch.arange(1, self.modes + 1, device=t.device, dtype=dtype)  # pi k
        phase = t[:, None] * freq
        sin, dcos = torch.sin(phase), torch.cos(phase) * freq  # d/dt sin(pi k t) = pi k cos(pi k t)
        a, b = self.sigma_coef.to(dtype), self.alpha_coef.to(dtype)
        return SchedulerOutput(t + sin @ b, 1 - t + sin @ a, 1 + dcos @ b, -1 + dcos @ a)

    def args(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this interpolant (a run's model.json path args)."""
        return {"modes": self.modes, "sigma_coef": self.sigma_coef.detach().cpu().tolist(),
                "alpha_coef": self.alpha_coef.detach().cpu().tolist()}


class LearnedScheduler(Scheduler):
    """A :class:`FourierInterpolant` as a path's scheduler: detached values (for the kernels and the solvers);
    the interpolant itself stays trainable (``interpolant``). End points are exact: sin(0) = sin(pi k) = 0."""

    def __init__(self, interpolant: FourierInterpolant) -> None:
        self.interpolant = interpolant

    def __call__(self, t: Tensor) -> SchedulerOutput:
        s = self.interpolant(t)
        return SchedulerOutput(*(v.detach() for v in (s.alpha_t, s.sigma_t, s.d_alpha_t, s.d_sigma_t)))

    def endpoints(self) -> Endpoints:
        return Endpoints(0.0, 1.0, 1.0, 0.0)

    @property
    def config(self) -> dict:  # type: ignore[override]
        return {"name": "learned", **self.interpolant.args()}


def interpolant_objective(model: nn.Module, interpolant: FourierInterpolant, x0: Tensor, x1: Tensor, t: Tensor,
                          **conditioning: Tensor) -> Tensor:
    """G = mean_i [ |v(x_t, t)|^2 - 2 d_t I_t . v(x_t, t) ]_i (sums over the data dimensions), x_t and d_t I_t from
    ``interpolant`` at t, in plain PyTorch: differentiable in the interpolant's parameters (and the model's)."""
    if x0.shape != x1.shape or t.shape != x1.shape[:1]:
        raise ValueError(f"need x0, x1 of one shape (B, ...) and t of shape (B,); got {tuple(x0.shape)}, "
                         f"{tuple(x1.shape)}, {tuple(t.shape)}")
    s = interpolant(t.float())
    x_t = expand_like(s.sigma_t, x1) * x0 + expand_like(s.alpha_t, x1) * x1
    d_i = expand_like(s.d_sigma_t, x1) * x0 + expand_like(s.d_alpha_t, x1) * x1
    v = model(x_t.to(x1.dtype), t, **conditioning).float()
    return (v * v - 2 * d_i * v).flatten(1).sum(1).mean()
