"""One inference interface for every way a trained field runs.

    sampler.sample(n, seed=, cond=, log_likelihood=, transport=) -> SampleResult   (prior -> data)
    sampler.log_likelihood(x, seed=, cond=) -> LikelihoodResult                   (data -> log p_1(x))

``Sampler`` is what ``python -m fastfm.sample`` / ``evaluate`` and the trainer's evaluation call.
``EagerSampler`` (here) integrates the model with ``fastfm.ode`` / ``fastfm.sde`` / ``fastfm.likelihood``;
the export layer's ``EngineSampler`` runs a compiled engine. ``InferenceSettings`` say how the field is
integrated, with ONE set of defaults (``DEFAULTS``) that eager runs and exported engines share.

``cond`` maps conditioning keywords (``y`` labels, ``low_res`` images) to per-sample tensors, sliced along
with the batch; labels not given are ``default_labels`` of the settings' class label. Every solve shows its
progress per model evaluation, with an ETA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from fastfm import seeding
from fastfm.densities import require_log_prob
from fastfm.divergence import DIVERGENCES, draw_probes, resolve_divergence
from fastfm.guidance import check_conditioning, default_labels
from fastfm.likelihood import LikelihoodResult, log_likelihood, nll_summary
from fastfm.ode import SampleResult, draw_prior, jumps, sample
from fastfm.paths import AffinePath
from fastfm.runs import LoadedRun
from fastfm.score import score_interval
from fastfm.sde import parse_diffusion, sde_sample
from fastfm.solvers import DEFAULT_SOLVER, DEFAULT_STEPS, SOLVERS, TABLEAUS, check_grid, nfe_per_step

Cond = dict[str, Tensor]
GRID_TOL = 1e-6
"""How far a user grid's ends may fall inside the solve's interval (float32 times)."""
TASKS = ("sample", "likelihood", "transport")
"""What a sampler can do: draw samples, evaluate log-likelihoods, report the transport of its ODE solve."""


@dataclass(frozen=True)
class InferenceSettings:
    """How a trained field is integrated. ``grid`` (times t_0..t_n in [0, 1]) overrides ``steps``;
    ``divergence``/``probes`` are the likelihood's (``fastfm.divergence``); ``diffusion`` (eps(t), as
    ``fastfm.sde.parse_diffusion`` reads it) switches sampling to the SDE; ``class_label`` fixes the labels
    of unlabelled samples (default: cycle through the classes)."""

    solver: str = DEFAULT_SOLVER
    steps: int = DEFAULT_STEPS
    grid: tuple[float, ...] | None = None
    divergence: str = "auto"
    probes: int = 1
    batch_size: int = 1000
    guidance: float = 1.0
    class_label: int | None = None
    diffusion: str | None = None
    _grid: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("steps", "probes", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        SOLVERS.check(self.solver)
        DIVERGENCES.entry(self.divergence)
        if self.grid is not None:
            try:
                object.__setattr__(self, "_grid", check_grid(list(self.grid)))
            except ValueError as e:
                raise ValueError(f"--grid: {e}") from None
        if self.diffusion is not None:
            object.__setattr__(self, "diffusion", str(parse_diffusion(self.diffusion)))

    @property
    def grid_tensor(self) -> Tensor | None:
        return self._grid

    @property
    def steps_run(self) -> int | str:
        """The steps that run: the grid's for a user grid, 'adaptive' for adaptive solvers."""
        if self.diffusion is not None:
            return self.steps
        if self.solver not in TABLEAUS:
            return "adaptive"
        return self.steps if self._grid is None else self._grid.numel() - 1

    def describe(self) -> dict[str, Any]:
        """What ran, for summaries: solver ('euler-maruyama' for the SDE) and steps."""
        return {"solver": "euler-maruyama" if self.diffusion else self.solver, "steps": self.steps_run}

    def divergence_label(self, dim: int) -> str:
        kind = resolve_divergence(self.divergence, dim)
        return kind if kind == "exact" else f"hutchinson x{self.probes}"


DEFAULTS = InferenceSettings()
SETTINGS = tuple(f for f in InferenceSettings.__dataclass_fields__ if not f.startswith("_"))


def settings_with(given: dict[str, Any], base: InferenceSettings = DEFAULTS) -> InferenceSettings:
    """``base`` with the options a user gave (None: not given); a grid may be text 't0,...,tn'."""
    given = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown inference settings {unknown}; valid: {SETTINGS}")
    if isinstance(given.get("grid"), str):
        try:
            given["grid"] = tuple(float(v) for v in given["grid"].split(","))
        except ValueError:
            raise ValueError(f"--grid: expected comma-separated times, got {given['grid']!r}") from None
    if given.get("diffusion") is not None and given.get("solver", "euler") != "euler":
        raise ValueError(f"the SDE sampler integrates with Euler-Maruyama: --solver {given['solver']} does not apply "
                         "(leave --solver out, or give euler)")
    return replace(base, **given)


class Sampler(Protocol):
    """The inference interface (see the module doc). ``tasks`` says which of TASKS it can do; a call
    outside them raises ValueError naming why."""

    meta: dict[str, Any]
    settings: InferenceSettings

    @property
    def tasks(self) -> frozenset[str]: ...

    def describe(self) -> dict[str, Any]: ...

    def sample(self, n: int, *, seed: int = 0, cond: Cond | None = None, log_likelihood: bool = False,
               transport: bool = False, progress: bool = True) -> SampleResult: ...

    def log_likelihood(self, x: Tensor, *, seed: int = 0, cond: Cond | None = None,
                       progress: bool = True) -> LikelihoodResult: ...


def nll_report(sampler: Sampler, x: Tensor, *, levels: int | None = None, seed: int = 0, cond: Cond | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Mean test NLL in nats (bits/dim for discrete data) with its standard error, NFE and what ran."""
    res = sampler.log_likelihood(x, seed=seed, cond=cond, progress=progress)
    dim = x[0].numel()
    return nll_summary(res.log_prob, dim, levels, nfe=res.nfe, **sampler.describe(),
                       divergence=sampler.settings.divergence_label(dim))


def with_labels(sampler: Sampler, n: int, cond: Cond | None) -> Cond:
    """``cond`` with the default labels of n samples added where the model takes labels and none are given."""
    cond = dict(cond or {})
    y = default_labels(n, sampler.meta["model"].get("num_classes"), sampler.settings.class_label)
    if y is not None and "y" not in cond:
        cond["y"] = y
    return cond


def progress_bar(n: int, total: int | None, *, enabled: bool = True, unit: str = "eval",
                 likelihood: str | None = None) -> tqdm:
    """The progress bar (stderr, with an ETA, cleared when done) of one solve over n rows: ``total`` units (None:
    unknown); 'sampling (n)', or with ``likelihood`` (the divergence's label) 'test NLL (n points, label)'."""
    desc = f"sampling ({n})" if likelihood is None else f"test NLL ({n} points, {likelihood})"
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not enabled)


class Progress(nn.Module):
    """``model`` that advances a progress bar on every call (one per model evaluation, JVPs included)."""

    def __init__(self, model: nn.Module, bar: tqdm) -> None:
        super().__init__()
        self.model, self.bar = model, bar
        self.num_classes = getattr(model, "num_classes", None)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        out = self.model(*args, **kwargs)
        self.bar.update(1)
        return out


def _slice(cond: Cond, i: int, m: int, device: torch.device) -> Cond:
    return {k: v[i:i + m].to(device) for k, v in cond.items()}


class EagerSampler:
    """The model integrated in PyTorch: fixed-step or adaptive ODE solvers, the SDE, any batch size."""

    def __init__(self, model: nn.Module, path: AffinePath, shape: tuple[int, ...], *, target: str = "velocity",
                 settings: InferenceSettings = DEFAULTS, meta: dict[str, Any] | None = None) -> None:
        self.model, self.path, self.shape, self.target, self.settings = model, path, tuple(shape), target, settings
        self.meta = meta if meta is not None else {"model": {"num_classes": getattr(model, "num_classes", None)}}
        check_conditioning(self.meta["model"].get("num_classes"), settings.guidance, settings.class_label)

    @classmethod
    def from_run(cls, run: LoadedRun, settings: InferenceSettings = DEFAULTS) -> EagerSampler:
        """The sampler of a loaded run (``fastfm.runs.load_run``): its EMA model, path, target and metadata."""
        return cls(run.model, run.path, run.shape, target=run.meta["target"], settings=settings, meta=run.meta)

    @property
    def tasks(self) -> frozenset[str]:
        """Every task, but the likelihood only where the path's prior has a log-density (not a data-set source)."""
        return frozenset(t for t in TASKS if t != "likelihood" or self.path.prior.has_log_prob)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict[str, Any]:
        return self.settings.describe()

    def calls(self, likelihood: bool = False) -> int | None:
        """Model calls of one batch's solve (None for adaptive solvers): NFE x (D exact JVPs, k probes or 1);
        the SDE makes one call per Euler-Maruyama step; both samplers add the final jump where their interval
        stops short of t = 1 (``fastfm.ode.jumps``)."""
        s = self.settings
        if s.diffusion is not None:
            return s.steps + (score_interval(self.path, self.target)[1] < 1.0)
        if s.solver not in TABLEAUS:
            return None
        dim = math.prod(self.shape)
        per_eval = 1 if not likelihood else (dim if resolve_divergence(s.divergence, dim) == "exact" else s.probes)
        return s.steps_run * nfe_per_step(s.solver) * per_eval + (not likelihood and jumps(self.path, self.target))

    def _probes(self, shape: tuple[int, ...], gen: torch.Generator) -> Tensor | None:
        s = self.settings
        return draw_probes(s.divergence, math.prod(self.shape), s.probes, shape, gen, self.device)

    def _grid(self) -> Tensor | None:
        """The user's grid, checked to span the solve's interval, from noise to data (the likelihood runs it
        backwards); times given from data to noise are reversed."""
        g = self.settings.grid_tensor
        if g is None:
            return None
        t0, t1 = self.path.time_interval(self.target)
        lo, hi = float(g.min()), float(g.max())
        if lo > t0 + GRID_TOL or hi < t1 - GRID_TOL:
            raise ValueError(f"--grid must span the solve from t = {t0:g} to t = {t1:g}, got {lo:g} .. {hi:g}: a "
                             "shorter grid stops between noise and data")
        return (g.flip(0) if bool(g[0] > g[-1]) else g).to(self.device)

    def sample(self, n: int, *, seed: int = 0, cond: Cond | None = None, log_likelihood: bool = False,
               transport: bool = False, progress: bool = True,
               generator: torch.Generator | None = None) -> SampleResult:
        """n samples from the prior pushed to t = 1 in batches; optionally their log-likelihood and
        (``transport``) per-sample kinetic energy and straightness in the same pass, or with the SDE sampler
        of ``fastfm.sde`` where the settings give a diffusion. ``generator`` (default: the eval stream of
        ``seed``) draws the prior, probes and noise: one passed through calls of a batch each draws what
        one call on all of them does."""
        s, device = self.settings, self.device
        if s.diffusion is not None and (log_likelihood or s.grid is not None or transport):
            raise ValueError("the SDE sampler takes --steps (Euler-Maruyama); no --grid, no --log-likelihood and no "
                             "transport diagnostics (they are properties of the ODE flow)")
        if log_likelihood:
            require_log_prob(self.path.prior)
        grid = None if s.diffusion is not None else self._grid()
        cond = with_labels(self, n, cond)
        gen = seeding.generator(seed, seeding.EVAL) if generator is None else generator
        calls = self.calls(log_likelihood)
        xs, logps, kinetic, straight, nfe = [], [], [], [], 0
        with progress_bar(n, None if calls is None else calls * -(-n // s.batch_size), enabled=progress) as bar:
            counted = Progress(self.model, bar)
            for i in range(0, n, s.batch_size):
                m = min(s.batch_size, n - i)
                x0 = draw_prior(self.path, m, self.shape, gen).to(device)
                probes = self._probes((m, *self.shape), gen) if log_likelihood else None
                c = _slice(cond, i, m, device)
                y = c.pop("y", None)
                with torch.no_grad():
                    if s.diffusion is not None:
                        res = sde_sample(counted, self.path, x0, diffusion=parse_diffusion(s.diffusion),
                                         steps=s.steps, target=self.target, generator=gen, y=y, guidance=s.guidance,
                                         **c)
                    else:
                        res = sample(counted, self.path, x0, solver=s.solver, steps=s.steps, grid=grid,
                                     target=self.target, y=y, guidance=s.guidance, log_likelihood=log_likelihood,
                                     probes=probes, transport=transport, **c)
                xs.append(res.x.cpu())
                if res.log_prob is not None:
                    logps.append(res.log_prob.cpu())
                if transport:
                    kinetic.append(res.kinetic.cpu())
                    straight.append(res.straightness.cpu())
                nfe = res.nfe
        cat = lambda parts: torch.cat(parts) if parts else None  # noqa: E731
        return SampleResult(torch.cat(xs), nfe, cat(logps), kinetic=cat(kinetic), straightness=cat(straight))

    def log_likelihood(self, x: Tensor, *, seed: int = 0, cond: Cond | None = None, progress: bool = True,
                       generator: torch.Generator | None = None) -> LikelihoodResult:
        """log p_1 of data points x in batches (the latents x(0) with them); a progress bar counts model
        evaluations over all batches (with an ETA). ``generator`` (default: the eval stream of ``seed``) draws
        the Hutchinson probes: one passed through calls on consecutive batches of x draws what one call does."""
        require_log_prob(self.path.prior)
        s, device = self.settings, self.device
        grid = self._grid()
        cond = with_labels(self, x.shape[0], cond)
        gen = seeding.generator(seed, seeding.EVAL) if generator is None else generator
        batches = -(-x.shape[0] // s.batch_size)
        calls = self.calls(likelihood=True)
        label = s.divergence_label(x[0].numel())
        logps, latents, nfe = [], [], 0
        with progress_bar(x.shape[0], None if calls is None else calls * batches, enabled=progress,
                          likelihood=label) as bar:
            counted = Progress(self.model, bar)
            for i in range(0, x.shape[0], s.batch_size):
                xb = x[i:i + s.batch_size].to(device)
                probes = self._probes(tuple(xb.shape), gen)
                with torch.no_grad():  # forward-mode JVPs only: no autograd graph to keep
                    res = log_likelihood(counted, self.path, xb, solver=s.solver, steps=s.steps, grid=grid,
                                         target=self.target, probes=probes, **_slice(cond, i, xb.shape[0], device))
                logps.append(res.log_prob.cpu())
                latents.append(res.x0.cpu())
                nfe = res.nfe
        return LikelihoodResult(torch.cat(logps), nfe, torch.cat(latents))
