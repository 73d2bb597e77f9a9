"""Parity of a built engine with the eager sampler / likelihood on a probe batch.

The reference is fastfm's own eager path on the fp32 model (``fastfm.ode.sample``,
``fastfm.likelihood.log_likelihood``, same solver and grid), on the first rows of the probe
batch (rows are independent). Per output, with e the engine and r the reference,

    max_abs = max |e - r|,   cosine = <e, r> / (|e| |r|),
    pass  iff  max_abs <= atol + rtol * max |r|  and  cosine >= min_cosine,

with tolerances per engine dtype (the model in bf16/fp16 against the fp32 reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastfm import seeding
from fastfm.runs import LoadedRun
from fastfm.divergence import make_probes
from fastfm.likelihood import bits_per_dim, log_likelihood
from fastfm.ode import draw_prior, sample
from fastfm.sde import parse_diffusion, sde_sample

from .spec import EngineSpec, TensorSlot

REFERENCE_ROWS = 64


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    min_cosine: float


TOLERANCES = {"fp32": Tolerance(1e-4, 1e-4, 1 - 1e-6), "fp16": Tolerance(2e-2, 2e-2, 0.999),
              "bf16": Tolerance(1e-1, 1e-1, 0.99)}


def probe_inputs(run: LoadedRun, inputs: list[TensorSlot], seed: int = 0, low_res: Tensor | None = None,
                 ) -> dict[str, Tensor]:
    """A probe batch for every engine input: prior draws for x, labels cycling through the classes,
    Rademacher probes, and low-res images (given, tiled to the batch, or downsampled prior draws)."""
    gen = seeding.generator(seed, seeding.EVAL)
    shape = run.shape
    out: dict[str, Tensor] = {}
    for spec in inputs:
        b = spec.shape[0] if spec.name not in ("probes", "noise") else spec.shape[1]
        if spec.name in ("x0", "x1"):
            out[spec.name] = draw_prior(run.path, b, shape, gen)
        elif spec.name == "y":
            out["y"] = torch.arange(b) % run.meta["model"]["num_classes"]
        elif spec.name == "probes":
            out["probes"] = make_probes(spec.shape[0], spec.shape[1:], "rademacher", gen)
        elif spec.name == "noise":
            out["noise"] = torch.randn(spec.shape, generator=gen)
        elif spec.name == "low_res":
            if low_res is None:
                low_res = F.avg_pool2d(draw_prior(run.path, b, shape, gen), int(run.meta["superres"]))
            spec.check_rows(tuple(low_res.shape))
            out["low_res"] = low_res.float().repeat(-(-b // low_res.shape[0]), 1, 1, 1)[:b]
    return out


def reference(run: LoadedRun, spec: EngineSpec, probe: dict[str, Tensor], outputs: list[TensorSlot],
              rows: int = REFERENCE_ROWS) -> list[Tensor]:
    """The eager fp32 outputs for the first ``rows`` rows of the probe batch, in output order."""
    device = next(run.model.parameters()).device
    cut = {k: (v[:, :rows] if k in ("probes", "noise") else v[:rows]).to(device) for k, v in probe.items()}
    y = cut.pop("y", None)
    if y is None and spec.class_label is not None:
        y = torch.full((cut.get("x0", cut.get("x1")).shape[0],), spec.class_label, device=device)
    probes, noise = cut.pop("probes", None), cut.pop("noise", None)
    opts: dict[str, Any] = dict(solver=spec.solver, steps=spec.steps, target=run.meta["target"], y=y, probes=probes)
    with torch.no_grad():
        if noise is not None:
            res = sde_sample(run.model, run.path, cut.pop("x0"), diffusion=parse_diffusion(spec.diffusion),
                             steps=spec.steps, target=run.meta["target"], noise=noise, denoise=spec.denoise, y=y,
                             guidance=spec.guidance, **cut)
            values = {"x": res.x}
        elif spec.task == "sample":
            res = sample(run.model, run.path, cut.pop("x0"), guidance=spec.guidance,
                         log_likelihood=spec.log_likelihood, denoise=spec.denoise, **opts, **cut)
            values = {"x": res.x, "log_prob": res.log_prob}
        else:
            x1 = cut.pop("x1")
            lik = log_likelihood(run.model, run.path, x1, **opts, **cut)
            values = {"x": lik.x0, "log_prob": lik.log_prob}
            if any(o.name == "bits_per_dim" for o in outputs):
                values["bits_per_dim"] = bits_per_dim(lik.log_prob, x1[0].numel(), run.meta["data"]["levels"])
    return [values[o.name].float().cpu() for o in outputs]


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
