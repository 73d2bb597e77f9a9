"""The kernel backend ``auto`` uses, chosen by measurement on the machine that runs the job.

A training step spends its kernel time in the fused CFM loss, forward and backward. ``choose`` times that pair
for every backend that can serve the device (``ops.candidates``: the compiled one, C++ or Triton, and the
plain-PyTorch reference) on the job's row shape (at most ``PROBE_NUMEL`` elements, so the probe takes
milliseconds), drops any whose loss and gradient disagree with the reference's, and makes the fastest auto's
backend for the device (``ops.set_auto_backend``): the compiled one unless another is faster by ``MARGIN``, so
timing noise at small sizes does not flip a run between backends (they agree to float rounding, not bitwise).
``FASTFM_KERNELS`` set to a backend skips the probe.
The probe draws its inputs from its own generator: the global random streams a resumed run replays stay as
they were.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fastfm.hardware import fastest
from fastfm.kernels import ops

PROBE_NUMEL = 2**18
"""Elements of the probe batch at most (1 MiB in fp32): big enough to be bound like the real batch."""
MARGIN = 1.2
"""Another backend replaces the device's compiled one only when it is this many times faster."""
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _probe_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                  noise: bool) -> tuple[Tensor, ...]:
    """x1, v, c, d, x0 (None when the kernel draws the noise) and the noise state, from a fixed local seed."""
    per_row = math.prod(shape[1:])
    rows = max(1, min(shape[0], PROBE_NUMEL // max(per_row, 1)))
    gen = torch.Generator().manual_seed(0)
    x1, v, x0 = (torch.randn(rows, *shape[1:], generator=gen).to(device, dtype) for _ in range(3))
    c, d = torch.rand(rows, generator=gen).to(device) - 1.0, torch.ones(rows, device=device)
    return x1, v, c, d, None if noise else x0, ops.noise_state(x1, seed=1)


def _loss_and_grad(x1: Tensor, v: Tensor, c: Tensor, d: Tensor, x0: Tensor | None, rng: Tensor) -> tuple[Tensor, Tensor]:
    """The fused loss's forward and backward, as a training step runs them."""
    v = v.detach().requires_grad_(True)
    loss = ops.cfm_loss(v, x1, c, d, x0, rng).sum()
    (grad,) = torch.autograd.grad(loss, v)
    return loss.detach(), grad


def _run(backend: str, inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    ops.set_auto_backend(inputs[0].device.type, backend)
    out = _loss_and_grad(*inputs)
    if inputs[0].device.type == "cuda":
        torch.cuda.synchronize(inputs[0].device)
    return out


def choose(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, noise: bool) -> dict[str, Any]:
    """Time the fused loss (forward + backward) of every candidate backend for ``shape`` rows of ``dtype`` on
    ``device`` (in-kernel noise or x0 given), keep those that agree with the reference, make the fastest auto's
    choice for the device, and return the record: backend, rule, seconds per candidate, the rows timed."""
    forced = ops.forced_backend()
    if forced is not None:
        return {"backend": ops.backend_for(device), "rule": f"FASTFM_KERNELS={forced}"}
    names = ops.candidates(device)
    if len(names) == 1:
        ops.set_auto_backend(device.type, names[0])
        return {"backend": names[0], "rule": "the only backend for this device"}
    inputs = _probe_inputs(shape, dtype, device, noise)
    try:
        reference = _run("reference", inputs)
    except Exception as e:  # no oracle to check the others against: the rule's backend, untimed
        ops.set_auto_backend(device.type, names[0])
        return {"backend": names[0], "rule": f"untimed: the reference failed ({type(e).__name__}: {e})"}
    tol = TOLERANCE[dtype]
    correct, rejected = [], {}
    for name in names:
        try:
            got = _run(name, inputs)
        except Exception as e:  # a backend that cannot run here is not a candidate
            rejected[name] = f"{type(e).__name__}: {e}"
            continue
        err = max(float((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1)) for a, b in zip(got, reference))
        if err <= tol:
            correct.append(name)
        else:
            rejected[name] = err
    best, seconds = fastest({name: (lambda name=name: _run(name, inputs)) for name in correct}, min_s=0.02)
    if names[0] in seconds and seconds[names[0]] <= MARGIN * seconds[best]:
        best = names[0]
    ops.set_auto_backend(device.type, best)
    record: dict[str, Any] = {"backend": best, "rule": "measured", "rows": int(inputs[0].shape[0]),
                              "seconds": {k: round(v, 7) for k, v in seconds.items()}}
    if rejected:
        record["rejected"] = rejected
    return record
