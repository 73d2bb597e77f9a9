"""Every private PyTorch API fastfm uses, behind one small wrapper each.

PyTorch may rename or drop anything under ``torch._*`` (and private keyword arguments or attribute
contracts) in any release. fastfm reaches them only through this module, so a new release breaks in one
place, and tests/test_compat.py checks each of them (that the private thing exists and that the wrapper
still behaves) with a message naming the torch version and the missing attribute.

A leaf utility: it imports torch alone (private submodules lazily, on first use), so any layer may import it.

    foreach_lerp_             torch._foreach_lerp_: the EMA update, one fused kernel over all tensors
    set_found_inf             Optimizer.found_inf: fused Adam(W) skips its step without a host sync
    dynamo_counters           torch._dynamo.utils.counters: dynamo's statistics
    compiled_graph_count      counters["stats"]["unique_graphs"]: graphs compiled (recompiles show here)
    dynamo_config             torch._dynamo.config: recompile limits and checks (benchmarks)
    lookup_backend            torch._dynamo.backends.registry.lookup_backend: a compile backend by name
    get_decompositions        torch._decomp.get_decompositions: a decomposition table for make_fx
    op_schema                 torch._ops.OpOverload and its ._schema: an ATen node's op name and mutability
    trace_fake                make_fx(..., tracing_mode="fake", _allow_non_fake_inputs=True)
    aoti_compile_and_package  torch._inductor.aoti_compile_and_package: an ExportedProgram to a .pt2, with
                              metadata (inductor config aot_inductor.metadata)
    aoti_load_package         torch._inductor.aoti_load_package: a .pt2 back as a callable (get_metadata())
"""

from __future__ import annotations

import functools
import importlib
from collections import Counter
from typing import Any, Callable, Sequence

import torch
from torch import Tensor


class CompatError(RuntimeError):
    """This torch release lacks a private API fastfm relies on (see fastfm.compat)."""


@functools.cache
def private(module: str, name: str) -> Any:
    """``module.name`` (e.g. "torch._decomp", "get_decompositions"), or CompatError naming the torch version
    and the missing attribute. Cached: the wrappers below call it on every use."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise CompatError(f"torch {torch.__version__} has no {module}.{name} (a private API fastfm.compat "
                          f"wraps): {type(e).__name__}: {e}") from None


def foreach_lerp_(starts: list[Tensor], ends: list[Tensor], weight: float) -> None:
    """``starts[i] += weight * (ends[i] - starts[i])`` in place, for every i, in one fused multi-tensor kernel
    (``torch._foreach_lerp_``; a Python loop of ``lerp_`` launches one kernel per tensor)."""
    private("torch", "_foreach_lerp_")(starts, ends, weight)


def set_found_inf(opt: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """Make the next ``opt.step()`` a no-op (parameters, moments and step counts unchanged) where
    ``found_inf`` (a one-element tensor on the parameters' device) is nonzero, without a host sync.

    The private contract GradScaler uses: an optimizer with ``_step_supports_amp_scaling`` (fused Adam/AdamW)
    reads the attribute ``found_inf`` in ``step`` and skips the update on the device."""
    if not getattr(opt, "_step_supports_amp_scaling", False):
        raise CompatError(f"torch {torch.__version__}: {type(opt).__name__} does not read found_inf "
                          f"(no _step_supports_amp_scaling); fastfm needs a fused Adam/AdamW")
    opt.found_inf = found_inf.float()


def dynamo_counters() -> dict[str, Counter]:
    """Dynamo's global statistics (``torch._dynamo.utils.counters``: section -> Counter), live and mutable
    (``.clear()`` resets them)."""
    return private("torch._dynamo.utils", "counters")


def compiled_graph_count() -> int:
    """Graphs dynamo compiled in this process so far (``counters["stats"]["unique_graphs"]``): one per
    compiled function while nothing recompiles."""
    return int(dynamo_counters()["stats"]["unique_graphs"])


def dynamo_config() -> Any:
    """Dynamo's configuration module (``torch._dynamo.config``: recompile limits, ``patch``)."""
    return private("torch._dynamo", "config")


def lookup_backend(name: str) -> Callable:
    """The torch.compile backend registered as ``name`` (``torch._dynamo.backends.registry.lookup_backend``),
    e.g. to wrap it."""
    return private("torch._dynamo.backends.registry", "lookup_backend")(name)


def get_decompositions(ops: Sequence[Any]) -> dict[Any, Callable]:
    """The decomposition table of ``ops`` (``torch._decomp.get_decompositions``), as ``make_fx`` takes it."""
    return private("torch._decomp", "get_decompositions")(list(ops))


def op_schema(target: Any) -> torch.FunctionSchema | None:
    """The ``torch.FunctionSchema`` of an ATen op overload (an fx node's target, e.g. ``aten.mm.default``:
    ``torch._ops.OpOverload`` and its ``_schema``), or None for anything else (Python functions, getitem)."""
    if not isinstance(target, private("torch._ops", "OpOverload")):
        return None
    return target._schema


def trace_fake(fn: Callable, decompositions: dict[Any, Callable] | None = None) -> Callable:
    """``make_fx`` of ``fn`` with fake tensors: calling the result on example inputs traces ``fn`` into
    functional ATen (``decompositions`` applied). Real tensors ``fn`` holds (parameters, constants) are
    allowed (``make_fx``'s private ``_allow_non_fake_inputs=True``)."""
    make_fx = private("torch.fx.experimental.proxy_tensor", "make_fx")
    return make_fx(fn, decompositions, tracing_mode="fake", _allow_non_fake_inputs=True)


def aoti_compile_and_package(ep: torch.export.ExportedProgram, package_path: str,
                             inductor_configs: dict[str, Any] | None = None,
                             metadata: dict[str, str] | None = None) -> str:
    """Compile ``ep`` with AOTInductor into the package ``package_path`` (a .pt2)
    (``torch._inductor.aoti_compile_and_package``), with string ``metadata`` stored in the package (inductor
    config ``aot_inductor.metadata``; read back by the loaded package's ``get_metadata()``); returns its path."""
    configs = {**(inductor_configs or {}), **({"aot_inductor.metadata": metadata} if metadata else {})}
    return private("torch._inductor", "aoti_compile_and_package")(ep, package_path=package_path,
                                                                  inductor_configs=configs)


def aoti_load_package(path: str, device_index: int = -1) -> Callable:
    """The AOTInductor package ``path`` loaded as a callable (``torch._inductor.aoti_load_package``),
    on CUDA device ``device_index`` (-1: the current one)."""
    return private("torch._inductor", "aoti_load_package")(path, device_index=device_index)
