"""What an engine computes: ``EngineSpec`` = (solve plan, static batch, backend, model dtype).

An ``EngineRequest`` is what a user asks for (task, ``InferenceSettings``, batch, backend, dtype); ``resolve``
turns it into the spec of the run: the settings resolved into a ``SolvePlan`` (``fastfm.solve.plan``: every
rule of a solve, checked once, the same as for eager sampling) plus the rules of an engine: a fixed-step solver
unrolled over a uniform grid. The engine's signature is the plan's (inputs and outputs in graph order):

    sample:      x0 (B, *shape) [, y (B,)] [, low_res (B, C, h, w)] [, probes (k, B, *shape)]
                 [, noise (steps, B, *shape)]
                 -> x = x(1) [, log_prob = log p_1(x(1)) in nats]
    likelihood:  x1 (B, *shape) [, y] [, low_res] [, probes]
                 -> x = x(0) (the latent), log_prob = log p_1(x1) in nats [, bits_per_dim (images)]

The manifest stores a spec as one flat JSON object (``to_json``); ``from_json`` resolves it again against the
run and refuses one that does not follow from it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from fastfm.solve.divergence import EXACT_MAX_DIM
from fastfm.path.affine import AffinePath
from fastfm.run.meta import RunMeta
from fastfm.solve.plan import TASKS, SolvePlan, plan_solve
from fastfm.solve.settings import DEFAULTS, InferenceSettings
from fastfm.solve.signature import TensorSlot
from fastfm.solve.solvers import STEPPED_SOLVERS

__all__ = ["DTYPES", "TASKS", "EngineRequest", "EngineSpec", "ExportError", "TensorSlot", "resolve"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(ValueError):
    """A request or an engine directory that cannot be served; the message names what is wrong."""


@dataclass(frozen=True)
class EngineRequest:
    """What a user asks for: ``task`` with ``settings`` (their batch size is not the engine's: ``batch`` is),
    and for sampling optionally the samples' log-likelihood; backend and dtype may be 'auto'
    (``export.choose``)."""

    task: str
    settings: InferenceSettings = DEFAULTS
    batch: int = 1
    backend: str = "aoti"
    dtype: str = "fp32"
    log_likelihood: bool = False

    @staticmethod
    def of(task: str, *, batch: int = 1, backend: str = "aoti", dtype: str = "fp32", log_likelihood: bool = False,
           **settings: Any) -> EngineRequest:
        """The request with ``InferenceSettings(**settings)``: ``EngineRequest.of("sample", solver="rk4", steps=8)``."""
        return EngineRequest(task, InferenceSettings(**settings), batch, backend, dtype, log_likelihood)


@dataclass(frozen=True)
class EngineSpec:
    """A resolved request: the plan, the static batch, a concrete backend and dtype."""

    plan: SolvePlan
    batch: int
    backend: str
    dtype: str
    _signature: tuple[list[TensorSlot], list[TensorSlot]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_signature", (self.plan.inputs(self.batch), self.plan.outputs(self.batch)))

    @property
    def task(self) -> str:
        return self.plan.task

    @property
    def nfe(self) -> int:
        assert self.plan.nfe is not None  # resolve admits fixed-step solvers only
        return self.plan.nfe

    def signature(self) -> tuple[list[TensorSlot], list[TensorSlot]]:
        """(inputs, outputs) of one engine call, in graph order (computed once, with the spec)."""
        return self._signature

    def to_json(self) -> dict[str, Any]:
        p = self.plan
        return {"task": p.task, "solver": p.solver, "steps": p.steps, "batch": self.batch, "backend": self.backend,
                "dtype": self.dtype, "log_likelihood": p.log_likelihood and p.task == "sample",
                "divergence": p.divergence, "probes": p.probes, "guidance": p.guidance, "class_label": p.class_label,
                "diffusion": p.diffusion, "denoise": p.denoise}

    @staticmethod
    def request_of(d: dict[str, Any]) -> EngineRequest:
        """The request a stored spec (``to_json``) answers."""
        settings = InferenceSettings(solver=d["solver"], steps=d["steps"],
                                     divergence="auto" if d["divergence"] == "none" else d["divergence"],
                                     probes=max(d["probes"], 1), guidance=d["guidance"], class_label=d["class_label"],
                                     diffusion=d["diffusion"])
        return EngineRequest(d["task"], settings, d["batch"], d["backend"], d["dtype"], d["log_likelihood"])

    @staticmethod
    def from_json(d: dict[str, Any], meta: RunMeta, path: AffinePath) -> EngineSpec:
        """The spec a manifest stores, resolved again against its run; ExportError if it does not follow from it."""
        spec = resolve(EngineSpec.request_of(d), meta, path, warn=False)
        if spec.to_json() != d:
            diff = sorted(k for k, v in spec.to_json().items() if d.get(k) != v)
            raise ExportError(f"spec fields {diff} do not follow from the request and the run")
        return spec


def resolve(request: EngineRequest, meta: RunMeta, path: AffinePath, *, warn: bool = True) -> EngineSpec:
    """Check the request against the run and resolve it into a spec (ExportError naming the problem).

    The solve's own rules are the plan's (``plan_solve``), checked first; an engine adds: a known dtype,
    batch >= 1, a fixed-step solver on a uniform grid, and a divergence only where it computes a likelihood. An exact
    divergence costs D JVPs per field evaluation, all unrolled in the graph: above D = 16 (where ``auto``
    switches to Hutchinson) it is allowed but warned about (``warn``)."""
    s = request.settings
    if request.dtype not in DTYPES:
        raise ExportError(f"unknown dtype {request.dtype!r}; choose one of {tuple(DTYPES)}")
    if request.batch < 1:
        raise ExportError(f"batch must be >= 1, got {request.batch}")
    try:
        plan = plan_solve(s, meta, path, request.task, log_likelihood=request.log_likelihood)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if not plan.fixed:
        raise ExportError(f"an engine unrolls a fixed-step solver: choose one of {STEPPED_SOLVERS}, got "
                          f"{plan.solver!r}")
    if plan.grid is not None:
        raise ExportError("an engine unrolls a uniform grid of --steps: --grid does not apply to export")
    if plan.divergence == "none" and s.divergence != "auto":
        raise ExportError(f"divergence {s.divergence!r} needs a likelihood: use task 'likelihood' or log_likelihood")
    dim = meta.data.dim
    if warn and plan.divergence == "exact" and dim > EXACT_MAX_DIM:
        warnings.warn(f"exact divergence of a {dim}-dimensional field unrolls {dim} JVPs per evaluation "
                      f"({dim * (plan.nfe or 0)} in the graph); consider divergence='hutchinson'", stacklevel=2)
    return EngineSpec(plan, request.batch, request.backend, request.dtype)

