"""Training objectives: what the model regresses on one micro-batch, by name from ``OBJECTIVES``
(``--objective NAME --objective-args K=V``). Times run from the source (t = 0) to the data (t = 1).

    cfm       |v(x_t, t) - v_t|^2 (Lipman et al. 2022; the fused path and loss kernels), squared or pseudo-Huber
    meanflow  the average velocity u(x_s, s, h) of a model of two times (h = t - s) regressed onto the stop-gradient
              MeanFlow target  v + h (v . grad_x u + d_s u - d_h u)   (Geng et al. 2025; one forward JVP,
              tangent (v, 1, -1) on (x, s, h)), with the adaptive weight 1 / (|delta|^2 + eps)^power
    shortcut  s(x_t, t, 0) onto v, and on a share of each micro-batch s(x_t, t, 2d) onto
              sg([s(x_t, t, d) + s(x_t + d s(x_t, t, d), t + d, d)] / 2)   (Frans et al. 2024)

v is the path's conditional velocity (c x0 + d x1 from the fused path op, with in-kernel noise where the trainer
draws none): its conditional expectation is the marginal velocity, so each regression is unbiased as in CFM (the
identity in this direction: ../DESIGN.md, "Flow maps"). Every objective draws its own times (``draw``, on the
host generator, before the compiled step) and returns per-sample fp32 losses (``per_sample``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from fastfm.kernels import ops
from fastfm.models.blocks import forward_mode_attention
from fastfm.path.affine import AffinePath, expand_like
from fastfm.registry import Registry
from fastfm.training.losses import LOSSES, cfm_loss, noise_std, robust
from fastfm.training.timesteps import TimeSampler


def path_point(path: AffinePath, x0: Tensor | None, x1: Tensor, t: Tensor, rng: Tensor | None) -> tuple[Tensor, Tensor]:
    """(x_t, v_t): the path's point and conditional velocity at t (B,), from the fused path op."""
    coef = path.coefficients(t, "velocity")
    x_t, v = ops.affine_path(x1, coef.a, coef.b, coef.c, coef.d, x0, rng, noise_std(path, x0),
                             write_target=True)
    assert v is not None
    return x_t, v


def sum_squares(err: Tensor) -> Tensor:
    """|err|^2 per sample (B,), in fp32."""
    return err.float().pow(2).flatten(1).sum(1)


class Objective:
    """One objective (see the module doc): ``flow_map`` if its model takes two times, ``forward_mode`` if its loss
    takes a forward-mode JVP of the model (which then stays contiguous: no channels_last); ``draw`` the times of n
    rows (micro-batches of ``chunk`` rows); ``per_sample`` losses (B,) of one micro-batch."""

    flow_map: ClassVar[bool] = False
    forward_mode: ClassVar[bool] = False

    def draw(self, n: int, times: TimeSampler, generator: torch.Generator, chunk: int) -> tuple[Tensor, Tensor | None]:
        """(t, h): times (n,) fp32 and, for a model of two times, steps h (n,) fp32."""
        return times(n, generator), None

    def per_sample(self, model: nn.Module, path: AffinePath, x0: Tensor | None, x1: Tensor, t: Tensor,
                   h: Tensor | None, rng: Tensor | None, target: str, loss: str, cond: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def check(self, *, loss: str, class_cond: bool) -> None:
        """ValueError where the rest of the config contradicts this objective."""


OBJECTIVES: Registry[Objective] = Registry("objective")


@OBJECTIVES.register("cfm", "conditional flow matching: the model v(x_t, t) regressed onto the path's target")
class FlowMatching(Objective):
    def per_sample(self, model: nn.Module, path: AffinePath, x0: Tensor | None, x1: Tensor, t: Tensor,
                   h: Tensor | None, rng: Tensor | None, target: str, loss: str, cond: dict[str, Tensor]) -> Tensor:
        per = cfm_loss(model, path, x0, x1, t, target, rng=rng, **cond).per_sample
        dim = x1[0].numel()
        return per if loss == "squared" else robust(per * dim, dim)


@OBJECTIVES.register("meanflow", "MeanFlow: a flow map u(x, s, t) from one JVP of the model (equal: share of rows "
                     "with s = t; power, eps: the adaptive weight; guidance, kappa: CFG folded into training)")
class MeanFlow(Objective):
    """u_theta(x_s, s, h) onto sg(u_tgt), u_tgt = v~ + h (v~ . grad_x u + d_s u - d_h u), weighted by
    sg(1 / (|u - u_tgt|^2 + eps)^power). (s, t) are two draws of the time sampler, ordered, with t = s on a share
    ``equal`` of the rows (there u_tgt = v~: flow matching). With classes, v~ = guidance v + kappa u(x, s, 0 | y)
    + (1 - guidance - kappa) u(x, s, 0 | null) on rows with a label (v on null rows): one call then samples the
    guided flow (the paper's CFG; guidance = 1, kappa = 0: none)."""

    flow_map = True
    forward_mode = True

    def __init__(self, equal: float = 0.75, power: float = 1.0, eps: float = 1e-3, guidance: float = 1.0,
                 kappa: float = 0.0) -> None:
        self.equal = number("meanflow", "equal", equal, lambda v: 0 <= v <= 1, "a share in [0, 1]")
        self.power = number("meanflow", "power", power, lambda v: v >= 0, "a number >= 0")
        self.eps = number("meanflow", "eps", eps, lambda v: v > 0, "a number > 0")
        self.guidance = number("meanflow", "guidance", guidance, lambda v: True, "a number")
        self.kappa = number("meanflow", "kappa", kappa, lambda v: True, "a number")

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0 or self.kappa != 0.0

    def check(self, *, loss: str, class_cond: bool) -> None:
        if loss != "squared":
            raise ValueError("the meanflow objective weights its loss adaptively (--objective-args power=...): "
                             "--loss must be squared")
        if self.guided and not class_cond:
            raise ValueError("meanflow guidance folds classifier-free guidance into training: it needs --class-cond")

    def draw(self, n: int, times: TimeSampler, generator: torch.Generator, chunk: int) -> tuple[Tensor, Tensor | None]:
        a, b = times(n, generator), times(n, generator)
        same = torch.rand(n, generator=generator) < self.equal
        s, t = torch.minimum(a, b), torch.maximum(a, b)
        return s, torch.where(same, torch.zeros_like(s), t - s)

    def velocity(self, model: nn.Module, x: Tensor, s: Tensor, v: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """v~ (see the class doc): the guided conditional velocity, from one batched call at h = 0 without grad."""
        if not self.guided:
            return v
        y = cond["y"]
        null = torch.full_like(y, model.num_classes)
        other = {k: torch.cat([c, c]) for k, c in cond.items() if k != "y"}
        with torch.no_grad():
            u_c, u_u = model(torch.cat([x, x]), torch.cat([s, s]), y=torch.cat([y, null]),
                             h=torch.zeros_like(torch.cat([s, s])), **other).chunk(2)
        guided = self.guidance * v + self.kappa * u_c.to(v.dtype) + (1 - self.guidance - self.kappa) * u_u.to(v.dtype)
        return torch.where(expand_like(y == null, v), v, guided)

    def per_sample(self, model: nn.Module, path: AffinePath, x0: Tensor | None, x1: Tensor, t: Tensor,
                   h: Tensor | None, rng: Tensor | None, target: str, loss: str, cond: dict[str, Tensor]) -> Tensor:
        assert h is not None
        x, v = path_point(path, x0, x1, t, rng)
        v = self.velocity(model, x, t, v, cond)

        def u_of(x: Tensor, s: Tensor, step: Tensor) -> Tensor:
            return model(x, s, h=step, **cond)

        ones = torch.ones_like(t)
        with forward_mode_attention():  # matmul + softmax attention: the fused kernels have no forward-mode rule
            u, du = torch.func.jvp(u_of, (x, t, h), (v.to(x.dtype), ones, -ones))
        u_tgt = (v.float() + expand_like(h, v) * du.float()).detach()
        err = sum_squares(u.float() - u_tgt)
        weight = (err.detach() + self.eps).pow(-self.power)
        return weight * err


@OBJECTIVES.register("shortcut", "shortcut model s(x, t, d): flow matching at d = 0 and self-consistency "
                     "s(x, t, 2d) = [s(x, t, d) + s(x', t + d, d)] / 2 on a share of each micro-batch (max_steps: "
                     "the smallest step 1 / max_steps, a power of 2)")
class Shortcut(Objective):
    """Rows of each micro-batch: the first are flow matching (h = 0, t from the time sampler), the last
    round(share m) self-consistency rows with 2d = 2^-k, k uniform in {0, ..., log2 max_steps}, and t uniform on
    the grid {0, d, 2d, ...} with t + 2d <= 1. Their target is two steps of size d (conditioned on d, or on 0 where
    d < 1 / max_steps: the flow-matching velocity), without grad."""

    flow_map = True

    def __init__(self, share: float = 0.25, max_steps: int = 128) -> None:
        self.share = number("shortcut", "share", share, lambda v: 0 < v < 1, "a share in (0, 1)")
        self.max_steps = int(number("shortcut", "max_steps", max_steps,
                                    lambda v: isinstance(v, int) and v >= 1 and v & (v - 1) == 0, "a power of 2"))

    def consistency_rows(self, m: int) -> int:
        """How many of m rows are self-consistency rows (the last ones)."""
        return min(m - 1, round(self.share * m)) if m > 1 else 0

    def draw(self, n: int, times: TimeSampler, generator: torch.Generator, chunk: int) -> tuple[Tensor, Tensor | None]:
        t, h = times(n, generator), torch.zeros(n)
        k = torch.randint(0, int(math.log2(self.max_steps)) + 1, (n,), generator=generator)
        two_d = torch.pow(2.0, -k.float())
        d = two_d / 2
        slots = torch.floor(torch.rand(n, generator=generator) * (1 / d - 1))  # t = i d, i + 2 <= 1 / d
        sc = torch.zeros(n, dtype=torch.bool).view(-1, chunk)
        sc[:, chunk - self.consistency_rows(chunk):] = True
        sc = sc.flatten()
        return torch.where(sc, slots * d, t), torch.where(sc, two_d, h)

    def per_sample(self, model: nn.Module, path: AffinePath, x0: Tensor | None, x1: Tensor, t: Tensor,
                   h: Tensor | None, rng: Tensor | None, target: str, loss: str, cond: dict[str, Tensor]) -> Tensor:
        assert h is not None
        x, v = path_point(path, x0, x1, t, rng)
        pred = model(x, t, h=h, **cond)
        n_fm = x.shape[0] - self.consistency_rows(x.shape[0])
        with torch.no_grad():
            xs, ts, d = x[n_fm:], t[n_fm:], h[n_fm:] / 2
            sub = {k: c[n_fm:] for k, c in cond.items()}
            dc = torch.where(d < 1 / self.max_steps, torch.zeros_like(d), d)
            s1 = model(xs, ts, h=dc, **sub).to(v.dtype)
            s2 = model(xs + expand_like(d, xs).to(xs.dtype) * s1.to(xs.dtype), ts + d, h=dc, **sub).to(v.dtype)
        target_v = torch.cat([v[:n_fm], (s1 + s2) / 2])
        per = sum_squares(pred.float() - target_v.float())
        dim = x1[0].numel()
        return per / dim if loss == "squared" else robust(per, dim)


def number(objective: str, name: str, value: Any, ok: Callable[[float], bool], what: str) -> float:
    """``value`` as a finite number (not a bool) for which ``ok`` holds; ValueError naming the argument otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{objective} objective: bad {name}={value!r}: expected {what}")
    return value


def get_objective(name: str, **params: Any) -> Objective:
    """The objective ``name`` of ``OBJECTIVES`` with ``params``; ValueError for an unknown name or parameter."""
    return OBJECTIVES.build(name, **params)


__all__ = ["LOSSES", "OBJECTIVES", "Objective", "get_objective", "path_point"]
