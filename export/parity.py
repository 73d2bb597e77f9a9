"""Parity of a built engine with the eager sampler / likelihood on a probe batch.

The reference is the spec's own solve plan run eagerly on the fp32 model (``SolvePlan.run``, the code the
engine traced), on the first rows of the probe batch (rows are independent). Per output, with e the engine
and r the reference,

    max_abs = max |e - r|,   cosine = <e, r> / (|e| |r|),
    pass  iff  max_abs <= atol + rtol * max |r|  and  cosine >= min_cosine,

with tolerances per engine dtype (the model in bf16/fp16 against the fp32 reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastfm import seeding
from fastfm.solve.ode import draw_prior
from fastfm.run.load import LoadedRun

from .spec import EngineSpec, TensorSlot

REFERENCE_ROWS = 64


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    min_cosine: float


TOLERANCES = {"fp32": Tolerance(1e-4, 1e-4, 1 - 1e-6), "fp16": Tolerance(2e-2, 2e-2, 0.999),
              "bf16": Tolerance(1e-1, 1e-1, 0.99)}


def probe_inputs(run: LoadedRun, spec: EngineSpec, seed: int = 0, low_res: Tensor | None = None) -> dict[str, Tensor]:
    """A probe batch for every engine input: the plan's draws (prior draws for x0, or for x1 too, probes, noise),
    labels cycling through the classes, and low-res images (given, tiled to the batch, or the prior draws
    downsampled, ``RunMeta.conditioning``)."""
    gen = seeding.generator(seed, seeding.PARITY)
    plan, b = spec.plan, spec.batch
    out = plan.draw(run.path, b, gen, "cpu", draw_prior(run.path, b, run.shape, gen) if plan.task == "likelihood"
                    else None)
    if run.meta.num_classes is not None and plan.class_label is None:
        out["y"] = torch.arange(b) % run.meta.num_classes
    if run.meta.superres:
        if low_res is None:
            low_res = run.meta.conditioning(draw_prior(run.path, b, run.shape, gen))["low_res"]
        run.meta.check_conditioning({"low_res": low_res}, "low-res inputs")
        out["low_res"] = low_res.float().repeat(-(-b // low_res.shape[0]), 1, 1, 1)[:b]
    return out


def reference(run: LoadedRun, spec: EngineSpec, probe: dict[str, Tensor], rows: int = REFERENCE_ROWS) -> list[Tensor]:
    """The eager fp32 outputs (``plan.run`` on the fp32 model) for the first ``rows`` rows of the probe batch,
    in output order."""
    device = next(run.model.parameters()).device
    cut = {k: (v[:, :rows] if k in ("probes", "noise") else v[:rows]).to(device) for k, v in probe.items()}
    x = cut.pop(spec.plan.x_name)
    with torch.no_grad():
        values = spec.plan.output_values(spec.plan.run(run.model, run.path, x, **cut), x)
    return [v.float().cpu() for v in values]


def compare(engine: list[Tensor], ref: list[Tensor], outputs: list[TensorSlot], dtype: str) -> dict[str, Any]:
    """Max-abs error and cosine similarity per output, and whether all are within tolerance."""
    tol = TOLERANCES[dtype]
    report: dict[str, Any] = {"tolerance": vars(tol), "rows": int(ref[0].shape[0]), "outputs": {}}
    ok = True
    for spec, e, r in zip(outputs, engine, ref):
        e = e[: r.shape[0]].detach().double().cpu().flatten()
        r = r.double().flatten()
        max_abs = float((e - r).abs().max())
        denom = float(e.norm() * r.norm())
        cosine = float(e @ r) / denom if denom > 0 else float(torch.equal(e, r))
        passed = (max_abs <= tol.atol + tol.rtol * float(r.abs().max()) and cosine >= tol.min_cosine
                  and bool(torch.isfinite(e).all()))
        report["outputs"][spec.name] = {"max_abs": max_abs, "cosine": cosine, "max_abs_reference": float(r.abs().max()),
                                        "ok": passed}
        ok = ok and passed
    report["ok"] = ok
    return report
