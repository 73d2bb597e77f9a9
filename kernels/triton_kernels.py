"""Triton kernels for the affine probability path and the CFM loss (spec: ``kernels/reference.py``).

Three kernels, all memory-bound, all math in fp32 (loads are upcast, stores cast to the output dtype):

* ``affine_path``   x_t = a x0 + b x1 and target = c x0 + d x1 with per-sample coefficients (B,).
* ``cfm_loss``      per-sample (1/D) sum (v - c x0 - d x1)^2 -> (B,) fp32; target never materialised.
* ``cfm_loss_grad`` g_b * 2 (v - target) / D in v's dtype; the noise is regenerated, not stored.

Tiling. Data is viewed as (B, D); each program owns one ROWS x COLS tile (a 1-D grid of row blocks x
column blocks, flattened so neither factor meets CUDA's 65535 limit on grid axes 1-2). A row's
coefficients are loaded once per tile row (no per-element gather, no per-element ``offs // D``), and a
tile row is COLS contiguous elements, so with D a multiple of 16 (Triton's divisibility specialisation)
the loads and stores are 128-bit vectors. Tiles hold 4096 elements of each tensor over 8 warps (16 per
thread); :func:`tile_shape` picks the power-of-two COLS that wastes the fewest masked lanes for D.
Element offsets are int32 (numel < 2^31, a rule of this backend that fastfm.kernels.ops enforces).

Noise: when ``x0`` is None the source sample is drawn inside the kernel, never read from or written to
memory, from the stream of kernels/rng.py (``reference.randn_state``): element (r, j) of x0 is std times
word j % 4 of the Box-Muller normals of Philox4x32-10 keyed by the seed at counter (j // 4, offset + r),
where offset counts rows; one ``tl.philox`` call per four elements of a row, two Box-Muller pairs,
interleaved back to the row. The seed and the row offset are read inside the kernel from the int64 state
tensor ``rng = [seed, offset]``: every scalar a launch passes is a shape-derived int32 or a float, so a
compiled graph never specialises on (or recompiles for) a seed, and a CUDA graph replays with a new one.
Kernels specialise on the constexpr ``HAS_X0`` so the noise-only variant never touches an x0 or rng pointer.

Launches go through ``torch.library.wrap_triton`` so the launchers can be called inside a
``torch.library.triton_op`` and traced by torch.compile / torch.export.

Unused pointer arguments (x0 when ``HAS_X0`` is False, rng when it is True, target when ``WRITE_TARGET``
is False) get an input that is only read, so tracing never sees an output passed twice.

Arguments: the public functions take validated arguments (fastfm.kernels.ops checks them for every backend,
raising KernelArgumentError, and holds this backend's rules: its dtypes float32, bfloat16 and float16, GPU
tensors or the interpreter, numel < 2^31); they only make inputs contiguous and coefficients float32.

Interpreter mode (CPU testing): Triton picks interpreter or compiler when ``@triton.jit`` decorates a
function, its own library (tl.philox, ...) included, so ``TRITON_INTERPRET=1`` must be set before
triton is imported (tests/conftest.py does this on machines without CUDA).
"""

from __future__ import annotations

import os

import torch
import triton  # an ImportError here is the only way this module fails to import without triton
import triton.language as tl
from torch import Tensor

try:  # torch >= 2.6
    from torch.library import wrap_triton
except ImportError as exc:  # pragma: no cover - older torch
    raise ImportError("fastfm.kernels.triton_kernels needs torch.library.wrap_triton (torch >= 2.6)") from exc

__all__ = ["affine_path", "cfm_loss", "cfm_loss_grad"]

# Elements of each tensor one program moves, over _NUM_WARPS warps: 16 per thread (64 bytes of fp32, four
# 128-bit accesses; four Philox calls).
_TILE = 4096
_NUM_WARPS = 8


def tile_shape(D: int, tile: int | None = None) -> tuple[int, int]:
    """(ROWS, COLS) of a program's tile of ``tile`` elements (a power of two >= 4) for rows of D elements: the
    largest power-of-two COLS in [4, tile] whose padding of D to whole column blocks is within 1/16 of the
    least padding any COLS gives (COLS >= 4: one Philox call serves four consecutive elements of a row),
    and ROWS = tile // COLS."""
    tile = tile or _TILE
    options = [2**k for k in range(2, tile.bit_length())]
    padded = {c: triton.cdiv(max(D, 1), c) * c for c in options}
    least = min(padded.values())
    cols = max(c for c in options if padded[c] * 16 <= least * 17)
    return tile // cols, cols


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile(B, D, NCB, ROWS: tl.constexpr, COLS: tl.constexpr):
    """This program's tile: row indices (ROWS,), its column block, int32 offsets and mask (ROWS, COLS)."""
    pid = tl.program_id(0)
    rb = pid // NCB
    cb = pid - rb * NCB
    rows = rb * ROWS + tl.arange(0, ROWS)
    cols = cb * COLS + tl.arange(0, COLS)
    mask = (rows < B)[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]  # < B * D < 2^31 on unmasked lanes
    return rows, cb, offs, mask


@triton.jit
def _log(x):
    """Natural log of a normal positive float32 (here [1e-7, 1]): Cephes logf, branch-free (the C++
    kernels' log_f32), a few FMAs instead of libdevice's logf."""
    u = x.to(tl.uint32, bitcast=True)
    e = (u >> 23).to(tl.int32) - 126  # x = m 2^e, m in [0.5, 1)
    m = ((u & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    low = m < 0.707106781186547524
    e = tl.where(low, e - 1, e)
    m = tl.where(low, m + m, m) - 1.0
    z = m * m
    p = 7.0376836292e-2 * m - 1.1514610310e-1
    p = p * m + 1.1676998740e-1
    p = p * m - 1.2420140846e-1
    p = p * m + 1.4249322787e-1
    p = p * m - 1.6668057665e-1
    p = p * m + 2.0000714765e-1
    p = p * m - 2.4999993993e-1
    p = p * m + 3.3333331174e-1
    fe = e.to(tl.float32)
    y = p * m * z - 2.12194440e-4 * fe - 0.5 * z
    return (m + y) + 0.693359375 * fe


@triton.jit
def _sincos(t):
    """(cos t, sin t) for t in [0, 2 pi]: Cody-Waite reduction by pi/2, Cephes kernels (the C++ cos_f32),
    one reduction for both; no slow path for huge arguments (libdevice's sinf/cosf carry one)."""
    k = (t * 0.636619772367581343 + 0.5).to(tl.int32)  # round(t / (pi/2)), t >= 0
    fk = k.to(tl.float32)
    r = ((t - fk * 1.5703125) - fk * 4.837512969970703125e-4) - fk * 7.54978995489188216e-8
    z = r * r
    s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r
    c = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - 0.5 * z + 1.0
    odd = (k & 1) != 0  # quadrant k: cos = c, -s, -c, s; sin = s, c, -s, -c
    cos_sign = (((k + 1) & 2) << 30).to(tl.uint32, bitcast=True)
    sin_sign = ((k & 2) << 30).to(tl.uint32, bitcast=True)
    cos = (tl.where(odd, s, c).to(tl.uint32, bitcast=True) ^ cos_sign).to(tl.float32, bitcast=True)
    sin = (tl.where(odd, c, s).to(tl.uint32, bitcast=True) ^ sin_sign).to(tl.float32, bitcast=True)
    return cos, sin


@triton.jit
def _box_muller(w, w2):
    """R cos th, R sin th with R = sqrt(-2 log max(u(w), 1e-7)), th = 2 pi u(w2); u(w) = (int32 w, negatives
    to ~w) * 4.6566127342e-10, Triton's uint_to_uniform_float."""
    i = w.to(tl.int32, bitcast=True)
    i2 = w2.to(tl.int32, bitcast=True)
    u = tl.where(i < 0, ~i, i).to(tl.float32) * 4.6566127342e-10
    u2 = tl.where(i2 < 0, ~i2, i2).to(tl.float32) * 4.6566127342e-10
    r = tl.sqrt(-2.0 * _log(tl.maximum(u, 1.0e-7)))
    cos, sin = _sincos(6.283185307179586 * u2)
    return r * cos, r * sin


@triton.jit
def _source(x0_ptr, rng_ptr, rows, cb, offs, mask, std, HAS_X0: tl.constexpr, ROWS: tl.constexpr,
            COLS: tl.constexpr):
    """x0 on the tile: loaded, or, when no x0 is stored, std * the stream of rng = [seed, offset] (int64):
    element (row, column) is word column % 4 of the Box-Muller normals of Philox keyed by the seed at counter
    (column // 4, offset + row, 0, 0), four normals per call, interleaved."""
    if HAS_X0:  # if/else, not an early return: the compiler must not see the noise branch at all
        z = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        seed = tl.load(rng_ptr)
        row_ctr = (tl.load(rng_ptr + 1) + rows).to(tl.uint32)
        group = (cb * (COLS // 4) + tl.arange(0, COLS // 4)).to(tl.uint32)
        zero = tl.zeros((ROWS, COLS // 4), dtype=tl.uint32)
        w0, w1, w2, w3 = tl.philox(seed, group[None, :] + zero, row_ctr[:, None] + zero, zero, zero)
        n0, n1 = _box_muller(w0, w1)
        n2, n3 = _box_muller(w2, w3)
        # join(join(n0, n2), join(n1, n3))[..., i, j] = n_{2i + j}: row-major (i, j) is the element's order
        z = std * tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (ROWS, COLS))
    return z


@triton.jit
def _affine_path_kernel(x1_ptr, x0_ptr, rng_ptr, a_ptr, b_ptr, c_ptr, d_ptr, xt_ptr, tgt_ptr,
                        B, D, NCB, std,
                        HAS_X0: tl.constexpr, WRITE_TARGET: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows, cb, offs, mask = _tile(B, D, NCB, ROWS, COLS)
    in_rows = rows < B
    x1 = tl.load(x1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = _source(x0_ptr, rng_ptr, rows, cb, offs, mask, std, HAS_X0, ROWS, COLS)
    a = tl.load(a_ptr + rows, mask=in_rows, other=0.0)[:, None]
    b = tl.load(b_ptr + rows, mask=in_rows, other=0.0)[:, None]
    tl.store(xt_ptr + offs, (a * z + b * x1).to(xt_ptr.dtype.element_ty), mask=mask)
    if WRITE_TARGET:
        c = tl.load(c_ptr + rows, mask=in_rows, other=0.0)[:, None]
        d = tl.load(d_ptr + rows, mask=in_rows, other=0.0)[:, None]
        tl.store(tgt_ptr + offs, (c * z + d * x1).to(tgt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual(v_ptr, x1_ptr, x0_ptr, rng_ptr, c_ptr, d_ptr, B, D, NCB, std,
              HAS_X0: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """This tile's (rows, column block, offsets, mask) and the CFM residual r = v - (c z + d x1) in fp32."""
    rows, cb, offs, mask = _tile(B, D, NCB, ROWS, COLS)
    in_rows = rows < B
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = _source(x0_ptr, rng_ptr, rows, cb, offs, mask, std, HAS_X0, ROWS, COLS)
    c = tl.load(c_ptr + rows, mask=in_rows, other=0.0)[:, None]
    d = tl.load(d_ptr + rows, mask=in_rows, other=0.0)[:, None]
    return rows, cb, offs, mask, v - (c * z + d * x1)


@triton.jit
def _cfm_loss_partial_kernel(v_ptr, x1_ptr, x0_ptr, rng_ptr, c_ptr, d_ptr, part_ptr,
                             B, D, NCB, std,
                             HAS_X0: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    # Each tile writes its rows' sums of squared residuals over its columns to part[row, column block].
    rows, cb, offs, mask, r = _residual(v_ptr, x1_ptr, x0_ptr, rng_ptr, c_ptr, d_ptr, B, D, NCB, std,
                                        HAS_X0, ROWS, COLS)
    r = tl.where(mask, r, 0.0)
    tl.store(part_ptr + rows * NCB + cb, tl.sum(r * r, axis=1), mask=rows < B)


@triton.jit
def _cfm_loss_grad_kernel(g_ptr, v_ptr, x1_ptr, x0_ptr, rng_ptr, c_ptr, d_ptr, out_ptr,
                          B, D, NCB, scale, std,
                          HAS_X0: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows, cb, offs, mask, r = _residual(v_ptr, x1_ptr, x0_ptr, rng_ptr, c_ptr, d_ptr, B, D, NCB, std,
                                        HAS_X0, ROWS, COLS)
    g = tl.load(g_ptr + rows, mask=rows < B, other=0.0)[:, None]
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


def _prepare(x1: Tensor, x0: Tensor | None, v: Tensor | None, rng: Tensor | None):
    """Contiguous (x1, x0 or None, v or None, the state pointer, B, N, D) of validated arguments."""
    B = x1.shape[0]
    N = x1.numel()
    D = N // B if B else 0
    x1c = x1.contiguous()
    x0c = x0.contiguous() if x0 is not None else None
    vc = v.contiguous() if v is not None else None
    state = rng.contiguous() if x0 is None else x1c  # never read when x0 is given
    return x1c, x0c, vc, state, B, N, D


def _coef(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _tiles(B: int, D: int) -> tuple[tuple[int], int, int, int]:
    """(grid, column blocks per row, ROWS, COLS) of a launch over (B, D) data."""
    rows, cols = tile_shape(D)
    ncb = triton.cdiv(D, cols)
    return (triton.cdiv(B, rows) * ncb,), ncb, rows, cols


def affine_path(x1: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None,
                rng: Tensor | None = None, std: float = 1.0, write_target: bool = True) -> tuple[Tensor, Tensor | None]:
    """(x_t, target) = (a x0 + b x1, c x0 + d x1) in x1's dtype/shape; target is None if not write_target.

    ``x0`` None draws ``std * randn`` in the kernel from the stream of ``rng = [seed, offset]`` (kernels/rng.py).
    """
    x1c, x0c, _, state, B, N, D = _prepare(x1, x0, None, rng)
    a, b = _coef(a), _coef(b)
    if write_target:
        c, d = _coef(c), _coef(d)
    else:  # never read by the kernel; any (B,) fp32 pointer will do
        c, d = a, b
    x_t = _empty(x1.shape, x1.dtype, x1.device)
    target = _empty(x1.shape, x1.dtype, x1.device) if write_target else None
    if N == 0:
        return x_t, target
    grid, ncb, rows, cols = _tiles(B, D)
    _launch(_affine_path_kernel, grid,
            x1c, x0c if x0c is not None else x1c, state, a, b, c, d, x_t, target if write_target else x1c,
            B, D, ncb, float(std),
            HAS_X0=x0c is not None, WRITE_TARGET=bool(write_target), ROWS=rows, COLS=cols, num_warps=_NUM_WARPS)
    return x_t, target


def cfm_loss(v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None, rng: Tensor | None = None,
             std: float = 1.0) -> Tensor:
    """Per-sample CFM loss (B,) fp32: mean over non-batch dims of (v - c x0 - d x1)^2.

    Deterministic: per-(row, column block) partial sums to a (B, blocks) fp32 buffer, then ``sum(1) / D``.
    """
    x1c, x0c, vc, state, B, N, D = _prepare(x1, x0, v, rng)
    c, d = _coef(c), _coef(d)
    grid, ncb, rows, cols = _tiles(B, D)
    partial = _empty((B, ncb), torch.float32, x1.device)
    if N > 0:
        _launch(_cfm_loss_partial_kernel, grid,
                vc, x1c, x0c if x0c is not None else x1c, state, c, d, partial,
                B, D, ncb, float(std),
                HAS_X0=x0c is not None, ROWS=rows, COLS=cols, num_warps=_NUM_WARPS)
    return partial.sum(1) / D


def cfm_loss_grad(grad: Tensor, v: Tensor, x1: Tensor, c: Tensor, d: Tensor, x0: Tensor | None = None,
                  rng: Tensor | None = None, std: float = 1.0) -> Tensor:
    """dL/dv = grad[b] * 2 (v - c x0 - d x1) / D in v's dtype/shape (noise regenerated from ``rng``)."""
    x1c, x0c, vc, state, B, N, D = _prepare(x1, x0, v, rng)
    g, c, d = _coef(grad), _coef(c), _coef(d)
    out = _empty(v.shape, v.dtype, v.device)
    if N == 0:
        return out
    grid, ncb, rows, cols = _tiles(B, D)
    _launch(_cfm_loss_grad_kernel, grid,
            g, vc, x1c, x0c if x0c is not None else x1c, state, c, d, out,
            B, D, ncb, 2.0 / D, float(std),
            HAS_X0=x0c is not None, ROWS=rows, COLS=cols, num_warps=_NUM_WARPS)
    return out
