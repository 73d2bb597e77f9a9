"""The noise-stream state every backend reads: one int64 tensor ``[seed, offset]`` on the data's device.

Stream (kernels/reference.py gives it in plain PyTorch). For data x1 viewed as (B, D), element (r, j) of
the in-kernel noise is word ``j % 4`` of the four Box-Muller normals of one Philox4x32-10 call keyed by
``seed`` (its 64 bits, as a signed int64) at counter ``(j // 4, offset + r, 0, 0)``: one Philox call
serves four elements, and ``offset`` counts *rows*, so a shard of a batch (a DDP rank, a micro-batch)
holding rows [r0, r0 + m) draws exactly those rows of the whole batch's noise with offset r0, whatever D.

The state is a device tensor, never a Python int: a compiled graph or a CUDA graph takes a new seed as
new data (no recompile, no re-capture), and every backend (Triton, C++, reference) reads it inside the
kernel, so the three ops have one signature.

Seeds. :func:`signed_seed` is the one place a seed is normalised: any int in [-2^63, 2^64) becomes the
signed int64 with the same 64 bits (seeds in [2^63, 2^64) wrap to negatives, so ``-5`` and ``2^64 - 5``
are one stream); the state holds it, and every backend takes the Philox key from those bits.

The row counter is a uint32: rows ``[offset, offset + B)`` must lie in ``[0, 2^32)``. :func:`philox_state`
checks that on the host when the state is made from Python ints, and the ops check it for a state on the
CPU (:func:`check_state_rows`); a state tensor built on a GPU is the caller's promise (reading it would
sync).

Errors: every argument check of the kernels, these included, raises :class:`KernelArgumentError` (a
``ValueError``; fastfm.kernels.ops re-exports it, and owns the ops' other checks).
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

STREAM_ROWS = 2**32


class KernelArgumentError(ValueError):
    """An argument of a kernel op (or of the noise state it reads) is wrong; the message names it."""


def _index(name: str, value: object) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise KernelArgumentError(f"{name} must be an int, got {type(value).__name__}")
    return operator.index(value)


def signed_seed(seed: object) -> int:
    """A 64-bit seed as the signed int64 with the same bits (seeds in [2^63, 2^64) wrap to negatives)."""
    seed = _index("seed", seed)
    if not -(2**63) <= seed < 2**64:
        raise KernelArgumentError(f"seed must fit in 64 bits, got {seed}")
    return seed - 2**64 if seed >= 2**63 else seed


def check_stream(offset: int, rows: int) -> None:
    """Raise unless rows [offset, offset + rows) of the stream exist (uint32 row counters)."""
    if rows < 0:
        raise KernelArgumentError(f"a noise draw needs rows >= 0, got {rows}")
    if offset < 0 or offset + rows > STREAM_ROWS:
        raise KernelArgumentError(f"noise streams are indexed by uint32 row offsets; rows [{offset}, "
                                  f"{offset + rows}) do not lie in [0, 2^32)")


def philox_state(seed: int, offset: int = 0, device: torch.device | str | None = None, rows: int = 0) -> Tensor:
    """The int64 state ``[seed, offset]`` on ``device``; ``rows`` rows from row ``offset`` must be in the stream."""
    offset = _index("offset", offset)
    check_stream(offset, _index("rows", rows))
    return torch.tensor([signed_seed(seed), offset], dtype=torch.int64, device=device)


def check_state_type(rng: object) -> None:
    """A noise-state argument is None or a tensor (checked before a dispatcher, which refuses others with its
    own error)."""
    if rng is not None and not isinstance(rng, Tensor):
        raise KernelArgumentError(f"rng must be the int64 tensor [seed, offset] (fastfm.kernels.rng.philox_state), "
                                  f"got {type(rng).__name__}")


def check_state(rng: object, x1: Tensor) -> Tensor:
    """Validate the noise state of an op drawing x0 for data ``x1``: an int64 tensor of shape (2,) on x1's
    device; returned contiguous."""
    if rng is None:
        raise KernelArgumentError("rng (the int64 noise state [seed, offset]) is required when x0 is None")
    check_state_type(rng)
    if rng.dtype != torch.int64 or tuple(rng.shape) != (2,):
        raise KernelArgumentError(f"rng must be an int64 tensor of shape (2,) = [seed, offset], got {rng.dtype} "
                                  f"of shape {tuple(rng.shape)}")
    if rng.device != x1.device:
        raise KernelArgumentError(f"device mismatch: rng is on {rng.device} but x1 is on {x1.device}")
    return rng.contiguous()


def check_state_rows(rng: Tensor, rows: int) -> None:
    """For a state on the CPU (read without a device sync): the check of :func:`philox_state` on its offset,
    rows [offset, offset + rows) in the stream. A state on any other device is not read."""
    if rng.device.type == "cpu":
        check_stream(int(rng[1]), rows)
