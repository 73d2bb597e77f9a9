"""An exported engine behind the inference interface (``fastfm.inference.Sampler``).

The engine fixes its solver, steps, divergence, guidance, baked class and diffusion at export: options
a user gives must be left out or agree with them. The engine's static batch is served in chunks
(``Engine.__call__``), so ``sample(n)`` and ``log_likelihood(x)`` take any number of rows, with the eager
sampler's progress bar counting engine calls. The prior draws, probes and SDE noise are drawn here in the
order the eager sampler draws them for one batch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastfm import seeding
from fastfm.divergence import draw_probes
from fastfm.guidance import check_conditioning
from fastfm.inference import Cond, InferenceSettings, progress_bar, settings_with, with_labels
from fastfm.likelihood import LikelihoodResult
from fastfm.ode import SampleResult, draw_prior
from fastfm.runs import path_from_meta

from .engine import Engine, load
from .spec import ExportError


class EngineSampler:
    """``Sampler`` of an engine directory written by ``python -m fastfm.export``."""

    def __init__(self, engine: Engine, given: dict[str, Any] | None = None) -> None:
        """``given``: the inference options a user set (None: not given), checked against the engine."""
        self.engine, self.meta, spec = engine, engine.meta, engine.spec
        fixed = {"solver": spec.solver, "steps": spec.steps, "probes": spec.probes or None,
                 "divergence": None if spec.divergence == "none" else spec.divergence,
                 "guidance": spec.guidance, "diffusion": spec.diffusion}
        if spec.class_label is not None:
            fixed["class_label"] = spec.class_label
        given = {k: v for k, v in (given or {}).items() if v is not None and k != "batch_size"}
        if "grid" in given:
            raise ValueError("--grid cannot be used with --engine: the engine's time grid is baked in")
        wanted = settings_with(given)  # the user's options, checked and normalised like an eager run's
        for name, value in fixed.items():
            if name in given and getattr(wanted, name) != value and not (name == "divergence" and
                                                                          given[name] == "auto"):
                raise ValueError(self._conflict(name, getattr(wanted, name), value))
        self.settings = InferenceSettings(
            solver=spec.solver, steps=spec.steps, divergence=fixed["divergence"] or "auto", probes=spec.probes or 1,
            batch_size=spec.batch, guidance=spec.guidance, class_label=given.get("class_label", spec.class_label),
            diffusion=spec.diffusion)
        check_conditioning(self.meta["model"].get("num_classes"), self.settings.guidance, self.settings.class_label)

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

    @property
    def tasks(self) -> frozenset[str]:
        return frozenset((self.engine.spec.task,))

    def describe(self) -> dict[str, Any]:
        spec = self.engine.spec
        return {**self.settings.describe(), "engine": str(self.engine.directory), "backend": spec.backend,
                "dtype": spec.dtype}

    def _probes(self, shape: tuple[int, ...], gen: torch.Generator) -> Tensor | None:
        spec = self.engine.spec
        if spec.divergence == "none":
            return None
        return draw_probes(spec.divergence, math.prod(shape[1:]), spec.probes, shape, gen, torch.device("cpu"))

    def _require(self, task: str) -> None:
        if self.engine.spec.task != task:
            raise ExportError(f"engine {self.engine.directory} is a {self.engine.spec.task} engine; it cannot {task}")

    def sample(self, n: int, *, seed: int = 0, cond: Cond | None = None, log_likelihood: bool = False,
               transport: bool = False, progress: bool = True) -> SampleResult:
        """n prior draws pushed to t = 1 by the engine (and their log-likelihood where it computes it)."""
        self._require("sample")
        spec = self.engine.spec
        if log_likelihood and not spec.log_likelihood:
            raise ValueError(f"--engine {self.engine.directory} computes no log-likelihood; export it with "
                             "--log-likelihood")
        if transport:
            raise ValueError("an engine returns no trajectories: transport diagnostics need the eager sampler")
        cond = with_labels(self, n, cond)
        if spec.class_label is not None:  # baked into the engine, which takes no labels
            cond.pop("y", None)
        gen = seeding.generator(seed, seeding.EVAL)
        shape = tuple(self.meta["data"]["shape"])
        x0 = draw_prior(path_from_meta(self.meta), n, shape, gen)
        probes = self._probes((n, *shape), gen)
        noise = torch.randn((spec.steps, n, *shape), generator=gen) if spec.diffusion is not None else None
        with progress_bar(n, self.engine.calls(n), enabled=progress, unit="batch") as bar:
            res = self.engine(x0, probes=probes, noise=noise, progress=bar.update, **cond)
        return SampleResult(res.x.cpu(), res.nfe, None if res.log_prob is None or not log_likelihood
                            else res.log_prob.cpu())

    def log_likelihood(self, x: Tensor, *, seed: int = 0, cond: Cond | None = None,
                       progress: bool = True) -> LikelihoodResult:
        """log p_1 of x through the engine, Hutchinson probes (if any) drawn here (Rademacher)."""
        self._require("likelihood")
        gen = seeding.generator(seed, seeding.EVAL)
        n = x.shape[0] if x.dim() else 0  # the engine names a wrong shape
        with progress_bar(n, self.engine.calls(n), enabled=progress, unit="batch",
                          likelihood=self.settings.divergence_label(math.prod(self.meta["data"]["shape"]))) as bar:
            res = self.engine(x, probes=self._probes(tuple(x.shape), gen), progress=bar.update,
                              **with_labels(self, n, cond))
        return LikelihoodResult(res.log_prob.cpu(), res.nfe, res.x.cpu())
