"""The engine's hot ops as torch.library custom ops, one op per computation, dispatched by device.

    fastfm::affine_path(x1, a, b, c, d, x0?, rng?, std, write_target) -> (x_t, target)
    fastfm::cfm_loss(v, x1, c, d, x0?, rng?, std) -> per-sample loss (B,), differentiable in v
    fastfm::cfm_loss_grad(grad, v, x1, c, d, x0?, rng?, std) -> dL/dv

Backends (``FASTFM_KERNELS`` = auto or one of :data:`KERNEL_BACKENDS`: reference | cpp | triton; auto takes
the backend a timed probe chose for the device (kernels/select.py, run by the trainer), and without one the
installed backend built for the device type (Triton for CUDA, C++ for CPU), else the reference). Each is a
:class:`KernelBackend` that declares its device types, dtypes, size limit and whether it is installed here, and
carries its ops (:class:`KernelOps`), all with this one signature: the Triton launchers run inside a
``triton_op`` so torch.compile and torch.export see the kernels; the C++ kernels and the reference sit behind
opaque ``fastfm::*_cpp`` / ``fastfm::*_reference`` ops with fake implementations, so a compiled graph never
inlines the reference's Philox arithmetic (inductor does not finish compiling it).
With x0 = None the noise x0 = std * N(0, I) is drawn inside the kernel from the Philox stream of
``rng``, the int64 tensor [seed, offset] on the data's device (kernels/rng.py; a shard of a batch
draws its rows of the whole batch's noise at its offset), so the noise is never read from or
written to memory, and a new seed is new data to a compiled or CUDA-graph-captured step.

Arguments. This module owns their validation for every backend, and every check raises
:class:`KernelArgumentError` (a ``ValueError``) naming what is wrong: :func:`check_args` runs inside each
op, so every caller (the functions below, ``torch.ops.fastfm.*``, the autograd backward, an exported
graph) goes through it, reading the serving backend's declared dtypes and size limit, and :func:`backend_for`
its devices; the opaque C++ and reference ops, which run on real data, also
read a CPU state's offset and check its rows are in the stream (kernels/rng.py). The functions below check
beforehand only what the dispatcher would refuse with its own error (a Python type), and make the
coefficients float32. The backend modules (cpu, triton_kernels, reference) take validated arguments.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from fastfm.kernels import cpu, reference
from fastfm.kernels.rng import KernelArgumentError, check_state, check_state_rows, check_state_type, philox_state
from fastfm.registry import Registry

try:
    from fastfm.kernels import triton_kernels
    from torch.library import triton_op as _define
except ImportError:  # no triton: the same ops as plain custom ops
    triton_kernels = None
    _define = torch.library.custom_op

__all__ = ["KERNEL_BACKENDS", "KernelArgumentError", "KernelBackend", "KernelOps", "affine_path", "backend_for",
           "candidates", "cfm_loss", "cfm_loss_grad", "check_args", "forced_backend", "noise_state",
           "set_auto_backend", "unusable"]

_F32, _F64, _BF16, _F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


@dataclass(frozen=True)
class KernelOps:
    """A backend's three fused ops on validated arguments, with the signatures of ``fastfm::*`` (affine_path's
    target may come back None or empty when not written)."""

    affine_path: Callable[..., tuple[Tensor, Tensor | None]]
    cfm_loss: Callable[..., Tensor]
    cfm_loss_grad: Callable[..., Tensor]


def _never(device: torch.device) -> bool:
    return False


@dataclass(frozen=True)
class KernelBackend:
    """A kernel backend and its rules. It serves tensors whose device type is in ``devices`` (None: every
    type), or that ``interprets`` says an interpreter runs (served when forced, never auto's choice); x1, x0
    and v in one of ``dtypes``; at most ``max_numel`` elements. ``ops`` is None where it is not installed
    here (``requires`` says what it needs); ``hint`` follows a refusal for the device."""

    name: str
    help: str
    devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...]
    ops: KernelOps | None
    requires: str = ""
    max_numel: int | None = None
    interprets: Callable[[torch.device], bool] = _never
    hint: str = ""

    @property
    def available(self) -> bool:
        """Whether it is installed here."""
        return self.ops is not None

    def native(self, device: torch.device) -> bool:
        """Whether it is built for ``device`` (auto may choose it there): declared for the type, not interpreted."""
        return self.devices is None or device.type in self.devices

    def unusable(self, device: torch.device) -> str | None:
        """Why it cannot serve tensors on ``device`` (None: it can)."""
        if not self.available:
            return f"needs {self.requires}"
        if not self.native(device) and not self.interprets(device):
            kinds = " or ".join(d.upper() for d in self.devices)
            return f"needs {kinds} tensors, got tensors on {device}{self.hint}"
        return None


def _register_opaque(name: str, backend) -> KernelOps:
    """``fastfm::{affine_path,cfm_loss,cfm_loss_grad}_<name>``: ``backend``'s functions as opaque custom ops."""

    @torch.library.custom_op(f"fastfm::affine_path_{name}", mutates_args=())
    def path_op(x1: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, x0: Optional[Tensor], rng: Optional[Tensor],
                std: float, write_target: bool) -> tuple[Tensor, Tensor]:
        _check_rows(x1, x0, rng)
        x_t, target = backend.affine_path(x1, a, b, c, d, x0, rng, std, write_target)
        return x_t, target if target is not None else x1.new_empty(0)

    @torch.library.custom_op(f"fastfm::cfm_loss_{name}", mutates_args=())
    def loss_op(v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Optional[Tensor], rng: Optional[Tensor],
                std: float) -> Tensor:
        _check_rows(x1, x0, rng)
        return backend.cfm_loss(v, x1, c, d, x0, rng, std)

    @torch.library.custom_op(f"fastfm::cfm_loss_grad_{name}", mutates_args=())
    def grad_op(grad: Tensor, v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Optional[Tensor],
                rng: Optional[Tensor], std: float) -> Tensor:
        _check_rows(x1, x0, rng)
        return backend.cfm_loss_grad(grad, v, x1, c, d, x0, rng, std)

    path_op.register_fake(lambda x1, a, b, c, d, x0, rng, std, write_target: _fake_path(x1, write_target))
    loss_op.register_fake(lambda v, x1, c, d, x0, rng, std: _fake_loss(v))
    grad_op.register_fake(lambda grad, v, x1, c, d, x0, rng, std: torch.empty_like(v))
    return KernelOps(path_op, loss_op, grad_op)


def _fake_path(x1: Tensor, write_target: bool) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x1), torch.empty_like(x1) if write_target else x1.new_empty(0)


def _fake_loss(v: Tensor) -> Tensor:
    return v.new_empty(v.shape[0], dtype=torch.float32)


def _check_rows(x1: Tensor, x0: Tensor | None, rng: Tensor | None) -> None:
    """The rows a drawing op reads lie in the stream, for a state on the CPU (real tensors only: the opaque
    ops' fake implementations serve tracing)."""
    if x0 is None:
        check_state_rows(rng, x1.shape[0])


AUTO = "auto"
"""FASTFM_KERNELS's default: the faster of the device's compiled backend and the reference, measured when
training starts (kernels/select.py); untimed: the first of :func:`candidates`."""
KERNEL_BACKENDS: Registry[KernelBackend] = Registry("kernel backend")


def _register(backend: KernelBackend) -> None:
    KERNEL_BACKENDS.register(backend.name, backend.help, lambda: backend)


_register(KernelBackend("reference", "the plain-PyTorch spec (kernels/reference.py), behind opaque ops",
                        devices=None, dtypes=(_F32, _F64, _BF16, _F16), ops=_register_opaque("reference", reference)))
_cpp_ops = _register_opaque("cpp", cpu)  # registered where fastfm._C is not built too: a saved graph may name them
_register(KernelBackend("cpp", "the C++ extension fastfm._C (CPU tensors)",
                        devices=("cpu",), dtypes=(_F32, _F64, _BF16), ops=_cpp_ops if cpu.available() else None,
                        requires="the built extension fastfm._C (pip install -e .)"))
_register(KernelBackend("triton", "the Triton kernels (CUDA tensors, or the interpreter with TRITON_INTERPRET=1)",
                        devices=("cuda",), dtypes=(_F32, _BF16, _F16),
                        ops=None if triton_kernels is None else KernelOps(triton_kernels.affine_path,
                                                                          triton_kernels.cfm_loss,
                                                                          triton_kernels.cfm_loss_grad),
                        requires="the triton package",
                        max_numel=2**31 - 1,  # the kernels index elements (and the noise stream) with int32 offsets
                        interprets=lambda device: device.type == "cpu" and triton_kernels.interpret_mode(),
                        hint=" (CPU tensors run in Triton's interpreter when TRITON_INTERPRET=1 is set before "
                             "triton is imported)"))

_measured: dict[str, str] = {}
"""auto's backend per device type where a timed probe chose one (kernels/select.py); else the rule below."""


def unusable(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot serve tensors on ``device`` (None: it can)."""
    return KERNEL_BACKENDS.build(name).unusable(device)


def candidates(device: torch.device) -> list[str]:
    """The backends auto may choose among for tensors on ``device``, in the rule's order: the installed ones
    built for its device type, then those built for every type (the reference)."""
    backends = [KERNEL_BACKENDS.build(name) for name in KERNEL_BACKENDS]
    native = [b for b in backends if b.available and b.native(device)]
    return [b.name for b in sorted(native, key=lambda b: b.devices is None)]


def set_auto_backend(device_type: str, name: str | None) -> None:
    """Make ``name`` auto's backend for ``device_type`` tensors (None: back to the rule)."""
    if name is None:
        _measured.pop(device_type, None)
    else:
        _measured[device_type] = KERNEL_BACKENDS.entry(name).name


def forced_backend() -> str | None:
    """FASTFM_KERNELS when it names a backend other than auto (checked), else None."""
    choice = os.environ.get("FASTFM_KERNELS", AUTO)
    if choice != AUTO and choice not in KERNEL_BACKENDS:
        raise KernelArgumentError(f"FASTFM_KERNELS={choice!r} is not a backend; choose one of "
                                  f"{', '.join((AUTO, *KERNEL_BACKENDS))}")
    return None if choice == AUTO else choice


def backend_for(device: torch.device) -> str:
    """The backend that serves tensors on ``device``: FASTFM_KERNELS if it forces one, else auto's measured choice
    (``set_auto_backend``), else the first of :func:`candidates`."""
    choice = forced_backend()
    if choice is None:
        return _measured.get(device.type) or candidates(device)[0]
    why = unusable(choice, device)
    if why is not None:
        raise KernelArgumentError(f"FASTFM_KERNELS={choice} {why}")
    return choice


# ---------------------------------------------------------------- argument validation


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    names = [str(t).removeprefix("torch.") for t in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _tensor(name: str, t: object, what: str = "a torch.Tensor") -> Tensor:
    if not isinstance(t, Tensor):
        raise KernelArgumentError(f"{name} must be {what}, got {type(t).__name__}")
    return t


def _check_like(name: str, t: Tensor, x1: Tensor) -> None:
    """x0 / v: x1's device, dtype and shape."""
    if t.device != x1.device:
        raise KernelArgumentError(f"device mismatch: {name} is on {t.device} but x1 is on {x1.device}")
    if t.dtype != x1.dtype:
        raise KernelArgumentError(f"dtype mismatch: {name} dtype {t.dtype} does not match x1 dtype {x1.dtype}")
    if t.shape != x1.shape:
        raise KernelArgumentError(f"shape mismatch: {name} shape {tuple(t.shape)} does not match x1 shape "
                                  f"{tuple(x1.shape)}")


def _check_coefficient(name: str, t: Tensor, x1: Tensor) -> None:
    """A per-sample value (a, b, c, d, the upstream grad): float32 of shape (B,) on x1's device."""
    if t.device != x1.device:
        raise KernelArgumentError(f"device mismatch: coefficient {name} is on {t.device} but x1 is on {x1.device}")
    if tuple(t.shape) != (x1.shape[0],):
        raise KernelArgumentError(f"coefficient {name} must have shape (B,) = ({x1.shape[0]},), one value per "
                                  f"sample; got {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise KernelArgumentError(f"coefficient {name} must be float32 (per-sample coefficient), got {t.dtype}")


def check_args(backend: KernelBackend, x1: Tensor, coefs: dict[str, Tensor], x0: Tensor | None,
               rng: Tensor | None, v: Tensor | None = None) -> None:
    """Raise :class:`KernelArgumentError` unless the tensors of an op are right for ``backend``: x1 with a batch
    dimension (B, ...) in one of the backend's dtypes and within its ``max_numel``; v and x0 like x1 (device,
    dtype, shape); each coefficient float32 of shape (B,) on x1's device; with x0 None, rng the noise state on
    x1's device (kernels/rng.py)."""
    if x1.dim() < 1:
        raise KernelArgumentError("x1 must have a batch dimension (B, ...), got a 0-d tensor")
    if x1.dtype not in backend.dtypes:
        raise KernelArgumentError(f"unsupported dtype {x1.dtype}: x1 must be {_dtype_names(backend.dtypes)} for "
                                  f"the {backend.name} backend")
    if backend.max_numel is not None and x1.numel() > backend.max_numel:
        raise KernelArgumentError(f"x1 has {x1.numel()} elements, more than the {backend.name} backend's limit "
                                  f"of {backend.max_numel}")
    for name, t in (("v", v), ("x0", x0)):
        if t is not None:
            _check_like(name, t, x1)
    for name, t in coefs.items():
        _check_coefficient(name, t, x1)
    if x0 is None:
        check_state(rng, x1)


def _public_args(x1: object, coefs: dict[str, object], x0: object, rng: object, std: object,
                 v: object = None) -> tuple[list[Tensor], Tensor | None, float]:
    """What the public functions check before the dispatcher (which refuses a wrong Python type with its own
    error): tensors are tensors and std a number; the coefficients, of any floating dtype, become contiguous
    float32; rng is dropped when x0 is given. Returns (coefficients, rng, std); :func:`check_args` does the rest."""
    _tensor("x1", x1)
    for name, t in (("v", v), ("x0", x0)):
        if t is not None:
            _tensor(name, t)
    out = []
    for name, t in coefs.items():
        t = _tensor(f"coefficient {name}", t, "a torch.Tensor of shape (B,)")
        if not t.is_floating_point():
            raise KernelArgumentError(f"coefficient {name} must be a floating tensor (float32), got {t.dtype}")
        out.append(t.float().contiguous())
    if x0 is not None:
        rng = None
    else:
        check_state_type(rng)
    if isinstance(std, Tensor):
        raise KernelArgumentError("std must be a Python float, not a tensor")
    if not isinstance(std, numbers.Real):
        raise KernelArgumentError(f"std must be a float, got {type(std).__name__}")
    return out, rng, float(std)


# ---------------------------------------------------------------- public ops

def _serving(x1: Tensor, coefs: dict[str, Tensor], x0: Tensor | None, rng: Tensor | None,
             v: Tensor | None = None) -> KernelOps:
    """The ops of the backend that serves x1's device (:func:`backend_for`), after :func:`check_args`."""
    backend = KERNEL_BACKENDS.build(backend_for(x1.device))
    check_args(backend, x1, coefs, x0, rng, v)
    return backend.ops


def _affine_path_impl(x1: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, x0: Optional[Tensor],
                      rng: Optional[Tensor], std: float, write_target: bool) -> tuple[Tensor, Tensor]:
    ops = _serving(x1, {"a": a, "b": b, "c": c, "d": d}, x0, rng)
    x_t, target = ops.affine_path(x1, a, b, c, d, x0, rng, std, write_target)
    return x_t, target if target is not None else x1.new_empty(0)


def _cfm_loss_impl(v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Optional[Tensor], rng: Optional[Tensor],
                   std: float) -> Tensor:
    return _serving(x1, {"c": c, "d": d}, x0, rng, v).cfm_loss(v, x1, c, d, x0, rng, std)


def _cfm_loss_grad_impl(grad: Tensor, v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Optional[Tensor],
                        rng: Optional[Tensor], std: float) -> Tensor:
    return _serving(x1, {"grad": grad, "c": c, "d": d}, x0, rng, v).cfm_loss_grad(grad, v, x1, c, d, x0, rng, std)


_affine_path_op = _define("fastfm::affine_path", _affine_path_impl, mutates_args=())
_cfm_loss_op = _define("fastfm::cfm_loss", _cfm_loss_impl, mutates_args=())
_cfm_loss_grad_op = _define("fastfm::cfm_loss_grad", _cfm_loss_grad_impl, mutates_args=())

if triton_kernels is None:
    _affine_path_op.register_fake(lambda x1, a, b, c, d, x0, rng, std, write_target: _fake_path(x1, write_target))
    _cfm_loss_op.register_fake(lambda v, x1, c, d, x0, rng, std: _fake_loss(v))
    _cfm_loss_grad_op.register_fake(lambda grad, v, x1, c, d, x0, rng, std: torch.empty_like(v))


def _loss_setup(ctx, inputs, output) -> None:
    v, x1, c, d, x0, rng, std = inputs
    ctx.save_for_backward(v, x1, c, d, x0, rng)
    ctx.std = std


def _loss_backward(ctx, grad: Tensor):
    v, x1, c, d, x0, rng = ctx.saved_tensors
    dv = torch.ops.fastfm.cfm_loss_grad(grad.float().contiguous(), v, x1, c, d, x0, rng, ctx.std)
    return dv, None, None, None, None, None, None


_cfm_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


def noise_state(x1: Tensor, seed: int = 0, offset: int = 0) -> Tensor:
    """The noise state ``[seed, offset]`` for drawing x0 like ``x1`` (on its device): its rows are rows
    [offset, offset + B) of the stream (range checked).

    Made from Python ints, so a traced caller would bake the seed in: compiled and captured code takes
    the state as an input instead (the trainer makes one per micro-batch).
    """
    return philox_state(seed, offset, x1.device, x1.shape[0])


def affine_path(x1: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None,
                rng: Tensor | None = None, std: float = 1.0, write_target: bool = True) -> tuple[Tensor, Tensor | None]:
    """(x_t, target) = (a x0 + b x1, c x0 + d x1); target None when not ``write_target``.

    x0 None draws ``std * N(0, I)`` in the kernel from the stream of ``rng`` (see :func:`noise_state`).
    """
    coefs, rng, std = _public_args(x1, {"a": a, "b": b, "c": c, "d": d}, x0, rng, std)
    x_t, target = torch.ops.fastfm.affine_path(x1, *coefs, x0, rng, std, write_target)
    return x_t, target if write_target else None


def cfm_loss(v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None, rng: Tensor | None = None,
             std: float = 1.0) -> Tensor:
    """Per-sample (1/D) |v - (c x0 + d x1)|^2 in fp32, differentiable in v; x0 and the target never stored."""
    coefs, rng, std = _public_args(x1, {"c": c, "d": d}, x0, rng, std, v)
    return torch.ops.fastfm.cfm_loss(v, x1, *coefs, x0, rng, std)


def cfm_loss_grad(grad: Tensor, v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None,
                  rng: Tensor | None = None, std: float = 1.0) -> Tensor:
    """dL/dv = grad[b] 2 (v - (c x0 + d x1)) / D in v's dtype for upstream per-sample gradients ``grad`` (B,)."""
    (grad, c, d), rng, std = _public_args(x1, {"grad": grad, "c": c, "d": d}, x0, rng, std, v)
    return torch.ops.fastfm.cfm_loss_grad(grad, v, x1, c, d, x0, rng, std)
