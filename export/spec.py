"""What an engine computes, checked before anything is built, and the fixed signature it gets.

An ``EngineSpec`` is the request (task, solver, steps, static batch, dtype, divergence, guidance);
``validate`` checks it against the run's metadata (model.json) and resolves the divergence;
``signature`` gives the engine's inputs and outputs, in the order every backend uses:

    sample:      x0 (B, *shape) [, y (B,)] [, low_res (B, C, h, w)] [, probes (k, B, *shape)]
                 [, noise (steps, B, *shape)]
                 -> x = x(1) [, log_prob = log p_1(x(1)) in nats]
    likelihood:  x1 (B, *shape) [, y] [, low_res] [, probes]
                 -> x = x(0) (the latent), log_prob = log p_1(x1) in nats [, bits_per_dim (images)]

``y`` is an input for class-conditional models unless a class label is baked in; ``probes`` is an
input for Hutchinson divergences (k Rademacher or Gaussian probes, E[eps eps^T] = I). ``noise`` is an input
of SDE sampling engines (``diffusion`` set: Euler-Maruyama of ``fastfm.sde``, one standard normal draw per
step and element), so the engine's output for given noise equals the eager sampler's.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from fastfm.densities import Gaussian
from fastfm.divergence import DIVERGENCES, EXACT_MAX_DIM, resolve_divergence
from fastfm.guidance import check_conditioning
from fastfm.ode import jumps
from fastfm.runs import path_from_meta
from fastfm.score import score_interval
from fastfm.sde import parse_diffusion
from fastfm.solvers import TABLEAUS, nfe_per_step

TASKS = ("sample", "likelihood")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(ValueError):
    """A request or an engine directory that cannot be served; the message names what is wrong."""


@dataclass(frozen=True)
class TensorSlot:
    """One engine input or output: name, static shape and dtype name ('float32', 'int64')."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "int64": torch.int64}[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    def check_rows(self, shape: tuple[int, ...], dim: int = 0, rows: int | None = None) -> None:
        """``shape`` is this slot's with at least one row along ``dim`` (exactly ``rows``, those of another input,
        if given); ExportError saying what is wrong otherwise."""
        ndim = len(self.shape)
        layout = "(" + ", ".join("rows" if i == dim else str(s) for i, s in enumerate(self.shape)) \
            + ("," if ndim == 1 else "") + ")"
        if len(shape) != ndim:
            raise ExportError(f"{self.name!r} must be {ndim}-D {layout}, got {len(shape)}-D {shape}")
        want = self.shape[:dim] + (shape[dim] if rows is None else rows,) + self.shape[dim + 1:]
        if shape[dim] == 0 and rows is None:
            raise ExportError(f"{self.name!r} has 0 rows, shape {shape}: need at least one row {layout}")
        if shape != want:
            raise ExportError(f"{self.name!r} must have shape {want} {layout}, got {shape}")

    @staticmethod
    def from_json(d: dict[str, Any]) -> TensorSlot:
        return TensorSlot(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))


@dataclass(frozen=True)
class EngineSpec:
    """The request. ``divergence`` is 'auto' until :func:`validate` resolves it ('none' when unused)."""

    task: str
    solver: str
    steps: int
    batch: int
    backend: str = "aoti"
    dtype: str = "fp32"
    log_likelihood: bool = False
    divergence: str = "auto"
    probes: int = 1
    guidance: float = 1.0
    class_label: int | None = None
    diffusion: str | None = None  # SDE sampling: eps(t) as ``fastfm.sde.parse_diffusion`` reads it
    denoise: bool = False  # sampling: a final jump to E[x1 | x_t] (resolved by validate: the interval ends before 1)

    @property
    def nfe(self) -> int:
        return self.steps * nfe_per_step(self.solver) + self.denoise

    @property
    def wants_divergence(self) -> bool:
        return self.task == "likelihood" or self.log_likelihood

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _data(meta: dict[str, Any]) -> tuple[tuple[int, ...], str, int | None]:
    d = meta["data"]
    return tuple(d["shape"]), d["kind"], d.get("levels")


def validate(spec: EngineSpec, meta: dict[str, Any]) -> EngineSpec:
    """Check the request against the run (raises ExportError naming the problem); resolve the divergence.

    Exact divergence costs D JVPs per field evaluation, all unrolled in the graph: above
    D = 16 (where ``auto`` switches to Hutchinson) it is allowed but warned about.
    """
    choices = {"task": TASKS, "solver": tuple(TABLEAUS), "dtype": tuple(DTYPES), "divergence": tuple(DIVERGENCES)}
    for field, allowed in choices.items():
        if getattr(spec, field) not in allowed:
            raise ExportError(f"unknown {field} {getattr(spec, field)!r}; choose one of {allowed}")
    for field in ("steps", "batch", "probes"):
        if getattr(spec, field) < 1:
            raise ExportError(f"{field} must be >= 1, got {getattr(spec, field)}")
    if spec.task == "likelihood" and spec.log_likelihood:
        raise ExportError("log_likelihood is a sampling option; the likelihood task always returns log p")
    if spec.guidance != 1.0 and spec.task == "likelihood":
        raise ExportError("guidance applies to sampling; a likelihood engine evaluates the conditional model")
    if spec.class_label is not None and spec.task == "likelihood":
        raise ExportError("a class label applies to sampling engines; likelihood engines take labels y as an input")
    try:
        check_conditioning(meta["model"].get("num_classes"), spec.guidance, spec.class_label)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if spec.diffusion is not None:
        spec = _validate_sde(spec, meta)
    elif spec.task == "sample":  # the ODE's final jump to E[x1 | x_t] where its interval stops short of t = 1
        spec = replace(spec, denoise=jumps(path_from_meta(meta), meta["target"]))
    elif spec.denoise:
        raise ExportError("denoise is resolved for sampling engines only")
    if not spec.wants_divergence:
        if spec.divergence not in ("auto", "none"):
            raise ExportError(f"divergence {spec.divergence!r} needs a likelihood: use task 'likelihood' "
                              "or log_likelihood=True")
        return replace(spec, divergence="none", probes=0)
    dim = math.prod(_data(meta)[0])
    divergence = resolve_divergence(spec.divergence, dim)
    if divergence == "exact" and dim > EXACT_MAX_DIM:
        warnings.warn(f"exact divergence of a {dim}-dimensional field unrolls {dim} JVPs per evaluation "
                      f"({dim * spec.nfe} in the graph); consider divergence='hutchinson'", stacklevel=2)
    return replace(spec, divergence=divergence, probes=spec.probes if divergence == "hutchinson" else 0)


def _validate_sde(spec: EngineSpec, meta: dict[str, Any]) -> EngineSpec:
    """An SDE sampling request: Euler-Maruyama, no likelihood, a Gaussian base; ``denoise`` resolved."""
    if spec.task != "sample":
        raise ExportError("an SDE (diffusion) applies to sampling engines; use task 'sample'")
    if spec.solver != "euler":
        raise ExportError(f"SDE engines integrate with Euler-Maruyama: use solver 'euler', got {spec.solver!r}")
    if spec.log_likelihood:
        raise ExportError("an SDE sampler has no log-likelihood of its samples; drop log_likelihood or the diffusion")
    try:
        diffusion = str(parse_diffusion(spec.diffusion))
        path = path_from_meta(meta)
        lo, hi = score_interval(path, meta["target"])
        if not isinstance(path.source, Gaussian):
            raise ValueError(f"the SDE needs the score, which needs a Gaussian base; this run's source is "
                             f"{meta.get('source')!r}")
    except ValueError as e:
        raise ExportError(str(e)) from None
    return replace(spec, diffusion=diffusion, denoise=hi < 1.0)


def signature(spec: EngineSpec, meta: dict[str, Any]) -> tuple[list[TensorSlot], list[TensorSlot]]:
    """(inputs, outputs) of a validated spec, in graph order (see the module doc)."""
    shape, kind, levels = _data(meta)
    b = spec.batch
    x_in = "x0" if spec.task == "sample" else "x1"
    inputs = [TensorSlot(x_in, (b, *shape), "float32")]
    if meta["model"].get("num_classes") is not None and spec.class_label is None:
        inputs.append(TensorSlot("y", (b,), "int64"))
    if meta.get("superres"):
        factor = int(meta["superres"])
        low = (meta["model"]["low_res_channels"], shape[1] // factor, shape[2] // factor)
        inputs.append(TensorSlot("low_res", (b, *low), "float32"))
    if spec.divergence == "hutchinson":
        inputs.append(TensorSlot("probes", (spec.probes, b, *shape), "float32"))
    if spec.diffusion is not None:
        inputs.append(TensorSlot("noise", (spec.steps, b, *shape), "float32"))
    outputs = [TensorSlot("x", (b, *shape), "float32")]
    if spec.wants_divergence:
        outputs.append(TensorSlot("log_prob", (b,), "float32"))
    if spec.task == "likelihood" and kind == "image" and levels:
        outputs.append(TensorSlot("bits_per_dim", (b,), "float32"))
    return inputs, outputs
