"""Fused CPU kernels (C++/OpenMP, ``fastfm._C``), installed as ``fastfm.kernels.cpu``.

Same ops and noise stream as :mod:`fastfm.kernels.reference` (the spec), without materialising
the noise or the target: x0 is either given or regenerated from the Philox4x32-10 stream of the
reference (element (r, j) of x0 = std * word j mod 4 of the Box-Muller normals of
Philox(counter=(j // 4, offset + r, 0, 0), key=seed)), with ``rng = [seed, offset]`` the int64 CPU
tensor of kernels/rng.py, read by the extension itself.

Tensors: CPU, batch first (B, ...), D = numel / B elements per sample; x1, x0 and v share one
dtype among float32, float64 and bfloat16 (bf16 computed in fp32; fp64 in double with the noise
drawn in fp32 and widened). Coefficients a, b, c, d and the upstream ``grad`` are float32 of
shape (B,). Non-contiguous inputs are made contiguous; contiguous ones are passed without copies
as raw data pointers to the extension, which releases the GIL and runs OpenMP threads
(``OMP_NUM_THREADS`` or :func:`set_num_threads`).

Determinism: noise, x_t, target and gradients depend only on the inputs and the state; the loss
reduction uses a work split that depends on (B, D) only, so every result is bitwise the same for
any number of threads.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from fastfm.kernels.rng import check_state, check_stream, signed_seed

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


def _tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004 (API: ValueError)
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got device {t.device}")
    return t


def _contig(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _data(name: str, t: object) -> Tensor:
    """x1: a CPU float32/float64/bfloat16 tensor with a batch dimension."""
    t = _tensor(name, t)
    if t.dtype not in _DTYPE_CODES:
        raise ValueError(f"{name} must be float32, float64 or bfloat16, got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (B, ...), got a 0-d tensor")
    return _contig(t)


def _like(name: str, t: object, x1: Tensor) -> Tensor:
    """x0 / v: same dtype and shape as x1."""
    t = _tensor(name, t)
    if t.dtype != x1.dtype:
        raise ValueError(f"{name} dtype {t.dtype} does not match x1 dtype {x1.dtype}")
    if t.shape != x1.shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} does not match x1 shape {tuple(x1.shape)}")
    return _contig(t)


def _coef(name: str, t: object, batch: int) -> Tensor:
    """Per-sample coefficient: float32 of shape (B,)."""
    t = _tensor(name, t)
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32 (per-sample coefficient), got {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one value per sample), got {tuple(t.shape)}")
    return _contig(t)


def _noise_args(x0: object, x1: Tensor, rng: object, std: object) -> tuple[Tensor | None, Tensor | None, float]:
    """(x0, None, 1) when x0 is given; (None, the checked state, std) when the kernel draws it."""
    if x0 is not None:
        return _like("x0", x0, x1), None, 1.0
    return None, check_state(rng, x1), float(std)


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
    x1 = _data("x1", x1)
    batch, dim = _sizes(x1)
    a, b, c, d = (_coef(n, t, batch) for n, t in (("a", a), ("b", b), ("c", c), ("d", d)))
    x0, rng, std = _noise_args(x0, x1, rng, std)
    x_t = _alloc(tuple(x1.shape), x1.dtype)
    target = _alloc(tuple(x1.shape), x1.dtype) if write_target else None
    lib.affine_path(_ptr(x_t), _ptr(target), _ptr(x1), _ptr(x0), _ptr(a), _ptr(b), _ptr(c), _ptr(d),
                    batch, dim, _DTYPE_CODES[x1.dtype], _ptr(rng), std)
    return x_t, target


def cfm_loss(v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None, rng: Tensor | None = None,
             std: float = 1.0) -> Tensor:
    """Per-sample loss (B,) float32: mean over non-batch dims of (v - (c x0 + d x1))^2 (double accumulation)."""
    lib = _lib()
    x1 = _data("x1", x1)
    v = _like("v", v, x1)
    batch, dim = _sizes(x1)
    c, d = _coef("c", c, batch), _coef("d", d, batch)
    x0, rng, std = _noise_args(x0, x1, rng, std)
    out = _alloc((batch,), torch.float32)
    lib.cfm_loss(_ptr(out), _ptr(v), _ptr(x1), _ptr(x0), _ptr(c), _ptr(d), batch, dim, _DTYPE_CODES[x1.dtype],
                 _ptr(rng), std)
    return out


def cfm_loss_grad(grad: Tensor, v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None,
                  rng: Tensor | None = None, std: float = 1.0) -> Tensor:
    """dL/dv = grad[b] 2 (v - (c x0 + d x1)) / D in v's dtype; the noise is regenerated, never stored."""
    lib = _lib()
    x1 = _data("x1", x1)
    v = _like("v", v, x1)
    batch, dim = _sizes(x1)
    grad = _coef("grad", grad, batch)
    c, d = _coef("c", c, batch), _coef("d", d, batch)
    x0, rng, std = _noise_args(x0, x1, rng, std)
    out = _alloc(tuple(v.shape), v.dtype)
    lib.cfm_loss_grad(_ptr(out), _ptr(grad), _ptr(v), _ptr(x1), _ptr(x0), _ptr(c), _ptr(d), batch, dim,
                      _DTYPE_CODES[x1.dtype], _ptr(rng), std)
    return out


def randn(seed: int, rows: int, dim: int, offset: int = 0) -> Tensor:
    """Standard normals (float32, shape (rows, dim)) of the seed's stream, rows [offset, offset + rows)."""
    lib = _lib()
    rows, dim, offset = operator.index(rows), operator.index(dim), operator.index(offset)
    if rows < 0 or dim < 0:
        raise ValueError(f"rows and dim must be >= 0, got {rows} and {dim}")
    check_stream(offset, rows)
    out = _alloc((rows, dim), torch.float32)
    lib.randn(_ptr(out), rows, dim, signed_seed(seed) & (2**64 - 1), offset)
    return out


def set_num_threads(n: int) -> None:
    """OpenMP threads for the kernels called from this thread (default: OMP_NUM_THREADS / all cores).

    With torch imported first, the extension binds to torch's bundled libgomp (same soname), so the
    two share one thread pool and ``torch.set_num_threads`` also sets the kernels' thread count.
    """
    _lib().set_num_threads(int(n))


def get_num_threads() -> int:
    return _lib().get_max_threads()
