"""The engine's hot ops as torch.library custom ops, one op per computation, dispatched by device.

    fastfm::affine_path(x1, a, b, c, d, x0?, rng?, std, write_target) -> (x_t, target)
    fastfm::cfm_loss(v, x1, c, d, x0?, rng?, std) -> per-sample loss (B,), differentiable in v
    fastfm::cfm_loss_grad(grad, v, x1, c, d, x0?, rng?, std) -> dL/dv

Backends (``FASTFM_KERNELS`` = auto | reference | cpp | triton; auto picks Triton for CUDA
tensors and the C++ extension for CPU tensors, the reference where those are missing), all with
this one signature: the Triton launchers run inside a ``triton_op`` so torch.compile and
torch.export see the kernels; the C++ kernels and the reference sit behind opaque
``fastfm::*_cpp`` / ``fastfm::*_reference`` ops with fake implementations, so a compiled graph
never inlines the reference's Philox arithmetic (inductor does not finish compiling it).
With x0 = None the noise x0 = std * N(0, I) is drawn inside the kernel from the Philox stream of
``rng``, the int64 tensor [seed, offset] on the data's device (kernels/rng.py; a shard of a batch
draws its rows of the whole batch's noise at its offset), so the noise is never read from or
written to memory, and a new seed is new data to a compiled or CUDA-graph-captured step.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from fastfm.kernels import cpu, reference
from fastfm.kernels.rng import philox_state

try:
    from fastfm.kernels import triton_kernels
    from torch.library import triton_op as _define
except ImportError:  # no triton: the same ops as plain custom ops
    triton_kernels = None
    _define = torch.library.custom_op

BACKENDS = ("auto", "reference", "cpp", "triton")


def backend_for(device: torch.device) -> str:
    """The backend that serves tensors on ``device`` under the current FASTFM_KERNELS setting."""
    choice = os.environ.get("FASTFM_KERNELS", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"FASTFM_KERNELS={choice!r} is not a backend; choose one of {BACKENDS}")
    if choice == "auto":
        if device.type == "cuda" and triton_kernels is not None:
            return "triton"
        return "cpp" if device.type == "cpu" and cpu.available() else "reference"
    if choice == "cpp" and (device.type != "cpu" or not cpu.available()):
        raise ValueError(f"FASTFM_KERNELS=cpp needs CPU tensors and the built extension fastfm._C (device {device})")
    if choice == "triton" and triton_kernels is None:
        raise ValueError("FASTFM_KERNELS=triton needs the triton package")
    return choice


# ---------------------------------------------------------------- opaque backends (C++, reference)

def _fake_path(x1: Tensor, write_target: bool) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x1), torch.empty_like(x1) if write_target else x1.new_empty(0)


def _fake_loss(v: Tensor) -> Tensor:
    return v.new_empty(v.shape[0], dtype=torch.float32)


def _register_opaque(name: str, backend) -> None:
    """``fastfm::{affine_path,cfm_loss,cfm_loss_grad}_<name>``: ``backend``'s functions as opaque custom ops."""

    @torch.library.custom_op(f"fastfm::affine_path_{name}", mutates_args=())
    def path_op(x1: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, x0: Optional[Tensor], rng: Optional[Tensor],
                std: float, write_target: bool) -> tuple[Tensor, Tensor]:
        x_t, target = backend.affine_path(x1, a, b, c, d, x0, rng, std, write_target)
        return x_t, target if target is not None else x1.new_empty(0)

    @torch.library.custom_op(f"fastfm::cfm_loss_{name}", mutates_args=())
    def loss_op(v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Optional[Tensor], rng: Optional[Tensor],
                std: float) -> Tensor:
        return backend.cfm_loss(v, x1, c, d, x0, rng, std)

    @torch.library.custom_op(f"fastfm::cfm_loss_grad_{name}", mutates_args=())
    def grad_op(grad: Tensor, v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Optional[Tensor],
                rng: Optional[Tensor], std: float) -> Tensor:
        return backend.cfm_loss_grad(grad, v, x1, c, d, x0, rng, std)

    path_op.register_fake(lambda x1, a, b, c, d, x0, rng, std, write_target: _fake_path(x1, write_target))
    loss_op.register_fake(lambda v, x1, c, d, x0, rng, std: _fake_loss(v))
    grad_op.register_fake(lambda grad, v, x1, c, d, x0, rng, std: torch.empty_like(v))


_register_opaque("cpp", cpu)
_register_opaque("reference", reference)


# ---------------------------------------------------------------- public ops

def _opaque(backend: str, op: str):
    return getattr(torch.ops.fastfm, f"{op}_{backend}")


def _affine_path_impl(x1: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, x0: Optional[Tensor],
                      rng: Optional[Tensor], std: float, write_target: bool) -> tuple[Tensor, Tensor]:
    backend = backend_for(x1.device)
    if backend != "triton":
        return _opaque(backend, "affine_path")(x1, a, b, c, d, x0, rng, std, write_target)
    x_t, target = triton_kernels.affine_path(x1, a, b, c, d, x0, rng, std, write_target)
    return x_t, target if target is not None else x1.new_empty(0)


def _cfm_loss_impl(v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Optional[Tensor], rng: Optional[Tensor],
                   std: float) -> Tensor:
    backend = backend_for(v.device)
    if backend != "triton":
        return _opaque(backend, "cfm_loss")(v, x1, c, d, x0, rng, std)
    return triton_kernels.cfm_loss(v, x1, c, d, x0, rng, std)


def _cfm_loss_grad_impl(grad: Tensor, v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Optional[Tensor],
                        rng: Optional[Tensor], std: float) -> Tensor:
    backend = backend_for(v.device)
    if backend != "triton":
        return _opaque(backend, "cfm_loss_grad")(grad, v, x1, c, d, x0, rng, std)
    return triton_kernels.cfm_loss_grad(grad, v, x1, c, d, x0, rng, std)


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


def _check_batch(x: Tensor, **coefs: Tensor) -> None:
    for name, co in coefs.items():
        if co.shape != (x.shape[0],):
            raise ValueError(f"coefficient {name} must have shape ({x.shape[0]},), got {tuple(co.shape)}")


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
    _check_batch(x1, a=a, b=b, c=c, d=d)
    coefs = [co.float().contiguous() for co in (a, b, c, d)]
    x_t, target = torch.ops.fastfm.affine_path(x1, *coefs, x0, None if x0 is not None else rng, std, write_target)
    return x_t, target if write_target else None


def cfm_loss(v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None, rng: Tensor | None = None,
             std: float = 1.0) -> Tensor:
    """Per-sample (1/D) |v - (c x0 + d x1)|^2 in fp32, differentiable in v; x0 and the target never stored."""
    _check_batch(v, c=c, d=d)
    return torch.ops.fastfm.cfm_loss(v, x1, c.float().contiguous(), d.float().contiguous(), x0,
                                     None if x0 is not None else rng, std)
