"""One inference interface for every way a trained field runs.

    sampler.sample(n, seed=, cond=, log_likelihood=, transport=) -> SampleResult   (prior -> data)
    sampler.log_likelihood(x, seed=, cond=) -> LikelihoodResult                   (data -> log p_1(x))

``Sampler`` is what ``python -m fastfm.sample`` / ``evaluate`` and the trainer's evaluation call.
``EagerSampler`` (here) resolves its ``InferenceSettings`` into a ``SolvePlan`` per task (``fastfm.solve.plan``),
draws the plan's seeded inputs, batches them and calls ``plan.run`` on the model; the export layer's
``EngineSampler`` runs a compiled engine of one plan.

``cond`` maps conditioning keywords (``y`` labels, ``low_res`` images) to per-sample tensors, sliced along
with the batch; labels not given cycle through the classes (or are the plan's baked class label). Every solve
shows its progress per model evaluation, with an ETA.
"""

from __future__ import annotations

import itertools
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from fastfm import seeding
from fastfm.solve.guidance import default_labels
from fastfm.solve.likelihood import LikelihoodResult, nll_summary
from fastfm.solve.ode import SampleResult
from fastfm.path.affine import AffinePath
from fastfm.run.load import LoadedRun
from fastfm.run.meta import Cond, RunMeta, rows

from .plan import SolvePlan, plan_solve
from .settings import DEFAULTS, InferenceSettings

CAPABILITIES = ("sample", "likelihood", "transport")
"""What a sampler can do: draw samples, evaluate log-likelihoods, report the transport of its ODE solve."""


class Sampler(Protocol):
    """The inference interface (see the module doc). ``capabilities`` says which of CAPABILITIES it has; a call
    outside them raises ValueError naming why."""

    meta: RunMeta
    path: AffinePath

    @property
    def capabilities(self) -> frozenset[str]: ...

    def plan(self, task: str = "sample", *, log_likelihood: bool = False, transport: bool = False) -> SolvePlan: ...

    def describe(self, task: str = "sample") -> dict[str, Any]: ...

    def sample(self, n: int, *, seed: int = 0, cond: Cond | None = None, log_likelihood: bool = False,
               transport: bool = False, progress: bool = True) -> SampleResult: ...

    def log_likelihood(self, x: Tensor, *, seed: int = 0, cond: Cond | None = None,
                       progress: bool = True) -> LikelihoodResult: ...


def nll_report(sampler: Sampler, x: Tensor, *, levels: int | None = None, seed: int = 0, cond: Cond | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Mean test NLL in nats (bits/dim for discrete data) with its standard error, NFE and what ran."""
    res = sampler.log_likelihood(x, seed=seed, cond=cond, progress=progress)
    return nll_summary(res.log_prob, x[0].numel(), levels, nfe=res.nfe, **sampler.describe("likelihood"),
                       divergence=sampler.plan("likelihood").divergence_label)


def with_labels(meta: RunMeta, plan: SolvePlan, n: int, cond: Cond | None) -> Cond:
    """``cond`` checked against the run, with labels cycling through the classes for n samples where the model
    takes labels, none are given and the plan bakes no class label."""
    cond = dict(cond or {})
    meta.check_conditioning(cond)
    if "y" not in cond and plan.class_label is None:
        y = default_labels(n, meta.num_classes, None)
        if y is not None:
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


class EagerSampler:
    """The model integrated in PyTorch: fixed-step or adaptive ODE solvers, the SDE, any batch size."""

    def __init__(self, model: nn.Module, path: AffinePath, meta: RunMeta,
                 settings: InferenceSettings = DEFAULTS) -> None:
        self.model, self.path, self.meta, self.settings = model, path, meta, settings
        self._plans: dict[tuple[str, bool, bool], SolvePlan] = {}
        self.plan("sample")  # the settings checked against the run before anything runs

    @classmethod
    def from_run(cls, run: LoadedRun, settings: InferenceSettings = DEFAULTS) -> EagerSampler:
        """The sampler of a loaded run (``fastfm.run.load.load_run``): its EMA model, path and metadata."""
        return cls(run.model, run.path, run.meta, settings)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.meta.shape

    def plan(self, task: str = "sample", *, log_likelihood: bool = False, transport: bool = False) -> SolvePlan:
        """The settings resolved for ``task`` (``fastfm.solve.plan.plan_solve``), once per request."""
        key = (task, log_likelihood, transport)
        if key not in self._plans:
            self._plans[key] = plan_solve(self.settings, self.meta, self.path, task, log_likelihood=log_likelihood,
                                          transport=transport)
        return self._plans[key]

    @property
    def capabilities(self) -> frozenset[str]:
        """Every task, but the likelihood only where the path's prior has a log-density (not a data-set source); a
        flow map only samples (``FlowMapSample``)."""
        if self.meta.flow_map:
            return frozenset({"sample"})
        return frozenset(t for t in CAPABILITIES if t != "likelihood" or self.path.prior.has_log_prob)

    @property
    def device(self) -> torch.device:
        """Where the model's tensors are (the CPU for a closed-form field without any)."""
        first = next(itertools.chain(self.model.parameters(), self.model.buffers()), None)
        return torch.device("cpu") if first is None else first.device

    def describe(self, task: str = "sample") -> dict[str, Any]:
        return self.plan(task).describe()

    def _solve(self, plan: SolvePlan, n: int, cond: Cond, gen: torch.Generator, progress: bool,
               x: Tensor | None = None) -> list[SampleResult | LikelihoodResult]:
        """``plan.run`` over n rows in batches of the settings' batch size, its inputs drawn with ``gen``
        (``plan.draw``); a progress bar counts model calls."""
        batch, device = self.settings.batch_size, self.device
        total = None if plan.calls is None else plan.calls * -(-n // batch)
        label = None if plan.task == "sample" else plan.divergence_label
        out = []
        with progress_bar(n, total, enabled=progress, likelihood=label) as bar:
            counted = Progress(self.model, bar)
            for i in range(0, n, batch):
                m = min(batch, n - i)
                inputs = plan.draw(self.path, m, gen, device, None if x is None else x[i:i + m])
                with torch.no_grad():  # forward-mode JVPs only: no autograd graph to keep
                    out.append(plan.run(counted, self.path, inputs.pop(plan.x_name), **inputs,
                                        **rows(cond, i, m, device)))
        return out

    def sample(self, n: int, *, seed: int = 0, cond: Cond | None = None, log_likelihood: bool = False,
               transport: bool = False, progress: bool = True,
               generator: torch.Generator | None = None) -> SampleResult:
        """n samples from the prior pushed to t = 1 in batches; optionally their log-likelihood and
        (``transport``) per-sample kinetic energy and straightness in the same pass, or with the SDE sampler
        of ``fastfm.solve.sde`` where the settings give a diffusion. ``generator`` (default: the sampling stream of
        ``seed``) draws the prior, probes and noise: one passed through calls of a batch each draws what
        one call on all of them does."""
        if n < 1:
            raise ValueError(f"sample: n must be >= 1, got {n}")
        plan = self.plan("sample", log_likelihood=log_likelihood, transport=transport)
        cond = with_labels(self.meta, plan, n, cond)
        gen = seeding.generator(seed, seeding.SAMPLE) if generator is None else generator
        parts = self._solve(plan, n, cond, gen, progress)
        cat = lambda name: None if getattr(parts[0], name) is None else torch.cat(  # noqa: E731
            [getattr(p, name).cpu() for p in parts])
        return SampleResult(cat("x"), parts[-1].nfe, cat("log_prob"), kinetic=cat("kinetic"),
                            straightness=cat("straightness"))

    def log_likelihood(self, x: Tensor, *, seed: int = 0, cond: Cond | None = None, progress: bool = True,
                       generator: torch.Generator | None = None) -> LikelihoodResult:
        """log p_1 of data points x in batches (the latents x(0) with them); a progress bar counts model
        evaluations over all batches (with an ETA). ``generator`` (default: the sampling stream of ``seed``) draws
        the Hutchinson probes: one passed through calls on consecutive batches of x draws what one call does."""
        plan = self.plan("likelihood")
        if x.dim() != len(self.shape) + 1 or tuple(x.shape[1:]) != self.shape or x.shape[0] == 0:
            raise ValueError(f"log_likelihood: x must have shape (N, {', '.join(map(str, self.shape))}) with N >= 1, "
                             f"got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("log_likelihood: input contains NaN or Inf")
        cond = with_labels(self.meta, plan, x.shape[0], cond)
        gen = seeding.generator(seed, seeding.SAMPLE) if generator is None else generator
        parts = self._solve(plan, x.shape[0], cond, gen, progress, x)
        return LikelihoodResult(torch.cat([p.log_prob.cpu() for p in parts]), parts[-1].nfe,
                                torch.cat([p.x0.cpu() for p in parts]))

