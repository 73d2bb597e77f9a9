"""Fused CPU kernels (C++/OpenMP, ``fastfm._C``), installed as ``fastfm.kernels.cpu``.

Same ops and noise stream as :mod:`fastfm.kernels.reference` (the spec), without materialising
the noise or the target: x0 is either given or regenerated from the stream of kernels/rng.py, read
by the extension itself from ``rng = [seed, offset]``, the int64 CPU tensor: element (r, j) of x0 is
std times word j % 4 of the Box-Muller normals of Philox4x32-10 keyed by the seed at counter
(j // 4, offset + r), where offset counts rows.

Tensors: CPU, batch first (B, ...), D = numel / B elements per sample; x1, x0 and v share one
dtype among float32, float64 and bfloat16 (bf16 computed in fp32; fp64 in double with the noise
drawn in fp32 and widened). Coefficients a, b, c, d and the upstream ``grad`` are float32 of
shape (B,). These functions take validated arguments: fastfm.kernels.ops checks them (and raises
KernelArgumentError) before it calls them. Non-contiguous inputs are made contiguous; contiguous
ones are passed without copies as raw data pointers to the extension, which releases the GIL and
runs OpenMP threads (``OMP_NUM_THREADS`` or :func:`set_num_threads`).

Determinism: noise, x_t, target and gradients depend only on the inputs and the state; the loss
reduction uses a work split that depends on (B, D) only, so every result is bitwise the same for
any number of threads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastfm.kernels.rng import philox_state

try:
    from fastfm import _C
except ImportError as _e:  # not built: available() is False and the ops raise
    _C = None
    _IMPORT_ERROR: ImportError | None = _e
else:
    _IMPORT_ERROR = None

__all__ = ["affine_path", "available", "cfm_loss", "cfm_loss_grad", "get_num_threads", "randn", "set_num_threads"]

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}


def available() -> bool:
    """True if the compiled extension ``fastfm._C`` imports."""
    return _C is not None


def _lib():
    if _C is None:
        raise RuntimeError(f"fastfm._C is not built (pip install -e .): {_IMPORT_ERROR}")
    return _C


def _alloc(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Output allocation (uninitialised: the kernels write every element; tests poison this)."""
    return torch.empty(shape, dtype=dtype)


def _contig(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _noise_args(x0: Tensor | None, rng: Tensor | None, std: float) -> tuple[Tensor | None, Tensor | None, float]:
    """(x0, None, 1) when x0 is given; (None, the state, std) when the kernel draws it."""
    if x0 is not None:
        return _contig(x0), None, 1.0
    return None, _contig(rng), float(std)


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _sizes(x1: Tensor) -> tuple[int, int]:
    batch = x1.shape[0]
    return batch, (x1.numel() // batch if batch else 0)


def affine_path(x1: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None,
                rng: Tensor | None = None, std: float = 1.0, write_target: bool = True) -> tuple[Tensor, Tensor | None]:
    """(x_t, target) = (a x0 + b x1, c x0 + d x1) in x1's dtype and shape.

    x0 is given, or drawn as ``std`` times the stream of ``rng = [seed, offset]``. ``write_target=False`` skips
    the target entirely and returns (x_t, None).
    """
    lib = _lib()
    x1, a, b, c, d = (_contig(t) for t in (x1, a, b, c, d))
    batch, dim = _sizes(x1)
    x0, rng, std = _noise_args(x0, rng, std)
    x_t = _alloc(tuple(x1.shape), x1.dtype)
    target = _alloc(tuple(x1.shape), x1.dtype) if write_target else None
    lib.affine_path(_ptr(x_t), _ptr(target), _ptr(x1), _ptr(x0), _ptr(a), _ptr(b), _ptr(c), _ptr(d),
                    batch, dim, _DTYPE_CODES[x1.dtype], _ptr(rng), std)
    return x_t, target


def cfm_loss(v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None, rng: Tensor | None = None,
             std: float = 1.0) -> Tensor:
    """Per-sample loss (B,) float32: mean over non-batch dims of (v - (c x0 + d x1))^2 (double accumulation)."""
    lib = _lib()
    v, x1, c, d = (_contig(t) for t in (v, x1, c, d))
    batch, dim = _sizes(x1)
    x0, rng, std = _noise_args(x0, rng, std)
    out = _alloc((batch,), torch.float32)
    lib.cfm_loss(_ptr(out), _ptr(v), _ptr(x1), _ptr(x0), _ptr(c), _ptr(d), batch, dim, _DTYPE_CODES[x1.dtype],
                 _ptr(rng), std)
    return out


def cfm_loss_grad(grad: Tensor, v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None,
                  rng: Tensor | None = None, std: float = 1.0) -> Tensor:
    """dL/dv = grad[b] 2 (v - (c x0 + d x1)) / D in v's dtype; the noise is regenerated, never stored."""
    lib = _lib()
    grad, v, x1, c, d = (_contig(t) for t in (grad, v, x1, c, d))
    batch, dim = _sizes(x1)
    x0, rng, std = _noise_args(x0, rng, std)
    out = _alloc(tuple(v.shape), v.dtype)
    lib.cfm_loss_grad(_ptr(out), _ptr(grad), _ptr(v), _ptr(x1), _ptr(x0), _ptr(c), _ptr(d), batch, dim,
                      _DTYPE_CODES[x1.dtype], _ptr(rng), std)
    return out


def randn(seed: int, rows: int, dim: int, offset: int = 0) -> Tensor:
    """Standard normals (float32, shape (rows, dim)) of the seed's stream, rows [offset, offset + rows)."""
    lib = _lib()
    state = philox_state(seed, offset, "cpu", rows)  # checks rows and offset, normalises the seed
    out = _alloc((rows, dim), torch.float32)
    lib.randn(_ptr(out), rows, dim, _ptr(state))
    return out


def set_num_threads(n: int) -> None:
    """OpenMP threads for the kernels called from this thread (default: OMP_NUM_THREADS / all cores).

    With torch imported first, the extension binds to torch's bundled libgomp (same soname), so the
    two share one thread pool and ``torch.set_num_threads`` also sets the kernels' thread count.
    """
    _lib().set_num_threads(int(n))


def get_num_threads() -> int:
    return _lib().get_max_threads()
