"""Plain-PyTorch references: the spec every kernel (Triton, C++) is tested against.

Noise stream. With the state ``rng = [seed, offset]`` (an int64 tensor on the data's device,
kernels/rng.py) and x1 viewed as (B, D), element (r, j) of x0 is std times word j % 4 of the Box-Muller
normals of Philox4x32-10 keyed by the seed at counter (j // 4, offset + r), where offset counts rows:

    x0[r, j] = std * n_{j mod 4},   (w0, w1, w2, w3) = Philox4x32-10(counter = (j // 4, offset + r, 0, 0),
                                                                     key = (seed_lo, seed_hi))
    (n0, n1) = BoxMuller(w0, w1),   (n2, n3) = BoxMuller(w2, w3)

with Triton's conventions: a word becomes the uniform u = (w as int32, negatives mapped to ~w) *
4.6566127342e-10, and BoxMuller(w, w') = R (cos th, sin th), R = sqrt(-2 log max(u, 1e-7)), th = 2 pi u'.
One Philox call gives four normals (a GPU kernel spends a quarter of the integer work of one call per
element), and ``offset`` counts rows: rows [r0, r0 + m) of a batch (a DDP rank, a micro-batch) draw
those rows of the whole batch's noise with offset r0. The state is read with tensor ops (no host
sync), so the reference runs inside a CUDA graph too. Backends agree up to float rounding of
log/sqrt/cos/sin (documented tolerance: 1e-5 absolute).

The ops take validated arguments: fastfm.kernels.ops checks them for every backend (KernelArgumentError).

Ops (per-sample fp32 coefficients a, b, c, d of shape (B,), D = elements per sample):
    affine_path:    x_t = a x0 + b x1,  target = c x0 + d x1
    cfm_loss:       L_b = (1/D) sum_j (v_bj - target_bj)^2
    cfm_loss_grad:  dL/dv_bj = g_b * 2 (v_bj - target_bj) / D
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastfm.kernels.rng import philox_state, signed_seed

PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
UINT_TO_FLOAT = 4.6566127342e-10
_M32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(a * b) >> 32 and (a * b) mod 2^32 for a 32-bit constant a and uint32 values b held in int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_hi, p_lo = a_hi * b, a_lo * b
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox4x32(seed: int | Tensor, c0: Tensor, c1: Tensor, rounds: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 with counter (c0, c1, 0, 0) (broadcast together) and key from the 64-bit seed (an int64 tensor
    holding its bits, as in a state, or an int, normalised by kernels/rng.py); words as int64 in [0, 2^32)."""
    if not isinstance(seed, Tensor):
        seed = signed_seed(seed)
    c0, c1 = torch.broadcast_tensors(c0.to(torch.int64) & _M32, c1.to(torch.int64) & _M32)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(PHILOX_ROUND_A, c0)
        c0, c2 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1
        c1, c3 = lo_b, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & _M32, (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _uniform(w: Tensor) -> Tensor:
    """uint32 word -> float32 in [0, 1): reinterpret as int32, map negatives x to ~x, scale."""
    x = torch.where(w >= 2**31, w - 2**32, w)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(UINT_TO_FLOAT, dtype=torch.float32)


def _box_muller(w: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    """R cos th, R sin th with R = sqrt(-2 log max(u(w), 1e-7)), th = 2 pi u(w2) (float32)."""
    r = torch.sqrt(-2.0 * torch.log(torch.clamp_min(_uniform(w), 1.0e-7)))
    th = torch.tensor(6.283185307179586, dtype=torch.float32) * _uniform(w2)
    return r * torch.cos(th), r * torch.sin(th)


def randn(seed: int, rows: int, dim: int, device: torch.device | str = "cpu", offset: int = 0) -> Tensor:
    """Standard normals (float32, shape (rows, dim)) of the stream for ``seed``, rows [offset, offset + rows)."""
    return randn_state(philox_state(seed, offset, device, rows), rows, dim)


def randn_state(rng: Tensor, rows: int, dim: int) -> Tensor:
    """Standard normals (float32, shape (rows, dim)) of the stream of state ``rng = [seed, offset]``."""
    groups = (dim + 3) // 4
    c0 = torch.arange(groups, device=rng.device)
    c1 = torch.arange(rows, device=rng.device)[:, None] + rng[1]
    w0, w1, w2, w3 = philox4x32(rng[0], c0, c1)
    n0, n1 = _box_muller(w0, w1)
    n2, n3 = _box_muller(w2, w3)
    return torch.stack((n0, n1, n2, n3), dim=-1).reshape(rows, 4 * groups)[:, :dim]


def _bcast(c: Tensor, x: Tensor) -> Tensor:
    return c.to(x.dtype).reshape(c.shape[0], *([1] * (x.dim() - 1)))


def _math(x1: Tensor, x0: Tensor | None, rng: Tensor | None, std: float) -> tuple[Tensor, Tensor]:
    """(x0, x1) in the math dtype (fp64 for fp64 inputs, else fp32); x0 drawn from ``rng`` if not given."""
    dtype = torch.float64 if x1.dtype == torch.float64 else torch.float32
    if x0 is None:
        x0 = std * randn_state(rng, x1.shape[0], math.prod(x1.shape[1:])).reshape(x1.shape)
    return x0.to(dtype), x1.to(dtype)


def affine_path(x1: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None,
                rng: Tensor | None = None, std: float = 1.0, write_target: bool = True) -> tuple[Tensor, Tensor | None]:
    """(x_t, target) in x1's dtype, computed in fp32 (fp64 for fp64 inputs); target None if not write_target."""
    z, x = _math(x1, x0, rng, std)
    x_t = _bcast(a, x) * z + _bcast(b, x) * x
    target = (_bcast(c, x) * z + _bcast(d, x) * x).to(x1.dtype) if write_target else None
    return x_t.to(x1.dtype), target


def cfm_loss(v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None, rng: Tensor | None = None,
             std: float = 1.0) -> Tensor:
    """Per-sample loss (B,) returned in fp32: mean over non-batch dims of (v - c x0 - d x1)^2."""
    z, x = _math(x1, x0, rng, std)
    r = v.to(x.dtype) - (_bcast(c, x) * z + _bcast(d, x) * x)
    return r.pow(2).reshape(r.shape[0], -1).mean(1).to(torch.float32)


def cfm_loss_grad(grad: Tensor, v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None,
                  rng: Tensor | None = None, std: float = 1.0) -> Tensor:
    """dL/dv for upstream per-sample gradients ``grad`` (B,), in v's dtype."""
    z, x = _math(x1, x0, rng, std)
    r = v.to(x.dtype) - (_bcast(c, x) * z + _bcast(d, x) * x)
    return (_bcast(grad, x) * (2.0 / (x[0].numel())) * r).to(v.dtype)
