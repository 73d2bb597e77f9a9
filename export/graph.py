"""The engine graph: a trained model and a fixed-step solver unrolled into one traced program.

``SampleProgram`` runs ``fastfm.ode.sample`` and ``LikelihoodProgram`` runs
``fastfm.likelihood.integrate_log_likelihood`` on a fixed time grid, so the solver loop (Butcher
tableau coefficients as fp32 constants) unrolls into steps x stages model calls. Everything the
program creates (the grid, a baked class label) is made on the device of its input, so the same
program traces for CPU and CUDA engines; ``trace`` checks that no tensor of the exported graph
lives elsewhere. Under bf16/fp16 the model's parameters are cast; the state x, the log-density
accumulator, t and the sinusoidal time features stay fp32 (``ModelInDtype``).

``trace`` turns a program into an ExportedProgram: the JVPs of the divergence are traced by
``make_fx`` (forward-mode AD below autograd, into plain functional ATen ops; torch.export's own
pre-dispatch trace of torch.func.jvp loses tangents through convolutions), cleaned up
(``export.simplify``), then exported with torch.export; each backend lowers it from there.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, fx, nn

from fastfm.compat import trace_fake
from fastfm.runs import LoadedRun
from fastfm.likelihood import bits_per_dim, integrate_log_likelihood
from fastfm.ode import sample
from fastfm.score import score_interval
from fastfm.sde import parse_diffusion, sde_sample
from fastfm.solvers import time_grid

from .simplify import JVP_DECOMPOSITIONS, simplify
from .spec import DTYPES, EngineSpec, ExportError, TensorSlot, signature


class ModelInDtype(nn.Module):
    """v(x, t, **cond) = model(x.to(dtype), t, **cond).float(): parameters in ``dtype``, t in fp32.

    The models embed t in fp32 (sinusoidal features, autocast off) and cast the features to
    their weights' dtype; buffers (the embedding frequencies) are left in fp32.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.data = p.data.to(dtype)
        self.dtype = dtype
        self.num_classes = getattr(model, "num_classes", None)

    def forward(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        cond = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in cond.items()}
        return self.model(x.to(self.dtype), t, **cond).float()


class _Program(nn.Module):
    """Shared set-up: the model (in the engine dtype), the path, the input names, the time grid over
    ``path.time_interval`` (t = 0 -> 1 for sampling, 1 -> 0 for likelihoods) and a baked class label."""

    def __init__(self, run: LoadedRun, spec: EngineSpec, inputs: list[TensorSlot]) -> None:
        super().__init__()
        dtype = DTYPES[spec.dtype]
        self.model = run.model if dtype == torch.float32 else ModelInDtype(run.model, dtype)
        self.path, self.spec, self.target = run.path, spec, run.meta["target"]
        self.input_names = [i.name for i in inputs]
        t0, t1 = score_interval(run.path, self.target) if spec.diffusion else run.path.time_interval(self.target)
        self.ends = (t0, t1) if spec.task == "sample" else (t1, t0)

    @property
    def grid(self) -> Tensor:
        """The fixed fp32 time grid (on the CPU; the traced program makes it on its input's device)."""
        return time_grid(self.spec.steps, *self.ends)

    def _split(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None,
                                                           dict[str, Tensor]]:
        """(x, grid, y, probes, extra conditioning) from the positional engine inputs; the grid and a baked
        label are made on x's device."""
        a = dict(zip(self.input_names, inputs))
        x = a["x0"] if "x0" in a else a["x1"]
        y = a.get("y")
        if y is None and self.spec.class_label is not None:
            y = torch.full((x.shape[0],), self.spec.class_label, dtype=torch.int64, device=x.device)
        cond = {"low_res": a["low_res"]} if "low_res" in a else {}
        return x, time_grid(self.spec.steps, *self.ends, device=x.device), y, a.get("probes"), cond


class SampleProgram(_Program):
    """(x0 [, y, low_res, probes]) -> (x(1) [, log p_1(x(1))]): noise pushed from t = 0 to 1 by the ODE;
    with a diffusion, (x0 [, y, low_res], noise) -> x(1) by the SDE of ``fastfm.sde``."""

    def __init__(self, run: LoadedRun, spec: EngineSpec, inputs: list[TensorSlot]) -> None:
        super().__init__(run, spec, inputs)
        self.diffusion = None if spec.diffusion is None else parse_diffusion(spec.diffusion)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        x0, grid, y, probes, cond = self._split(inputs)
        if self.diffusion is not None:
            noise = inputs[self.input_names.index("noise")]
            res = sde_sample(self.model, self.path, x0, diffusion=self.diffusion, steps=self.spec.steps,
                             target=self.target, noise=noise, denoise=self.spec.denoise, y=y,
                             guidance=self.spec.guidance, **cond)
            return (res.x,)
        res = sample(self.model, self.path, x0, solver=self.spec.solver, grid=grid, target=self.target, y=y,
                     guidance=self.spec.guidance, log_likelihood=self.spec.log_likelihood, probes=probes,
                     denoise=self.spec.denoise, **cond)
        return (res.x,) if res.log_prob is None else (res.x, res.log_prob)


class LikelihoodProgram(_Program):
    """(x1 [, y, low_res, probes]) -> (x(0), log p_1(x1) [, bits/dim]): data pulled from t = 1 to 0,
    log p_1(x1) = log p_0(x(0)) + int_0^1 div v dt, bits/dim as in ``fastfm.likelihood``."""

    def __init__(self, run: LoadedRun, spec: EngineSpec, inputs: list[TensorSlot], levels: int | None) -> None:
        super().__init__(run, spec, inputs)
        self.levels = levels

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        x1, grid, y, probes, cond = self._split(inputs)
        res = integrate_log_likelihood(self.model, self.path, x1, solver=self.spec.solver, grid=grid,
                                       target=self.target, probes=probes, y=y, **cond)
        if self.levels is None:
            return res.x0, res.log_prob
        return res.x0, res.log_prob, bits_per_dim(res.log_prob, x1[0].numel(), self.levels)


def build_program(run: LoadedRun, spec: EngineSpec) -> _Program:
    """The eval-mode program of a validated spec."""
    inputs, outputs = signature(spec, run.meta)
    if spec.task == "sample":
        return SampleProgram(run, spec, inputs).eval()
    levels = run.meta["data"].get("levels") if any(o.name == "bits_per_dim" for o in outputs) else None
    return LikelihoodProgram(run, spec, inputs, levels).eval()


def trace_aten(program: nn.Module, example: list[Tensor]) -> fx.GraphModule:
    """``program(*example)`` traced to functional ATen with fake tensors (static shapes)."""
    functional = torch.func.functionalize(program, remove="mutations")
    with torch.no_grad():
        return trace_fake(functional, JVP_DECOMPOSITIONS)(*example)


def trace(program: nn.Module, example: list[Tensor]) -> torch.export.ExportedProgram:
    """ExportedProgram of ``program(*example)``: ``trace_aten``, simplified (``export.simplify``), then
    exported; parameters become its constants. Raises ExportError if a tensor of the program is not
    on the inputs' device (:func:`off_device`)."""
    with torch.no_grad():
        ep = torch.export.export(simplify(trace_aten(program, example)), tuple(example))
    stray = off_device(ep, example[0].device)
    if stray:
        raise ExportError(f"the engine program holds tensors off its device {example[0].device}: "
                          f"{', '.join(stray[:8])}{' ...' if len(stray) > 8 else ''}")
    return ep


def off_device(ep: torch.export.ExportedProgram, device: torch.device) -> list[str]:
    """'name (device)' of every node value, weight and constant of ``ep`` that is not on ``device``: what a
    program made on a fixed device (a CPU grid, a CPU constant) instead of its input's, which fails or
    copies from the host on every call of a CUDA engine."""
    stray = [f"{n.name} ({v.device})" for n in ep.graph.nodes
             if isinstance(v := n.meta.get("val"), Tensor) and v.device != device]
    held = {**ep.state_dict, **ep.constants}
    stray += [f"{k} ({v.device})" for k, v in held.items() if isinstance(v, Tensor) and v.device != device]
    return stray


def example_inputs(inputs: list[TensorSlot], device: torch.device | str = "cpu") -> list[Tensor]:
    """Zeros of the engine's input shapes (for tracing)."""
    return [torch.zeros(i.shape, dtype=i.torch_dtype, device=device) for i in inputs]
