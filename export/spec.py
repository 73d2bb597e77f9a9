"""What an engine computes, checked before anything is built, and the fixed signature it gets.

An ``EngineSpec`` is the request (task, solver, steps, static batch, dtype, divergence, guidance);
``validate`` checks it against the run's metadata (model.json) and resolves the divergence;
``signature`` gives the engine's inputs and outputs, in the order every backend uses:

    sample:      x0 (B, *shape) [, y (B,)] [, low_res (B, C, h, w)] [, probes (k, B, *shape)]
                 -> x = x(1) [, log_prob = log p_1(x(1)) in nats]
    likelihood:  x1 (B, *shape) [, y] [, low_res] [, probes]
                 -> x = x(0) (the latent), log_prob = log p_1(x1) in nats [, bits_per_dim (images)]

``y`` is an input for class-conditional models unless a class label is baked in; ``probes`` is an
input for Hutchinson divergences (k Rademacher or Gaussian probes, E[eps eps^T] = I).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from fastfm.divergence import DIVERGENCES, EXACT_MAX_DIM, resolve_divergence
from fastfm.solvers import TABLEAUS, nfe_per_step

TASKS = ("sample", "likelihood")
BACKENDS = ("aoti", "onnx", "tensorrt", "cudagraph")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(ValueError):
    """A request or an engine directory that cannot be served; the message names what is wrong."""


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output: name, static shape and dtype name ('float32', 'int64')."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "int64": torch.int64}[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(d: dict[str, Any]) -> TensorSpec:
        return TensorSpec(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))


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

    @property
    def nfe(self) -> int:
        return self.steps * nfe_per_step(self.solver)

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
    choices = {"task": TASKS, "solver": tuple(TABLEAUS), "backend": BACKENDS, "dtype": tuple(DTYPES),
               "divergence": DIVERGENCES}
    for field, allowed in choices.items():
        if getattr(spec, field) not in allowed:
            raise ExportError(f"unknown {field} {getattr(spec, field)!r}; choose one of {allowed}")
    for field in ("steps", "batch", "probes"):
        if getattr(spec, field) < 1:
            raise ExportError(f"{field} must be >= 1, got {getattr(spec, field)}")
    if spec.task == "likelihood" and spec.log_likelihood:
        raise ExportError("log_likelihood is a sampling option; the likelihood task always returns log p")
    if not math.isfinite(spec.guidance):
        raise ExportError(f"guidance must be finite, got {spec.guidance}")
    classes = meta["model"].get("num_classes")
    if spec.guidance != 1.0 and spec.task == "likelihood":
        raise ExportError("guidance applies to sampling; a likelihood engine evaluates the conditional model")
    if spec.guidance != 1.0 and classes is None:
        raise ExportError(f"guidance {spec.guidance} needs a class-conditional model; this one has no classes")
    if spec.class_label is not None and spec.task == "likelihood":
        raise ExportError("a class label applies to sampling engines; likelihood engines take labels y as an input")
    if spec.class_label is not None and (classes is None or not 0 <= spec.class_label < classes):
        have = "no classes" if classes is None else f"classes 0..{classes - 1}"
        raise ExportError(f"class label {spec.class_label} invalid: the model has {have}")
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


def signature(spec: EngineSpec, meta: dict[str, Any]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of a validated spec, in graph order (see the module doc)."""
    shape, kind, levels = _data(meta)
    b = spec.batch
    x_in = "x0" if spec.task == "sample" else "x1"
    inputs = [TensorSpec(x_in, (b, *shape), "float32")]
    if meta["model"].get("num_classes") is not None and spec.class_label is None:
        inputs.append(TensorSpec("y", (b,), "int64"))
    if meta.get("superres"):
        factor = int(meta["superres"])
        low = (meta["model"]["low_res_channels"], shape[1] // factor, shape[2] // factor)
        inputs.append(TensorSpec("low_res", (b, *low), "float32"))
    if spec.divergence == "hutchinson":
        inputs.append(TensorSpec("probes", (spec.probes, b, *shape), "float32"))
    outputs = [TensorSpec("x", (b, *shape), "float32")]
    if spec.wants_divergence:
        outputs.append(TensorSpec("log_prob", (b,), "float32"))
    if spec.task == "likelihood" and kind == "image" and levels:
        outputs.append(TensorSpec("bits_per_dim", (b,), "float32"))
    return inputs, outputs
