"""Triton kernels for the affine probability path and the CFM loss (spec: ``kernels/reference.py``).

Three kernels, all memory-bound, all math in fp32 (loads are upcast, stores cast to the output dtype):

* ``affine_path``   x_t = a x0 + b x1 and target = c x0 + d x1 with per-sample coefficients (B,).
* ``cfm_loss``      per-sample (1/D) sum (v - c x0 - d x1)^2 -> (B,) fp32; target never materialised.
* ``cfm_loss_grad`` g_b * 2 (v - target) / D in v's dtype; the noise is regenerated, not stored.

Noise: when ``x0`` is None the source sample is drawn inside the kernel as
``std * tl.randn(seed, offset + i)`` with ``i`` the int32 flat (row-major) element index into x1 — the
same Philox4x32-10 stream as ``reference.randn`` — and is never read from or written to memory. The
seed and offset are read inside the kernel from the int64 state tensor ``rng = [seed, offset]``
(kernels/rng.py): every scalar a launch passes is a shape-derived int32 or a float, so a compiled
graph never specialises on (or recompiles for) a seed, and a CUDA graph replays with a new one.
Kernels specialise on the constexpr ``HAS_X0`` so the noise-only variant never touches an x0 or rng pointer.

Launches go through ``torch.library.wrap_triton`` so the launchers can be called inside a
``torch.library.triton_op`` and traced by torch.compile / torch.export.

Unused pointer arguments (x0 when ``HAS_X0`` is False, rng when it is True, target when ``WRITE_TARGET``
is False) get an input that is only read, so tracing never sees an output passed twice.

Interpreter mode (CPU testing): Triton picks interpreter or compiler when ``@triton.jit`` decorates a
function, its own library (tl.randn, ...) included, so ``TRITON_INTERPRET=1`` must be set before
triton is imported (tests/conftest.py does this on machines without CUDA).
"""

from __future__ import annotations

import os

import torch
import triton  # an ImportError here is the only way this module fails to import without triton
import triton.language as tl
from torch import Tensor

from fastfm.kernels.rng import check_state

try:  # torch >= 2.6
    from torch.library import wrap_triton
except ImportError as exc:  # pragma: no cover - older torch
    raise ImportError("fastfm.kernels.triton_kernels needs torch.library.wrap_triton (torch >= 2.6)") from exc

__all__ = ["affine_path", "cfm_loss", "cfm_loss_grad"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_NUMEL = 2**31 - 1  # offsets into the noise stream (and pointer offsets) are int32

# Elements per program of the elementwise kernels (path op, loss backward).
_BLOCK = 1024
# Upper bound of the per-row chunk of the loss forward; small rows use the next power of two >= D.
_LOSS_BLOCK_MAX = 1024
_LOSS_BLOCK_MIN = 16


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _source(x0_ptr, rng_ptr, offs, mask, std, HAS_X0: tl.constexpr):
    """x0 at flat offsets: loaded, or std * tl.randn(seed, offset + offs) with [seed, offset] = rng
    (int64; the offset is an int32 stream counter) when no x0 is stored."""
    if HAS_X0:  # if/else, not an early return: the compiler must not see the noise branch at all
        z = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        seed = tl.load(rng_ptr)
        noise_offset = tl.load(rng_ptr + 1).to(tl.int32)
        z = std * tl.randn(seed, noise_offset + offs)
    return z


@triton.jit
def _affine_path_kernel(x1_ptr, x0_ptr, rng_ptr, a_ptr, b_ptr, c_ptr, d_ptr, xt_ptr, tgt_ptr,
                        N, D, std,
                        HAS_X0: tl.constexpr, WRITE_TARGET: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = pid * BLOCK  # <= N - 1 < 2^31: no overflow
    idx = tl.arange(0, BLOCK)
    mask = idx < N - start  # lanes past the end (whose int32 offsets could wrap) are masked off
    offs = start + idx
    row = offs // D
    x1 = tl.load(x1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = _source(x0_ptr, rng_ptr, offs, mask, std, HAS_X0)
    a = tl.load(a_ptr + row, mask=mask, other=0.0)
    b = tl.load(b_ptr + row, mask=mask, other=0.0)
    tl.store(xt_ptr + offs, (a * z + b * x1).to(xt_ptr.dtype.element_ty), mask=mask)
    if WRITE_TARGET:
        c = tl.load(c_ptr + row, mask=mask, other=0.0)
        d = tl.load(d_ptr + row, mask=mask, other=0.0)
        tl.store(tgt_ptr + offs, (c * z + d * x1).to(tgt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cfm_loss_partial_kernel(v_ptr, x1_ptr, x0_ptr, rng_ptr, c_ptr, d_ptr, part_ptr,
                             D, NB, std,
                             HAS_X0: tl.constexpr, BLOCK: tl.constexpr):
    # One program per (row, chunk) pair, flattened to a 1-D grid of B * NB programs (no 65535
    # limit on either factor); writes the chunk's sum of squared residuals to part[row, chunk].
    pid = tl.program_id(0)
    row = pid // NB
    blk = pid - row * NB
    start = blk * BLOCK  # <= D - 1
    idx = tl.arange(0, BLOCK)
    mask = idx < D - start
    offs = row * D + start + idx  # row * D + (valid col) < N < 2^31
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = _source(x0_ptr, rng_ptr, offs, mask, std, HAS_X0)
    c = tl.load(c_ptr + row)
    d = tl.load(d_ptr + row)
    r = v - (c * z + d * x1)
    r = tl.where(mask, r, 0.0)
    tl.store(part_ptr + pid, tl.sum(r * r, axis=0))


@triton.jit
def _cfm_loss_grad_kernel(g_ptr, v_ptr, x1_ptr, x0_ptr, rng_ptr, c_ptr, d_ptr, out_ptr,
                          N, D, scale, std,
                          HAS_X0: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = pid * BLOCK
    idx = tl.arange(0, BLOCK)
    mask = idx < N - start
    offs = start + idx
    row = offs // D
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = _source(x0_ptr, rng_ptr, offs, mask, std, HAS_X0)
    g = tl.load(g_ptr + row, mask=mask, other=0.0)
    c = tl.load(c_ptr + row, mask=mask, other=0.0)
    d = tl.load(d_ptr + row, mask=mask, other=0.0)
    r = v - (c * z + d * x1)
    tl.store(out_ptr + offs, ((g * scale) * r).to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Lazy decoration and launching
# ----------------------------------------------------------------------------------------------


def interpret_mode() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET``)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # pragma: no cover - triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Launch through wrap_triton, so torch.compile and torch.export trace the kernel."""
    wrap_triton(kernel)[grid](*args, **kwargs)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocation of every buffer the kernels write (tests monkeypatch it to poison outputs)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_data(name: str, t, ref: Tensor | None = None, ref_name: str = "x1") -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ref is None:
        if t.dim() < 1:
            raise ValueError(f"{name} must have a leading batch dimension, got a 0-d tensor")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported dtype {t.dtype} for {name}; expected one of float32, bfloat16, float16")
        if t.numel() > MAX_NUMEL:
            raise ValueError(f"{name} has {t.numel()} elements; the kernels index elements (and the noise "
                             f"stream) with int32 offsets, so numel must be < 2**31")
        if t.device.type == "cpu" and not interpret_mode():
            raise ValueError(f"{name} is on the CPU: the Triton kernels need GPU tensors "
                             f"(or TRITON_INTERPRET=1 set before the launch to run them in the interpreter)")
        return
    if t.device != ref.device:
        raise ValueError(f"device mismatch: {name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise ValueError(f"dtype mismatch: {name} is {t.dtype} but {ref_name} is {ref.dtype}")
    if t.shape != ref.shape:
        raise ValueError(f"shape mismatch: {name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}")


def _check_coef(name: str, t, x1: Tensor) -> Tensor:
    """A per-sample coefficient: shape (B,), x1's device, floating; returned as contiguous fp32."""
    if not isinstance(t, Tensor):
        raise TypeError(f"coefficient {name} must be a torch.Tensor of shape (B,), got {type(t).__name__}")
    if t.device != x1.device:
        raise ValueError(f"device mismatch: coefficient {name} is on {t.device} but x1 is on {x1.device}")
    if tuple(t.shape) != (x1.shape[0],):
        raise ValueError(f"coefficient {name} must have shape (B,) = ({x1.shape[0]},), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"coefficient {name} must be a floating tensor (float32), got {t.dtype}")
    return t.to(torch.float32).contiguous()


def _check_std(std) -> float:
    if isinstance(std, Tensor):
        raise TypeError("std must be a Python float, not a tensor")
    try:
        return float(std)
    except (TypeError, ValueError):
        raise TypeError(f"std must be a float, got {type(std).__name__}") from None


def _prepare(x1: Tensor, x0: Tensor | None, v: Tensor | None, rng, std):
    """Checked, contiguous (x1, x0 or None, v or None, the pointer for rng, B, N, D, std)."""
    _check_data("x1", x1)
    if x0 is not None:
        _check_data("x0", x0, x1)
    if v is not None:
        _check_data("v", v, x1)
    B = x1.shape[0]
    N = x1.numel()
    D = N // B if B else 0
    x1c = x1.contiguous()
    x0c = x0.contiguous() if x0 is not None else None
    vc = v.contiguous() if v is not None else None
    state = check_state(rng, x1) if x0 is None else x1c  # never read when x0 is given
    return x1c, x0c, vc, state, B, N, D, _check_std(std)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def affine_path(x1: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None,
                rng: Tensor | None = None, std: float = 1.0, write_target: bool = True) -> tuple[Tensor, Tensor | None]:
    """(x_t, target) = (a x0 + b x1, c x0 + d x1) in x1's dtype/shape; target is None if not write_target.

    ``x0`` None draws ``std * randn`` in the kernel from the stream of ``rng = [seed, offset]`` (kernels/rng.py).
    """
    x1c, x0c, _, state, _, N, D, std = _prepare(x1, x0, None, rng, std)
    a, b = _check_coef("a", a, x1), _check_coef("b", b, x1)
    if write_target:
        c, d = _check_coef("c", c, x1), _check_coef("d", d, x1)
    else:  # never read by the kernel; any (B,) fp32 pointer will do
        c, d = a, b
    x_t = _empty(x1.shape, x1.dtype, x1.device)
    target = _empty(x1.shape, x1.dtype, x1.device) if write_target else None
    if N == 0:
        return x_t, target
    grid = (triton.cdiv(N, _BLOCK),)
    _launch(_affine_path_kernel, grid,
            x1c, x0c if x0c is not None else x1c, state, a, b, c, d, x_t, target if write_target else x1c,
            N, D, std,
            HAS_X0=x0c is not None, WRITE_TARGET=bool(write_target), BLOCK=_BLOCK)
    return x_t, target


def _loss_block(D: int) -> int:
    return min(_LOSS_BLOCK_MAX, max(_LOSS_BLOCK_MIN, triton.next_power_of_2(D)))


def cfm_loss(v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None, rng: Tensor | None = None,
             std: float = 1.0) -> Tensor:
    """Per-sample CFM loss (B,) fp32: mean over non-batch dims of (v - c x0 - d x1)^2.

    Deterministic: per-(row, chunk) partial sums to a (B, nblocks) fp32 buffer, then ``sum(1) / D``.
    """
    x1c, x0c, vc, state, B, N, D, std = _prepare(x1, x0, v, rng, std)
    c, d = _check_coef("c", c, x1), _check_coef("d", d, x1)
    block = _loss_block(D)
    nb = triton.cdiv(D, block)
    partial = _empty((B, nb), torch.float32, x1.device)
    if N > 0:
        _launch(_cfm_loss_partial_kernel, (B * nb,),
                vc, x1c, x0c if x0c is not None else x1c, state, c, d, partial,
                D, nb, std,
                HAS_X0=x0c is not None, BLOCK=block)
    return partial.sum(1) / D


def cfm_loss_grad(grad: Tensor, v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None,
                  rng: Tensor | None = None, std: float = 1.0) -> Tensor:
    """dL/dv = grad[b] * 2 (v - c x0 - d x1) / D in v's dtype/shape (noise regenerated from ``rng``)."""
    x1c, x0c, vc, state, _, N, D, std = _prepare(x1, x0, v, rng, std)
    g = _check_coef("grad", grad, x1)
    c, d = _check_coef("c", c, x1), _check_coef("d", d, x1)
    out = _empty(v.shape, v.dtype, v.device)
    if N == 0:
        return out
    _launch(_cfm_loss_grad_kernel, (triton.cdiv(N, _BLOCK),),
            g, vc, x1c, x0c if x0c is not None else x1c, state, c, d, out,
            N, D, 2.0 / D, std,
            HAS_X0=x0c is not None, BLOCK=_BLOCK)
    return out
