"""Cases shared by the export benchmarks (benchmarks/test_export_cpu.py, benchmarks/gpu/bench_export.py):
the models, the workloads, and one callable per implementation on the same model, solver and steps.

    flow_matching  Meta's ODESolver (torchdiffeq fixed-step midpoint; exact divergence by autograd)
    eager          fastfm.solve.ode.ode_sample / fastfm.solve.likelihood.ode_likelihood
    compile        torch.compile(fullgraph=True) of the engine's program
    aoti, onnx, tensorrt, cudagraph [, *_bf16]   an engine from fastfm.export (built with its parity check)
    auto           the engine ``python -m fastfm.export`` builds by default: backend and dtype 'auto', the fastest
                   candidate of this machine (bf16 only where native), measured at build time
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from fastfm.export import EngineRequest, export_engine, load
from fastfm.export.choose import AUTO
from fastfm.export.graph import build_program
from fastfm.export.spec import resolve
from torch import Tensor, nn

import fastfm
from fastfm.run.load import load_run
from fastfm.run.checkpoint import save_inference
from fastfm.solve.likelihood import ode_likelihood
from fastfm.models import build_model
from fastfm.solve.ode import ode_sample

SOLVER = "midpoint"
VECTOR = {"name": "checkerboard", "shape": [2], "kind": "vector", "levels": None, "num_classes": None}
DIGITS = {"name": "digits", "shape": [1, 8, 8], "kind": "image", "levels": 17, "num_classes": 10}
MODELS: dict[str, dict[str, Any]] = {
    "mlp": {"model": {"name": "mlp", "dim": 2, "hidden": 512, "depth": 4}, "steps": 16, "data": VECTOR},
    "unet": {"model": {"name": "unet", "in_channels": 1, "image_size": 8, "model_channels": 16,
                       "channel_mult": [1, 2], "num_res_blocks": 1}, "steps": 4, "data": DIGITS},
}
# Tiny versions of the same cases (CPU checks of the benchmark code).
QUICK: dict[str, dict[str, Any]] = {
    "mlp": {**MODELS["mlp"], "model": {**MODELS["mlp"]["model"], "hidden": 32, "depth": 2}, "steps": 2},
    "unet": {**MODELS["unet"], "model": {**MODELS["unet"]["model"], "model_channels": 8, "channel_mult": [1]},
             "steps": 1},
}
WORKLOADS = [("mlp", "sample", 1), ("mlp", "sample", 4096), ("mlp", "likelihood", 1024),
             ("unet", "sample", 1), ("unet", "sample", 4096)]


class FlowMatchingModel(nn.Module):
    """flow_matching's velocity-model convention: model(x=..., t=scalar tensor)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor, **extras: Any) -> Tensor:
        return self.model(x, t.expand(x.shape[0]))


def make_runs(root: Path, models: dict[str, dict[str, Any]]) -> None:
    """One run directory per model: random weights moved off the zero-initialised layers."""
    for name, case in models.items():
        torch.manual_seed(0)
        model = build_model(case["model"])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        meta = {"fastfm_version": fastfm.__version__, "model": model.config, "path": {"name": "condot", "args": {}},
                "source": "gaussian", "seed": 0, "target": "velocity", "superres": 0, "data": case["data"]}
        save_inference(root / name, model.state_dict(), meta)


def runner(root: Path, models: dict[str, dict[str, Any]], model: str, task: str, batch: int, impl: str,
           device: str = "cpu") -> tuple[Callable[[Tensor], Tensor], float]:
    """(x -> log p for likelihood tasks or samples otherwise, build seconds) of one implementation."""
    run = load_run(root / model, device)
    steps = models[model]["steps"]
    started = time.perf_counter()
    if impl == "flow_matching":
        from flow_matching.solver import ODESolver  # optional peer: callers list it only where installed

        solver = ODESolver(FlowMatchingModel(run.model))
        if task == "sample":
            grid = torch.tensor([0.0, 1.0], device=device)
            return (lambda x: solver.sample(x_init=x, step_size=1 / steps, method=SOLVER, time_grid=grid)), 0.0
        grid = torch.tensor([1.0, 0.0], device=device)
        return (lambda x: solver.compute_likelihood(x_1=x, log_p0=run.path.prior.log_prob, step_size=1 / steps,
                                                    method=SOLVER, time_grid=grid, exact_divergence=True)[1]), 0.0
    if impl == "eager":
        if task == "sample":
            return torch.no_grad()(lambda x: ode_sample(run.model, run.path, x, solver=SOLVER, steps=steps).x), 0.0
        return torch.no_grad()(
            lambda x: ode_likelihood(run.model, run.path, x, solver=SOLVER, steps=steps).log_prob), 0.0
    backend, _, dtype = impl.partition("_")
    dtype = dtype or (AUTO if backend == AUTO else "fp32")
    spec = EngineRequest.of(task=task, solver=SOLVER, steps=steps, batch=batch, dtype=dtype,
                            backend="aoti" if backend == "compile" else backend)
    if backend == "compile":
        spec = resolve(spec, run.meta, run.path)
        program = torch.compile(build_program(run, spec), fullgraph=True, dynamic=False)
        fn = torch.no_grad()(lambda x: program(x)[-1 if task == "likelihood" else 0])  # (x0, log p) or (x,)
        fn(torch.zeros(spec.signature()[0][0].shape, device=device))  # compile now
        return fn, time.perf_counter() - started
    out = root / f"{model}-{task}-{batch}-{impl}"
    export_engine(root / model, spec, out, device=device, force=True)
    engine = load(out)
    return (lambda x: engine(x).log_prob if task == "likelihood" else engine(x).x), time.perf_counter() - started


def inputs(models: dict[str, dict[str, Any]], model: str, batch: int, device: str = "cpu") -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn((batch, *models[model]["data"]["shape"]), generator=gen).to(device)


def check(got: Tensor, ref: Tensor, impl: str) -> float:
    """Max-abs difference to the eager output, asserted within fp32 (or bf16: an ``auto`` engine may be one)
    tolerance of its scale."""
    err = float((got.float() - ref.float()).abs().max())
    scale = 1.0 + float(ref.abs().max())
    low = impl.endswith("bf16") or impl == AUTO
    assert err <= (5e-2 if low else 2e-3) * scale, f"{impl}: max-abs {err} against eager"
    return err


def chosen(root: Path, model: str, task: str, batch: int, impl: str) -> str | None:
    """The backend/dtype an engine's build chose (its manifest's selection), None for non-engines."""
    path = root / f"{model}-{task}-{batch}-{impl}" / "manifest.json"
    return json.loads(path.read_text())["selection"]["chosen"] if path.exists() else None
