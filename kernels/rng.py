"""The noise-stream state every backend reads: one int64 tensor ``[seed, offset]`` on the data's device.

Stream (kernels/reference.py gives it in plain PyTorch). For data x1 viewed as (B, D), element (r, j) of
the in-kernel noise is word ``j mod 4`` of four normals drawn from one Philox4x32-10 call keyed by
``seed`` (its 64 bits, as a signed int64) at counter ``(j // 4, offset + r, 0, 0)``: one Philox call
serves four elements, and ``offset`` counts *rows*, so a shard of a batch (a DDP rank, a micro-batch)
holding rows [r0, r0 + m) draws exactly those rows of the whole batch's noise with offset r0, whatever D.

The state is a device tensor, never a Python int: a compiled graph or a CUDA graph takes a new seed as
new data (no recompile, no re-capture), and every backend (Triton, C++, reference) reads it inside the
kernel, so the three ops have one signature.

The row counter is a uint32: rows ``[offset, offset + B)`` must lie in ``[0, 2^32)``. :func:`philox_state`
checks that on the host when the state is made from Python ints; a state tensor built on the device is
the caller's promise.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

STREAM_ROWS = 2**32


def signed_seed(seed: object) -> int:
    """A 64-bit seed as the signed int64 with the same bits (seeds in [2^63, 2^64) wrap to negatives)."""
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = operator.index(seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    return seed - 2**64 if seed >= 2**63 else seed


def check_stream(offset: int, rows: int) -> None:
    """Raise ValueError unless rows [offset, offset + rows) of the stream exist (uint32 row counters)."""
    if offset < 0 or offset + rows > STREAM_ROWS:
        raise ValueError(f"noise streams are indexed by uint32 row offsets; rows [{offset}, {offset + rows}) "
                         f"do not lie in [0, 2^32)")


def philox_state(seed: int, offset: int = 0, device: torch.device | str | None = None, rows: int = 0) -> Tensor:
    """The int64 state ``[seed, offset]`` on ``device``; ``rows`` rows from row ``offset`` must be in the stream."""
    if isinstance(offset, bool) or not hasattr(offset, "__index__"):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    offset = operator.index(offset)
    check_stream(offset, rows)
    return torch.tensor([signed_seed(seed), offset], dtype=torch.int64, device=device)


def check_state(rng: object, x1: Tensor) -> Tensor:
    """Validate the noise state of an op drawing x0 for data ``x1``: an int64 tensor of shape (2,) on x1's
    device; returned contiguous."""
    if rng is None:
        raise ValueError("rng (the int64 noise state [seed, offset]) is required when x0 is None")
    if not isinstance(rng, Tensor):
        raise TypeError(f"rng must be the int64 tensor [seed, offset] (fastfm.kernels.rng.philox_state), "
                        f"got {type(rng).__name__}")
    if rng.dtype != torch.int64 or tuple(rng.shape) != (2,):
        raise ValueError(f"rng must be an int64 tensor of shape (2,) = [seed, offset], got {rng.dtype} "
                         f"of shape {tuple(rng.shape)}")
    if rng.device != x1.device:
        raise ValueError(f"device mismatch: rng is on {rng.device} but x1 is on {x1.device}")
    return rng.contiguous()
