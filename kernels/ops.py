"""The engine's hot ops as torch.library custom ops, one op per computation, dispatched by device.

    fastfm::affine_path(x1, a, b, c, d, x0?, seed, std, write_target, offset) -> (x_t, target)
    fastfm::cfm_loss(v, x1, c, d, x0?, seed, std, offset) -> per-sample loss (B,), differentiable in v

Backends (``FASTFM_KERNELS`` = auto | reference | cpp | triton; auto picks Triton for CUDA
tensors and the C++ extension for CPU tensors, the reference where those are missing):
the Triton launchers run inside a ``triton_op`` so torch.compile and torch.export see the
kernels; the C++ kernels sit behind opaque ``fastfm::*_cpp`` ops with fake implementations.
With x0 = None the noise x0 = std * N(0, I) is drawn inside the kernel from the seed's
Philox stream (kernels/reference.py) starting at element ``offset`` (a shard of a batch draws
its rows of the whole batch's noise), so it is never read from or written to memory.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from fastfm.kernels import cpu, reference

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


# ---------------------------------------------------------------- C++ (opaque ops)

@torch.library.custom_op("fastfm::affine_path_cpp", mutates_args=())
def _affine_path_cpp(x1: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, x0: Optional[Tensor], seed: int,
                     std: float, write_target: bool, offset: int) -> tuple[Tensor, Tensor]:
    x_t, target = cpu.affine_path(x1, a, b, c, d, x0, seed, std, write_target, offset)
    return x_t, target if target is not None else x1.new_empty(0)


@_affine_path_cpp.register_fake
def _(x1, a, b, c, d, x0, seed, std, write_target, offset):
    return torch.empty_like(x1), torch.empty_like(x1) if write_target else x1.new_empty(0)


@torch.library.custom_op("fastfm::cfm_loss_cpp", mutates_args=())
def _cfm_loss_cpp(v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Optional[Tensor], seed: int,
                  std: float, offset: int) -> Tensor:
    return cpu.cfm_loss(v, x1, c, d, x0, seed, std, offset)


@_cfm_loss_cpp.register_fake
def _(v, x1, c, d, x0, seed, std, offset):
    return v.new_empty(v.shape[0], dtype=torch.float32)


@torch.library.custom_op("fastfm::cfm_loss_grad_cpp", mutates_args=())
def _cfm_loss_grad_cpp(grad: Tensor, v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Optional[Tensor], seed: int,
                       std: float, offset: int) -> Tensor:
    return cpu.cfm_loss_grad(grad, v, x1, c, d, x0, seed, std, offset)


@_cfm_loss_grad_cpp.register_fake
def _(grad, v, x1, c, d, x0, seed, std, offset):
    return torch.empty_like(v)


# ---------------------------------------------------------------- public ops

def _affine_path_impl(x1: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, x0: Optional[Tensor], seed: int,
                      std: float, write_target: bool, offset: int) -> tuple[Tensor, Tensor]:
    backend = backend_for(x1.device)
    if backend == "cpp":
        return torch.ops.fastfm.affine_path_cpp(x1, a, b, c, d, x0, seed, std, write_target, offset)
    if backend == "triton":
        x_t, target = triton_kernels.affine_path(x1, a, b, c, d, x0, seed, std, write_target, offset)
    else:
        x_t, target = reference.affine_path(x1, a, b, c, d, x0, seed, std, offset)
        target = target if write_target else None
    return x_t, target if target is not None else x1.new_empty(0)


def _cfm_loss_impl(v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Optional[Tensor], seed: int,
                   std: float, offset: int) -> Tensor:
    backend = backend_for(v.device)
    if backend == "cpp":
        return torch.ops.fastfm.cfm_loss_cpp(v, x1, c, d, x0, seed, std, offset)
    if backend == "triton":
        return triton_kernels.cfm_loss(v, x1, c, d, x0, seed, std, offset)
    return reference.cfm_loss(v, x1, c, d, x0, seed, std, offset)


def _cfm_loss_grad_impl(grad: Tensor, v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Optional[Tensor], seed: int,
                        std: float, offset: int) -> Tensor:
    backend = backend_for(v.device)
    if backend == "cpp":
        return torch.ops.fastfm.cfm_loss_grad_cpp(grad, v, x1, c, d, x0, seed, std, offset)
    if backend == "triton":
        return triton_kernels.cfm_loss_grad(grad, v, x1, c, d, x0, seed, std, offset)
    return reference.cfm_loss_grad(grad, v, x1, c, d, x0, seed, std, offset)


_affine_path_op = _define("fastfm::affine_path", _affine_path_impl, mutates_args=())
_cfm_loss_op = _define("fastfm::cfm_loss", _cfm_loss_impl, mutates_args=())
_cfm_loss_grad_op = _define("fastfm::cfm_loss_grad", _cfm_loss_grad_impl, mutates_args=())

if triton_kernels is None:
    _affine_path_op.register_fake(
        lambda x1, a, b, c, d, x0, seed, std, write_target, offset:
        (torch.empty_like(x1), torch.empty_like(x1) if write_target else x1.new_empty(0)))
    _cfm_loss_op.register_fake(lambda v, x1, c, d, x0, seed, std, offset: v.new_empty(v.shape[0], dtype=torch.float32))
    _cfm_loss_grad_op.register_fake(lambda grad, v, x1, c, d, x0, seed, std, offset: torch.empty_like(v))


def _loss_setup(ctx, inputs, output) -> None:
    v, x1, c, d, x0, seed, std, offset = inputs
    ctx.save_for_backward(v, x1, c, d, x0)
    ctx.seed, ctx.std, ctx.offset = seed, std, offset


def _loss_backward(ctx, grad: Tensor):
    v, x1, c, d, x0 = ctx.saved_tensors
    dv = torch.ops.fastfm.cfm_loss_grad(grad.float().contiguous(), v, x1, c, d, x0, ctx.seed, ctx.std, ctx.offset)
    return dv, None, None, None, None, None, None, None


_cfm_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


def _check_batch(x: Tensor, **coefs: Tensor) -> None:
    for name, co in coefs.items():
        if co.shape != (x.shape[0],):
            raise ValueError(f"coefficient {name} must have shape ({x.shape[0]},), got {tuple(co.shape)}")


def affine_path(x1: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None, seed: int = 0,
                std: float = 1.0, write_target: bool = True, offset: int = 0) -> tuple[Tensor, Tensor | None]:
    """(x_t, target) = (a x0 + b x1, c x0 + d x1); target None when not ``write_target``."""
    _check_batch(x1, a=a, b=b, c=c, d=d)
    coefs = [co.float().contiguous() for co in (a, b, c, d)]
    x_t, target = torch.ops.fastfm.affine_path(x1, *coefs, x0, seed, std, write_target, offset)
    return x_t, target if write_target else None


def cfm_loss(v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None, seed: int = 0,
             std: float = 1.0, offset: int = 0) -> Tensor:
    """Per-sample (1/D) |v - (c x0 + d x1)|^2 in fp32, differentiable in v; x0 and the target never stored."""
    _check_batch(v, c=c, d=d)
    return torch.ops.fastfm.cfm_loss(v, x1, c.float().contiguous(), d.float().contiguous(), x0, seed,
                                     std, offset)
