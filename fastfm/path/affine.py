"""Affine conditional probability paths (Lipman et al. 2022, Sec. 4; Albergo & Vanden-Eijnden 2022).

    x_t = sigma_t x0 + alpha_t x1,    u_t = sigma'_t x0 + alpha'_t x1   (Theorem 3 velocity)

t = 0 is the source (noise), t = 1 the data. A scheduler gives (alpha_t, sigma_t, alpha'_t,
sigma'_t) per sample; one ``AffinePath`` turns them into x_t, the regression target and the
conversions between prediction targets. Every scheduler, the learned one included, is registered in
``PATHS`` with its parameters (``--path-args``) and declares what it needs of the run that trains it
(``Scheduler.requires``).

The learned path (Albergo & Vanden-Eijnden 2022, Sec. 2.4) is a Fourier interpolant with the end
conditions built in, whose coefficients training optimises to shorten transport (fastfm.path.interpolants):

    sigma(t) = 1 - t + sum_k a_k sin(pi k t),     sigma'(t) = -1 + sum_k pi k a_k cos(pi k t)
    alpha(t) =     t + sum_k b_k sin(pi k t),     alpha'(t) =  1 + sum_k pi k b_k cos(pi k t)

so sigma(0) = alpha(1) = 1 and sigma(1) = alpha(0) = 0 for every (a, b); a = b = 0 is the linear interpolant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from fastfm.path.densities import Density, Gaussian, scaled
from fastfm.registry import Registry

TARGETS = ("velocity", "x1", "x0")
_EPS = 1e-5
T_EPS = 1e-3


@dataclass(frozen=True)
class SchedulerOutput:
    """Per-sample schedule values at t, each of shape (B,), fp32."""

    alpha_t: Tensor
    sigma_t: Tensor
    d_alpha_t: Tensor
    d_sigma_t: Tensor


@dataclass(frozen=True)
class Endpoints:
    """alpha and sigma at t = 0 and t = 1, from the schedule's formulas: a zero here is an exact zero."""

    alpha_0: float
    sigma_0: float
    alpha_1: float
    sigma_1: float


@dataclass(frozen=True)
class Coefficients:
    """x_t = a x0 + b x1 and target = c x0 + d x1, per sample (B,) in fp32: all a path op needs."""

    a: Tensor
    b: Tensor
    c: Tensor
    d: Tensor


@dataclass(frozen=True)
class PathSample:
    x_t: Tensor
    target: Tensor
    t: Tensor


ENDPOINT_ATOL = 1e-9


@dataclass(frozen=True)
class Requires:
    """What a path needs of the run that trains it: each run option of ``settings`` (source, target,
    time_sampler) set to the given value, for the reason ``why``. Config validation checks every path's."""

    settings: Mapping[str, str] = field(default_factory=dict)
    why: str = ""

    def unmet(self, run: Mapping[str, Any]) -> tuple[str, str] | None:
        """The first (option, needed value) that the options ``run`` do not meet; None when all are met."""
        return next(((k, v) for k, v in self.settings.items() if run[k] != v), None)


GAUSSIAN_SOURCE = Requires({"source": "gaussian"}, "a Gaussian diffusion path; a data source needs an interpolant "
                                                   "(linear, trig, condot)")


class Scheduler:
    """Base class: subclasses implement ``__call__(t) -> SchedulerOutput`` and set ``config``.

    ``singular_at_one`` marks schedules whose sigma'_t diverges as t -> 1 (VP). ``endpoints`` gives
    alpha and sigma at t = 0 and 1; the built-in schedules state them in closed form (so trig's
    sigma_1 is 0, not fp32 cos(pi/2) = -4.4e-8). ``requires`` declares what the path needs of its run.
    """

    config: dict
    singular_at_one: bool = False
    requires: Requires = Requires()

    def __call__(self, t: Tensor) -> SchedulerOutput:
        raise NotImplementedError

    def endpoints(self) -> Endpoints:
        """For a schedule given only as code: evaluated in float64, values within ENDPOINT_ATOL = 1e-9
        of 0 taken as exact zeros (float64 rounding of an exact zero, e.g. cos(pi/2) = 6e-17)."""
        s = self(torch.tensor([0.0, 1.0], dtype=torch.float64))

        def snap(v: Tensor) -> float:
            return 0.0 if abs(float(v)) <= ENDPOINT_ATOL else float(v)

        return Endpoints(snap(s.alpha_t[0]), snap(s.sigma_t[0]), snap(s.alpha_t[1]), snap(s.sigma_t[1]))


class CondOTScheduler(Scheduler):
    """alpha_t = t, sigma_t = 1 - (1 - sigma_min) t; sigma_min = 0 is the linear interpolant."""

    def __init__(self, sigma_min: float = 0.0) -> None:
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
        self.sigma_min = sigma_min
        self.config = {"name": "condot", "sigma_min": sigma_min}

    def __call__(self, t: Tensor) -> SchedulerOutput:
        one = torch.ones_like(t)
        return SchedulerOutput(t, 1 - (1 - self.sigma_min) * t, one, -(1 - self.sigma_min) * one)

    def endpoints(self) -> Endpoints:
        return Endpoints(0.0, 1.0, 1.0, self.sigma_min)


class VPScheduler(Scheduler):
    """VP diffusion: alpha_t = exp(-T(1-t)/2), T(s) = b_min s + (b_max - b_min) s^2/2, sigma_t = sqrt(1 - alpha_t^2).

    alpha'_t = alpha_t beta(1-t)/2, sigma'_t = -alpha_t alpha'_t / sigma_t (sigma clamped at 1e-5 near t = 1).
    """

    singular_at_one = True
    requires = GAUSSIAN_SOURCE

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not 0 <= beta_min <= beta_max or beta_max <= 0:
            raise ValueError(f"need 0 <= beta_min <= beta_max, beta_max > 0; got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = beta_min, beta_max
        self.config = {"name": "vp", "beta_min": beta_min, "beta_max": beta_max}

    def __call__(self, t: Tensor) -> SchedulerOutput:
        s = 1 - t
        big_t = self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s * s
        beta = self.beta_min + s * (self.beta_max - self.beta_min)
        alpha = torch.exp(-0.5 * big_t)
        sigma = torch.sqrt(-torch.expm1(-big_t))
        d_alpha = 0.5 * alpha * beta
        return SchedulerOutput(alpha, sigma, d_alpha, -alpha * d_alpha / sigma.clamp_min(_EPS))

    def endpoints(self) -> Endpoints:
        """alpha_0 = exp(-T(1)/2) > 0, sigma_0 = sqrt(1 - alpha_0^2); alpha_1 = 1, sigma_1 = 0."""
        big_t = self.beta_min + 0.5 * (self.beta_max - self.beta_min)  # T(1)
        return Endpoints(math.exp(-0.5 * big_t), math.sqrt(-math.expm1(-big_t)), 1.0, 0.0)


class VEScheduler(Scheduler):
    """VE diffusion: alpha_t = 1, sigma_t = s_min (s_max / s_min)^(1 - t); sigma'_t = -sigma_t log(s_max / s_min)."""

    requires = GAUSSIAN_SOURCE

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.config = {"name": "ve", "sigma_min": sigma_min, "sigma_max": sigma_max}

    def __call__(self, t: Tensor) -> SchedulerOutput:
        log_ratio = math.log(self.sigma_max / self.sigma_min)
        sigma = self.sigma_min * torch.exp((1 - t) * log_ratio)
        return SchedulerOutput(torch.ones_like(t), sigma, torch.zeros_like(t), -log_ratio * sigma)

    def endpoints(self) -> Endpoints:
        return Endpoints(1.0, self.sigma_max, 1.0, self.sigma_min)


class TrigScheduler(Scheduler):
    """Trigonometric interpolant: alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2)."""

    config = {"name": "trig"}

    def __call__(self, t: Tensor) -> SchedulerOutput:
        h = 0.5 * math.pi
        return SchedulerOutput(torch.sin(h * t), torch.cos(h * t), h * torch.cos(h * t), -h * torch.sin(h * t))

    def endpoints(self) -> Endpoints:
        return Endpoints(0.0, 1.0, 1.0, 0.0)


class AffineScheduler(Scheduler):
    """User-given alpha(t), sigma(t) callables (elementwise in t); derivatives by forward-mode AD if not given."""

    def __init__(self, alpha: Callable[[Tensor], Tensor], sigma: Callable[[Tensor], Tensor],
                 d_alpha: Callable[[Tensor], Tensor] | None = None,
                 d_sigma: Callable[[Tensor], Tensor] | None = None) -> None:
        self.alpha, self.sigma, self.d_alpha, self.d_sigma = alpha, sigma, d_alpha, d_sigma
        self.config = {"name": "affine"}

    @staticmethod
    def _value_and_derivative(f: Callable[[Tensor], Tensor], df: Callable[[Tensor], Tensor] | None,
                              t: Tensor) -> tuple[Tensor, Tensor]:
        if df is not None:
            return f(t), df(t)
        return torch.func.jvp(f, (t,), (torch.ones_like(t),))

    def __call__(self, t: Tensor) -> SchedulerOutput:
        alpha, d_alpha = self._value_and_derivative(self.alpha, self.d_alpha, t)
        sigma, d_sigma = self._value_and_derivative(self.sigma, self.d_sigma, t)
        return SchedulerOutput(alpha, sigma, d_alpha, d_sigma)


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
        """The constructor arguments that rebuild this interpolant."""
        return {"modes": self.modes, "sigma_coef": self.sigma_coef.detach().cpu().tolist(),
                "alpha_coef": self.alpha_coef.detach().cpu().tolist()}


class LearnedScheduler(Scheduler):
    """A :class:`FourierInterpolant` as a path's scheduler: detached values (for the kernels and the solvers);
    the interpolant itself stays trainable (``interpolant``), by Adam at learning rate ``lr`` once every ``every``
    velocity steps (fastfm.path.interpolants). End points are exact: sin(0) = sin(pi k) = 0."""

    requires = Requires({"target": "velocity", "time_sampler": "uniform"},
                        "its max-min objective trains the velocity over t ~ U[0, 1]")

    def __init__(self, interpolant: FourierInterpolant, lr: float, every: int) -> None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
            raise ValueError(f"the learned path's lr must be a positive number, got {lr!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"the learned path's every (velocity steps per interpolant step) must be an integer "
                             f">= 1, got {every!r}")
        self.interpolant, self.lr, self.every = interpolant, float(lr), every

    def __call__(self, t: Tensor) -> SchedulerOutput:
        s = self.interpolant(t)
        return SchedulerOutput(*(v.detach() for v in (s.alpha_t, s.sigma_t, s.d_alpha_t, s.d_sigma_t)))

    def endpoints(self) -> Endpoints:
        return Endpoints(0.0, 1.0, 1.0, 0.0)

    def args(self) -> dict[str, Any]:
        """The path args that rebuild this scheduler as trained so far (a run's model.json)."""
        interp = self.interpolant.args()
        return {"modes": interp.pop("modes"), "lr": self.lr, "every": self.every, **interp}

    @property
    def config(self) -> dict:  # type: ignore[override]
        return {"name": "learned", **self.args()}


def expand_like(c: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample (B,) values to broadcast against x of shape (B, ...)."""
    return c.reshape(c.shape[0], *([1] * (x.dim() - 1)))


class AffinePath:
    """x_t = sigma_t x0 + alpha_t x1 with x0 from ``source`` (N(0, I) unless an interpolant's base is given).

    The prior at t = 0 is the law of sigma_0 x0 (alpha_0 x1 is neglected: exact for CondOT and the
    interpolants, alpha_0 = 0.0066 for VP, the usual large-sigma_max approximation for VE).
    """

    def __init__(self, scheduler: Scheduler, source: Density | None = None) -> None:
        self.scheduler = scheduler
        self.source: Density = source if source is not None else Gaussian(1.0)
        self.ends = scheduler.endpoints()
        self.prior: Density = scaled(self.source, self.ends.sigma_0)

    def time_interval(self, target: str = "velocity") -> tuple[float, float]:
        """[t_start, t_end] on which the sampled field is finite: an end moves in by T_EPS = 1e-3 where
        the x1 conversion divides by sigma_1 = 0, the x0 conversion by alpha_0 = 0, an x0 prediction
        is undefined (sigma_1 = 0: x_1 = x1 says nothing of x0, and E[x0 | x_t] = (x - alpha_t x1) / sigma_t
        of sharp data is 0/0 there), or sigma'_t diverges at t = 1 (VP). Sampling and likelihood integrate
        over this interval (sampling then jumps to E[x1 | x_t], ``fastfm.solve.ode``). Pure Python (the schedule's
        exact end points, computed once), so traced solves have no host syncs."""
        lo = T_EPS if target == "x0" and self.ends.alpha_0 == 0.0 else 0.0
        singular = self.scheduler.singular_at_one or (target != "velocity" and self.ends.sigma_1 == 0.0)
        return lo, 1.0 - T_EPS if singular else 1.0

    def coefficients(self, t: Tensor, target: str = "velocity") -> Coefficients:
        """(a, b) = (sigma_t, alpha_t); (c, d) = (sigma'_t, alpha'_t) for velocity, (0, 1) for x1, (1, 0) for x0."""
        s = self.scheduler(t.float())
        if target == "velocity":
            return Coefficients(s.sigma_t, s.alpha_t, s.d_sigma_t, s.d_alpha_t)
        zero, one = torch.zeros_like(s.alpha_t), torch.ones_like(s.alpha_t)
        if target == "x1":
            return Coefficients(s.sigma_t, s.alpha_t, zero, one)
        if target == "x0":
            return Coefficients(s.sigma_t, s.alpha_t, one, zero)
        raise ValueError(f"unknown prediction target {target!r}; choose one of {TARGETS}")

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor, target: str = "velocity") -> PathSample:
        """x_t and the regression target for ``target`` (the Theorem 3 velocity u_t by default)."""
        from fastfm.kernels.ops import affine_path

        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 shapes differ: {tuple(x0.shape)} vs {tuple(x1.shape)}")
        c = self.coefficients(t, target)
        x_t, tgt = affine_path(x1, c.a, c.b, c.c, c.d, x0=x0)
        return PathSample(x_t, tgt, t)

    def to_velocity(self, pred: Tensor, x_t: Tensor, t: Tensor, target: str) -> Tensor:
        """Closed-form conversion of an x1 or x0 prediction to the velocity.

        x1-pred: v = (sigma'/sigma) x_t + (alpha' - sigma' alpha / sigma) x1_hat
        x0-pred: v = (alpha'/alpha) x_t + (sigma' - alpha' sigma / alpha) x0_hat
        (denominators clamped at 1e-5 where the path hits them, t = 1 resp. t = 0).
        """
        if target == "velocity":
            return pred
        s = self.scheduler(t.float())
        if target == "x1":
            sig = s.sigma_t.clamp_min(_EPS)
            k_x, k_p = s.d_sigma_t / sig, s.d_alpha_t - s.d_sigma_t * s.alpha_t / sig
        elif target == "x0":
            alp = s.alpha_t.clamp_min(_EPS)
            k_x, k_p = s.d_alpha_t / alp, s.d_sigma_t - s.d_alpha_t * s.sigma_t / alp
        else:
            raise ValueError(f"unknown prediction target {target!r}; choose one of {TARGETS}")
        return expand_like(k_x, x_t) * x_t + expand_like(k_p, x_t) * pred

    @property
    def config(self) -> dict:
        return dict(self.scheduler.config)


PATHS: Registry[Scheduler] = Registry("path")
PATHS.register("condot", "conditional OT, x_t = t x1 + (1 - (1 - sigma_min) t) x0", CondOTScheduler)
PATHS.register("vp", "variance-preserving diffusion, linear beta from beta_min to beta_max", VPScheduler)
PATHS.register("ve", "variance-exploding diffusion, sigma from sigma_max to sigma_min", VEScheduler)


@PATHS.register("linear", "linear interpolant x_t = t x1 + (1 - t) x0 (condot with sigma_min 0)")
def _linear() -> Scheduler:
    return CondOTScheduler(0.0)


PATHS.register("trig", "trigonometric interpolant x_t = sin(pi t/2) x1 + cos(pi t/2) x0", TrigScheduler)


@PATHS.register("learned", "Fourier-corrected interpolant (modes sine terms in sigma and in alpha) trained by the "
                "max-min objective (fastfm.path.interpolants): an Adam step at lr per `every` velocity steps; linear "
                "when untrained")
def _learned(modes: int = 4, lr: float = 2e-3, every: int = 1, sigma_coef: Sequence[float] | None = None,
             alpha_coef: Sequence[float] | None = None) -> Scheduler:
    return LearnedScheduler(FourierInterpolant(modes, sigma_coef, alpha_coef), lr, every)


def get_path(name: str, source: Density | None = None, **kwargs: Any) -> AffinePath:
    """The path ``name`` of ``PATHS`` with scheduler parameters ``kwargs`` and base ``source`` (N(0, I) if None);
    ValueError for an unknown name or parameter."""
    return AffinePath(PATHS.build(name, **kwargs), source)
