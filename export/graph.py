"""The engine graph: a trained model and a fixed-step solver unrolled into one traced program.

``EngineProgram`` runs the spec's ``SolvePlan`` (``fastfm.solve.plan``: the ODE or SDE sampler or the
likelihood, the one definition eager sampling runs too) on a fixed time grid, so the solver loop (Butcher
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
from fastfm.run.load import LoadedRun

from .simplify import JVP_DECOMPOSITIONS, simplify
from .spec import DTYPES, EngineSpec, ExportError, TensorSlot


class ModelInDtype(nn.Module):
    """v(x, t, **cond) = model(x.to(dtype), t, **cond).float(): parameters in ``dtype``, t (and a flow map's step h)
    in fp32.

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
        cond = {k: v.to(self.dtype) if v.is_floating_point() and k != "h" else v for k, v in cond.items()}
        return self.model(x.to(self.dtype), t, **cond).float()


class EngineProgram(nn.Module):
    """(inputs in signature order) -> (outputs in signature order): ``plan.run`` of the spec on the model in the
    engine dtype; the grid and a baked class label are made on the device of the input x."""

    def __init__(self, run: LoadedRun, spec: EngineSpec) -> None:
        super().__init__()
        dtype = DTYPES[spec.dtype]
        self.model = run.model if dtype == torch.float32 else ModelInDtype(run.model, dtype)
        self.path, self.plan = run.path, spec.plan
        self.input_names = [i.name for i in spec.signature()[0]]

    @property
    def grid(self) -> Tensor:
        """The fixed fp32 time grid (on the CPU; the traced program makes it on its input's device)."""
        return self.plan.times()

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        given = dict(zip(self.input_names, inputs))
        x = given.pop(self.plan.x_name)
        return self.plan.output_values(self.plan.run(self.model, self.path, x, **given), x)


def build_program(run: LoadedRun, spec: EngineSpec) -> EngineProgram:
    """The eval-mode program of a resolved spec."""
    return EngineProgram(run, spec).eval()


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
