"""An exported engine behind the inference interface (``fastfm.solve.Sampler``).

The engine fixes its solve plan at export (solver, steps, divergence, guidance, baked class, diffusion):
options a user gives must be left out or agree with it. The engine's static batch is served in chunks
(``Engine.__call__``), so ``sample(n)`` and ``log_likelihood(x)`` take any number of rows, with the eager
sampler's progress bar counting engine calls. The prior draws, probes and SDE noise are drawn here in the
order the eager sampler draws them for one batch.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastfm import seeding
from fastfm.solve.guidance import check_conditioning
from fastfm.solve.likelihood import LikelihoodResult
from fastfm.solve.ode import SampleResult
from fastfm.path.affine import AffinePath
from fastfm.run.load import path_of
from fastfm.run.meta import Cond
from fastfm.solve.plan import SolvePlan, plan_solve
from fastfm.solve.sampler import progress_bar, with_labels
from fastfm.solve.settings import settings_with

from .engine import Engine, EngineResult, load
from .spec import EngineSpec, ExportError


class EngineSampler:
    """``Sampler`` of an engine directory written by ``python -m fastfm.export``: its one plan, fixed at export."""

    def __init__(self, engine: Engine, given: dict[str, Any] | None = None) -> None:
        """``given``: the inference options a user set (None: not given), checked against the engine's plan."""
        self.engine, self.meta, self.spec = engine, engine.meta, engine.spec
        plan = self.spec.plan
        given = {k: v for k, v in (given or {}).items() if v is not None and k != "batch_size"}
        if "grid" in given:
            raise ValueError("--grid cannot be used with --engine: the engine's time grid is baked in")
        wanted = settings_with(given)  # the user's options, checked and normalised like an eager run's
        fixed = {"solver": plan.solver, "steps": plan.steps, "probes": plan.probes or None,
                 "divergence": None if plan.divergence == "none" else plan.divergence, "guidance": plan.guidance,
                 "diffusion": plan.diffusion, "class_label": plan.class_label}
        for name, value in fixed.items():
            if name in given and getattr(wanted, name) != value and not (name == "divergence" and
                                                                          given[name] == "auto"):
                raise ValueError(self._conflict(name, getattr(wanted, name), value))
        check_conditioning(self.meta.num_classes, plan.guidance, wanted.class_label)
        self.class_label = wanted.class_label  # labels of an engine that takes them, where none are given

    def _conflict(self, name: str, value: Any, fixed: Any) -> str:
        if name == "diffusion":
            built = "runs the ODE" if fixed is None else f"has diffusion {fixed}"
            return (f"--sde --diffusion {value}: the engine {built}; export one with "
                    f"python -m fastfm.export --task sample --sde --diffusion {value}")
        if name in ("guidance", "class_label"):
            flag, words = name.replace("_", "-"), name.replace("_", " ")
            return f"--{flag} {value} conflicts with the engine's baked {words} {fixed}"
        return (f"--{name} {value} conflicts with the engine ({fixed}); an engine's solver, steps and divergence are "
                "fixed at export")

    @classmethod
    def open(cls, directory: str | Path, given: dict[str, Any] | None = None, *, task: str | None = None,
             checkpoint: str | Path | None = None) -> EngineSampler:
        """Load ``directory`` (weights checked against ``checkpoint`` if given); a ``task`` engine if given."""
        engine = load(directory, checkpoint=checkpoint)
        if task is not None and engine.spec.task != task:
            raise ValueError(f"--engine {directory} is a {engine.spec.task} engine; this command needs a {task} engine")
        return cls(engine, given)

    @cached_property
    def path(self) -> AffinePath:
        """The run's path (its prior draws the engine's x0)."""
        return path_of(self.meta)

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset((self.spec.task,))

    def plan(self, task: str = "sample", *, log_likelihood: bool = False, transport: bool = False) -> SolvePlan:
        """The engine's plan, if it is one for ``task`` (and computes the samples' log-likelihood if asked)."""
        if task != self.spec.task:
            raise ExportError(f"engine {self.engine.directory} is a {self.spec.task} engine; it cannot {task}")
        if log_likelihood and not self.spec.plan.log_likelihood:
            settings = EngineSpec.request_of(self.spec.to_json()).settings
            plan_solve(settings, self.meta, self.path, task, log_likelihood=True)  # the run's own reason, if any
            raise ValueError(f"--engine {self.engine.directory} computes no log-likelihood; export it with "
                             "--log-likelihood")
        if transport:
            raise ValueError("an engine returns no trajectories: transport diagnostics need the eager sampler")
        return self.spec.plan

    def describe(self, task: str = "sample") -> dict[str, Any]:
        return {**self.plan(task).describe(), "engine": str(self.engine.directory), "backend": self.spec.backend,
                "dtype": self.spec.dtype}

    def _run(self, plan: SolvePlan, n: int, x: Tensor | None, cond: Cond | None, seed: int,
             progress: bool) -> EngineResult:
        """The engine on n rows: the plan's inputs drawn (on the CPU) with the sampling stream of ``seed`` in the
        order the eager sampler draws them for one batch, labels cycling through the classes where it takes them."""
        cond = dict(cond or {})
        if self.class_label is not None and plan.class_label is None:
            cond.setdefault("y", torch.full((n,), self.class_label))
        cond = with_labels(self.meta, plan, n, cond)
        inputs = plan.draw(self.path, n, seeding.generator(seed, seeding.SAMPLE), "cpu", x)
        label = None if plan.task == "sample" else plan.divergence_label
        with progress_bar(n, self.engine.calls(n), enabled=progress, unit="batch", likelihood=label) as bar:
            return self.engine(inputs.pop(plan.x_name), progress=bar.update, **inputs, **cond)

    def sample(self, n: int, *, seed: int = 0, cond: Cond | None = None, log_likelihood: bool = False,
               transport: bool = False, progress: bool = True) -> SampleResult:
        """n prior draws pushed to t = 1 by the engine (and their log-likelihood where asked)."""
        plan = self.plan("sample", log_likelihood=log_likelihood, transport=transport)
        res = self._run(plan, n, None, cond, seed, progress)
        return SampleResult(res.x.cpu(), res.nfe, res.log_prob.cpu() if log_likelihood else None)

    def log_likelihood(self, x: Tensor, *, seed: int = 0, cond: Cond | None = None,
                       progress: bool = True) -> LikelihoodResult:
        """log p_1 of x through the engine, Hutchinson probes (if any) drawn here (Rademacher)."""
        plan = self.plan("likelihood")
        res = self._run(plan, x.shape[0] if x.dim() else 0, x, cond, seed, progress)  # the engine names a bad shape
        return LikelihoodResult(res.log_prob.cpu(), res.nfe, res.x.cpu())
