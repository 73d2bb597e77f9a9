"""The solve: inference settings resolved against a run into one ``SolvePlan``, which runs from explicit inputs.

    plan = plan_solve(settings, meta, path, task="sample", log_likelihood=False, transport=False)
    plan.run(model, path, x, probes=, noise=, y=, low_res=)   -> SampleResult | LikelihoodResult

A plan kind is a registered subclass (``PLAN_KINDS``); of the kinds whose ``applies(task, settings, meta)`` holds,
the one registered last (the most specific: ``sde`` after ``ode``, ``flowmap`` after both) resolves the request.
Each kind knows its own rules (``resolve``: one ValueError for any contradiction), its interval and final
jump, its NFE, its signature (``inputs`` / ``outputs``: what an engine takes and returns, in graph order), its
random draws (``draw``) and its one pure, traceable ``run``:

    ode         x0 [, y] [, low_res] [, probes]  -> x = x(1) [, log_prob]       ODE, prior -> data
    sde         x0 [, y] [, low_res], noise      -> x = x(1)                     Euler-Maruyama (``fastfm.solve.sde``)
    likelihood  x1 [, y] [, low_res] [, probes]  -> x = x(0), log_prob [, bits_per_dim]   data -> prior
    flowmap     x0 [, y] [, low_res]             -> x = x(1)                     a flow map's steps (``solve.flowmap``)

``y`` is an input of class-conditional models unless a class label is baked into the plan; ``probes`` (k, B, ...)
of Hutchinson divergences; ``noise`` (steps, B, ...) standard normal, one draw per step and element. The
eager sampler draws these inputs (``draw``) and calls ``run``; an exported engine traces ``run``; the parity
check calls ``run`` on the fp32 model. NFE (field evaluations of one batch) and model calls (JVPs of the
divergence counted) are the plan's, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastfm.path.densities import Gaussian, require_log_prob
from fastfm.solve.divergence import HUTCHINSON, estimator
from fastfm.solve.guidance import check_conditioning
from fastfm.solve.likelihood import LikelihoodResult, bits_per_dim, integrate_log_likelihood
from fastfm.solve.ode import SampleResult, draw_prior, ode_sample
from fastfm.path.affine import AffinePath
from fastfm.registry import Registry
from fastfm.run.meta import RunMeta
from fastfm.solve.score import score_interval
from fastfm.solve.sde import parse_diffusion, sde_sample
from fastfm.solve.flowmap import flow_map_sample
from fastfm.solve.solvers import DEFAULT_SOLVER, FLOW_MAP, solver_of, time_grid

from .settings import InferenceSettings
from .signature import TensorSlot

TASKS = ("sample", "likelihood")
"""What a plan computes: samples (prior -> data) or log-likelihoods (data -> prior)."""
GRID_TOL = 1e-6
"""How far a user grid's ends may fall inside the solve's interval (float32 times)."""


PLAN_KINDS: Registry[type["SolvePlan"]] = Registry("solve kind")
"""The kinds of solve; ``plan_solve`` takes the last registered one that applies."""


@dataclass(frozen=True)
class SolvePlan:
    """One solve, resolved (see the module doc). ``start`` -> ``end`` is the interval in the solve's direction
    (a user ``grid`` runs it the same way); ``steps`` are the steps that run; ``divergence`` is 'exact',
    'hutchinson' or 'none' with ``probes`` k (0 unless Hutchinson); ``denoise``: a final jump to E[x1 | x_t]
    (the interval stops short of t = 1); ``levels``: bits/dim output (likelihoods of discrete images)."""

    kind: ClassVar[str]
    task: ClassVar[str]

    def __init_subclass__(cls, *, kind: str, task: str, help: str, **kwargs: Any) -> None:
        """A plan kind names itself, its task and its help, and is registered in ``PLAN_KINDS`` (a subclass adds no
        fields: it is a dataclass through this one): ``class OdeSample(SolvePlan, kind="ode", task="sample",
        help="...")``."""
        super().__init_subclass__(**kwargs)
        if task not in TASKS:
            raise ValueError(f"plan kind {kind!r}: unknown task {task!r}; choose one of {TASKS}")
        cls.kind, cls.task = kind, task
        PLAN_KINDS.register(kind, help, cls)

    target: str
    shape: tuple[int, ...]
    solver: str
    steps: int
    start: float
    end: float
    grid: tuple[float, ...] | None = None
    guidance: float = 1.0
    class_label: int | None = None
    num_classes: int | None = None
    low_res: tuple[int, ...] | None = None
    divergence: str = "none"
    probes: int = 0
    diffusion: str | None = None
    denoise: bool = False
    log_likelihood: bool = False
    transport: bool = False
    levels: int | None = None

    # -- resolution -------------------------------------------------------------------------------------------
    @classmethod
    def applies(cls, task: str, settings: InferenceSettings, meta: RunMeta) -> bool:
        """Whether this kind solves ``task`` with ``settings`` for the run of ``meta`` (by default: every request
        of its task)."""
        return task == cls.task

    @classmethod
    def resolve(cls, settings: InferenceSettings, meta: RunMeta, path: AffinePath, *, log_likelihood: bool = False,
                transport: bool = False) -> SolvePlan:
        """The plan of ``settings`` for the run of ``meta`` (ValueError naming any contradiction)."""
        raise NotImplementedError

    @classmethod
    def _base(cls, settings: InferenceSettings, meta: RunMeta, start: float, end: float, **fields: Any) -> SolvePlan:
        """Checks every kind shares (labels and guidance against the model; the flow map's steps only for a model
        of two times; a user grid spans start..end, run in the solve's direction) and the fields every kind takes
        from the run; steps not given are the solver's default."""
        check_conditioning(meta.num_classes, settings.guidance, settings.class_label)
        fields.setdefault("solver", settings.solver or DEFAULT_SOLVER)
        if solver_of(fields["solver"]).flow_map and not meta.flow_map:
            raise ValueError(f"--solver {FLOW_MAP} steps a flow map, a model of two times (train one with --objective "
                             "meanflow or shortcut); this model has one time: sample it with an ODE solver "
                             "(euler, midpoint, rk4, ...)")
        grid = None
        if settings.grid is not None:
            g = torch.tensor(settings.grid, dtype=torch.float32)
            lo, hi = min(start, end), max(start, end)
            if float(g.min()) > lo + GRID_TOL or float(g.max()) < hi - GRID_TOL:
                raise ValueError(f"--grid must span the solve from t = {lo:g} to t = {hi:g}, got "
                                 f"{float(g.min()):g} .. {float(g.max()):g}: a shorter grid stops between noise and "
                                 "data")
            grid = tuple(float(t) for t in (g if bool(g[0] < g[-1]) == (start < end) else g.flip(0)))
        steps = settings.steps or solver_of(fields["solver"]).steps
        return cls(target=meta.target, shape=meta.shape, steps=steps if grid is None else len(grid) - 1,
                   start=start, end=end, grid=grid, guidance=settings.guidance, class_label=settings.class_label,
                   num_classes=meta.num_classes, low_res=meta.low_res_shape, **fields)

    def _with_divergence(self, settings: InferenceSettings, dim: int) -> SolvePlan:
        est = estimator(settings.divergence, dim)
        return replace(self, divergence=est.name, probes=settings.probes if est.takes_probes else 0)

    # -- what it costs ----------------------------------------------------------------------------------------
    @property
    def fixed(self) -> bool:
        return solver_of(self.solver).fixed

    @property
    def nfe(self) -> int | None:
        """Field evaluations of one batch's solve (None: adaptive), the final jump included."""
        if not self.fixed:
            return None
        return self.steps * solver_of(self.solver).stages + self.denoise

    @property
    def calls(self) -> int | None:
        """Model calls of one batch's solve (None: adaptive): each field evaluation of a divergence makes D exact
        JVPs or k probe JVPs; the jump is one call."""
        if self.nfe is None:
            return None
        dim = math.prod(self.shape)
        per_eval = 1 if self.divergence == "none" else estimator(self.divergence, dim).jvps(dim, self.probes)
        return (self.nfe - self.denoise) * per_eval + self.denoise

    def describe(self) -> dict[str, Any]:
        """What runs, for summaries: solver and steps ('adaptive' for adaptive solvers)."""
        return {"solver": self.solver, "steps": self.steps if self.fixed else "adaptive"}

    @property
    def divergence_label(self) -> str:
        """'exact', 'hutchinson xk' or 'none'."""
        return f"hutchinson x{self.probes}" if self.divergence == "hutchinson" else self.divergence

    def times(self, device: torch.device | str | None = None) -> Tensor:
        """The fixed fp32 time grid from start to end, on ``device`` (adaptive solvers report its ends)."""
        if self.grid is not None:
            return torch.tensor(self.grid, dtype=torch.float32, device=device)
        return time_grid(self.steps if self.fixed else 1, self.start, self.end, device=device)

    # -- signature and inputs ---------------------------------------------------------------------------------
    @property
    def x_name(self) -> str:
        return "x0" if self.task == "sample" else "x1"

    def inputs(self, batch: int) -> list[TensorSlot]:
        """The inputs of one call on ``batch`` rows, in graph order (see the module doc)."""
        slots = [TensorSlot(self.x_name, (batch, *self.shape), "float32")]
        if self.num_classes is not None and self.class_label is None:
            slots.append(TensorSlot("y", (batch,), "int64"))
        if self.low_res is not None:
            slots.append(TensorSlot("low_res", (batch, *self.low_res), "float32"))
        if self.divergence == "hutchinson":
            slots.append(TensorSlot("probes", (self.probes, batch, *self.shape), "float32"))
        if self.diffusion is not None:
            slots.append(TensorSlot("noise", (self.steps, batch, *self.shape), "float32"))
        return slots

    def outputs(self, batch: int) -> list[TensorSlot]:
        raise NotImplementedError

    def draw(self, path: AffinePath, n: int, generator: torch.Generator, device: torch.device | str,
             x: Tensor | None = None) -> dict[str, Tensor]:
        """The random inputs of n rows, drawn from ``generator`` in this order: x0 from the prior (sampling;
        likelihoods take ``x``), probes, noise; each drawn where the generator lives, then moved to ``device``."""
        out = {self.x_name: draw_prior(path, n, self.shape, generator).to(device) if x is None else x.to(device)}
        if self.divergence == "hutchinson":
            out["probes"] = HUTCHINSON.draw(self.probes, (n, *self.shape), generator, device)
        if self.diffusion is not None:
            out["noise"] = torch.randn((self.steps, n, *self.shape), generator=generator,
                                       device=generator.device).to(device)
        return out

    # -- the solve --------------------------------------------------------------------------------------------
    def labels(self, x: Tensor, y: Tensor | None) -> Tensor | None:
        """``y``, or the baked class label for every row (made on x's device)."""
        if y is None and self.class_label is not None:
            return torch.full((x.shape[0],), self.class_label, dtype=torch.int64, device=x.device)
        return y

    def user_grid(self, x: Tensor) -> Tensor | None:
        """The user grid on x's device (None: the uniform grid of ``steps``)."""
        return None if self.grid is None else self.times(x.device)

    def run(self, model: nn.Module, path: AffinePath, x: Tensor, *, probes: Tensor | None = None,
            noise: Tensor | None = None, y: Tensor | None = None,
            low_res: Tensor | None = None) -> SampleResult | LikelihoodResult:
        """The solve from explicit inputs: no random draws, no host syncs with a fixed-step solver."""
        raise NotImplementedError

    def output_values(self, res: SampleResult | LikelihoodResult, x: Tensor) -> tuple[Tensor, ...]:
        """The tensors of ``outputs`` from ``run``'s result on input x, in order."""
        raise NotImplementedError


def _cond(low_res: Tensor | None) -> dict[str, Tensor]:
    return {} if low_res is None else {"low_res": low_res}


class OdeSample(SolvePlan, kind="ode", task="sample",
                help="sampling with the ODE dx/dt = v(x, t), optionally with log p and transport alongside"):
    @classmethod
    def resolve(cls, settings: InferenceSettings, meta: RunMeta, path: AffinePath, *, log_likelihood: bool = False,
                transport: bool = False) -> SolvePlan:
        """Over ``path.time_interval``, the jump where it stops short of t = 1; log p needs a prior density."""
        if log_likelihood:
            require_log_prob(path.prior)
        start, end = path.time_interval(meta.target)
        plan = cls._base(settings, meta, start, end, denoise=end < 1.0, log_likelihood=log_likelihood,
                         transport=transport)
        return plan._with_divergence(settings, meta.data.dim) if log_likelihood else plan

    def outputs(self, batch: int) -> list[TensorSlot]:
        x = [TensorSlot("x", (batch, *self.shape), "float32")]
        return x + [TensorSlot("log_prob", (batch,), "float32")] if self.log_likelihood else x

    def run(self, model: nn.Module, path: AffinePath, x: Tensor, *, probes: Tensor | None = None,
            noise: Tensor | None = None, y: Tensor | None = None, low_res: Tensor | None = None) -> SampleResult:
        return ode_sample(model, path, x, solver=self.solver, steps=self.steps, grid=self.user_grid(x),
                          target=self.target, y=self.labels(x, y), guidance=self.guidance,
                          log_likelihood=self.log_likelihood, probes=probes, transport=self.transport,
                          denoise=self.denoise, **_cond(low_res))

    def output_values(self, res: SampleResult | LikelihoodResult, x: Tensor) -> tuple[Tensor, ...]:
        return (res.x, res.log_prob) if self.log_likelihood else (res.x,)


class Likelihood(SolvePlan, kind="likelihood", task="likelihood",
                 help="log p_1(x) by the instantaneous change of variables, data -> prior"):
    @classmethod
    def resolve(cls, settings: InferenceSettings, meta: RunMeta, path: AffinePath, *, log_likelihood: bool = False,
                transport: bool = False) -> SolvePlan:
        """Over ``path.time_interval`` backwards, of the conditional model (labels are inputs): no guidance, baked
        class label, diffusion or transport; a prior with a log-density; a model of one time."""
        if meta.flow_map:
            raise ValueError("a flow map has no likelihood: its density needs the ODE of the instantaneous velocity, "
                             "which the map only approximates at zero step; evaluate its samples (sample quality), "
                             "or the likelihood of a velocity model (the teacher, a reflowed model)")
        for given, what in ((settings.guidance != 1.0, f"guidance {settings.guidance:g}"),
                            (settings.class_label is not None, f"class label {settings.class_label}"),
                            (settings.diffusion is not None, f"an SDE diffusion {settings.diffusion}"),
                            (transport, "transport diagnostics")):
            if given:
                raise ValueError(f"{what} applies to sampling; a likelihood evaluates the conditional model of given "
                                 "data (labels y are an input)")
        require_log_prob(path.prior)
        t0, t1 = path.time_interval(meta.target)
        levels = meta.data.levels if meta.data.kind == "image" else None
        plan = cls._base(settings, meta, t1, t0, log_likelihood=True, levels=levels or None)
        return plan._with_divergence(settings, meta.data.dim)

    def outputs(self, batch: int) -> list[TensorSlot]:
        slots = [TensorSlot("x", (batch, *self.shape), "float32"), TensorSlot("log_prob", (batch,), "float32")]
        return slots + [TensorSlot("bits_per_dim", (batch,), "float32")] if self.levels else slots

    def run(self, model: nn.Module, path: AffinePath, x: Tensor, *, probes: Tensor | None = None,
            noise: Tensor | None = None, y: Tensor | None = None, low_res: Tensor | None = None) -> LikelihoodResult:
        return integrate_log_likelihood(model, path, x, solver=self.solver, steps=self.steps, grid=self.user_grid(x),
                                        target=self.target, probes=probes, y=y, **_cond(low_res))

    def output_values(self, res: SampleResult | LikelihoodResult, x: Tensor) -> tuple[Tensor, ...]:
        out = (res.x0, res.log_prob)
        return out + (bits_per_dim(res.log_prob, x[0].numel(), self.levels),) if self.levels else out


class SdeSample(SolvePlan, kind="sde", task="sample",
                help="sampling with the SDE dX = [v + eps/2 score] dt + sqrt(eps) dW (a diffusion is set)"):
    @classmethod
    def applies(cls, task: str, settings: InferenceSettings, meta: RunMeta) -> bool:
        return task == "sample" and settings.diffusion is not None

    @classmethod
    def resolve(cls, settings: InferenceSettings, meta: RunMeta, path: AffinePath, *, log_likelihood: bool = False,
                transport: bool = False) -> SolvePlan:
        """Euler-Maruyama over ``score_interval`` with a Gaussian base; no grid, likelihood or transport."""
        if settings.solver not in (None, "euler"):
            raise ValueError(f"the SDE sampler integrates with Euler-Maruyama: --solver {settings.solver} does not "
                             "apply (leave --solver out, or give euler)")
        if settings.grid is not None or log_likelihood or transport:
            raise ValueError("the SDE sampler takes --steps (Euler-Maruyama); no --grid, no --log-likelihood and no "
                             "transport diagnostics (they are properties of the ODE flow)")
        if not isinstance(path.source, Gaussian):
            raise ValueError(f"the SDE needs the score, which needs a Gaussian base; this run's source is the data "
                             f"set {meta.source!r}")
        start, end = score_interval(path, meta.target)
        return cls._base(settings, meta, start, end, solver="euler", diffusion=str(parse_diffusion(settings.diffusion)),
                         denoise=end < 1.0)

    def describe(self) -> dict[str, Any]:
        return {"solver": "euler-maruyama", "steps": self.steps}

    def outputs(self, batch: int) -> list[TensorSlot]:
        return [TensorSlot("x", (batch, *self.shape), "float32")]

    def run(self, model: nn.Module, path: AffinePath, x: Tensor, *, probes: Tensor | None = None,
            noise: Tensor | None = None, y: Tensor | None = None, low_res: Tensor | None = None) -> SampleResult:
        return sde_sample(model, path, x, diffusion=parse_diffusion(self.diffusion), steps=self.steps,
                          target=self.target, noise=noise, denoise=self.denoise, y=self.labels(x, y),
                          guidance=self.guidance, **_cond(low_res))

    def output_values(self, res: SampleResult | LikelihoodResult, x: Tensor) -> tuple[Tensor, ...]:
        return (res.x,)


class FlowMapSample(SolvePlan, kind="flowmap", task="sample",
                    help="sampling with a flow map's steps x_t = x_s + (t - s) u(x_s, s, t) (a model of two times)"):
    @classmethod
    def applies(cls, task: str, settings: InferenceSettings, meta: RunMeta) -> bool:
        return task == "sample" and meta.flow_map

    @classmethod
    def resolve(cls, settings: InferenceSettings, meta: RunMeta, path: AffinePath, *, log_likelihood: bool = False,
                transport: bool = False) -> SolvePlan:
        """The map's steps over t = 0 -> 1 (its average velocity spans the whole interval: no final jump), a uniform
        grid of --steps or a user grid; no ODE solver, SDE, likelihood or transport."""
        if settings.solver not in (None, FLOW_MAP):
            raise ValueError(f"a flow-map model samples with its map (--solver {FLOW_MAP}, one call per step; "
                             f"--steps 1, 2, 4, ...): --solver {settings.solver} integrates an ODE, which a model of "
                             "two times does not define")
        for given, what in ((settings.diffusion is not None, "an SDE diffusion"),
                            (log_likelihood, "a log-likelihood"), (transport, "transport diagnostics")):
            if given:
                raise ValueError(f"{what} needs the ODE of the instantaneous velocity; a flow map's samples come "
                                 "from its steps alone (sample without it, or use a velocity model)")
        return cls._base(settings, meta, 0.0, 1.0, solver=FLOW_MAP)

    def outputs(self, batch: int) -> list[TensorSlot]:
        return [TensorSlot("x", (batch, *self.shape), "float32")]

    def run(self, model: nn.Module, path: AffinePath, x: Tensor, *, probes: Tensor | None = None,
            noise: Tensor | None = None, y: Tensor | None = None, low_res: Tensor | None = None) -> SampleResult:
        return flow_map_sample(model, x, self.times(x.device), y=self.labels(x, y), guidance=self.guidance,
                               **_cond(low_res))

    def output_values(self, res: SampleResult | LikelihoodResult, x: Tensor) -> tuple[Tensor, ...]:
        return (res.x,)


def plan_solve(settings: InferenceSettings, meta: RunMeta, path: AffinePath, task: str = "sample", *,
               log_likelihood: bool = False, transport: bool = False) -> SolvePlan:
    """The plan of the last registered kind of ``PLAN_KINDS`` that solves ``task`` with ``settings`` (ValueError
    naming any contradiction of the settings, the task and the run)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if task == "likelihood" and log_likelihood:
        raise ValueError("log_likelihood is a sampling option; the likelihood task always returns log p")
    kinds = [PLAN_KINDS.entry(k).factory for k in PLAN_KINDS]
    kind = [k for k in kinds if k.applies(task, settings, meta)][-1]
    return kind.resolve(settings, meta, path, log_likelihood=log_likelihood, transport=transport)

