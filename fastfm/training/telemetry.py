"""Training telemetry: model FLOPs per sample, model FLOP utilisation (MFU) and peak memory.

    MFU = (FLOPs per sample x samples per second) / peak FLOP/s of the device

FLOPs are counted once, by ``torch.utils.flop_counter`` on a forward + backward of the model
(matmuls and convolutions: what the peak numbers describe). Peaks are the vendor's dense
tensor-core figures for the precision the step runs in; unknown devices give no MFU.
"""

from __future__ import annotations

import copy
import resource
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

# Dense peak FLOP/s by device-name substring: (bf16/fp16 tensor core, tf32 tensor core, fp32 SIMT).
PEAK_FLOPS: dict[str, tuple[float, float, float]] = {
    "H200": (989e12, 494e12, 67e12),
    "H100 PCIe": (756e12, 378e12, 51e12),
    "H100": (989e12, 494e12, 67e12),  # SXM
    "A100": (312e12, 156e12, 19.5e12),
    "L40S": (362e12, 183e12, 91.6e12),
    "A10": (125e12, 62.5e12, 31.2e12),
}


def peak_flops(device: torch.device, bf16: bool) -> float | None:
    """Peak dense FLOP/s of a CUDA device for the step's precision; None on CPU or unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32, fp32) in PEAK_FLOPS.items():
        if key in name:
            if bf16:
                return half
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    return None


def flops_per_sample(model: nn.Module, make_inputs: Callable[[int], tuple[tuple, dict]], n: int = 2) -> float:
    """Forward + backward FLOPs of ``model`` per sample, counted on a copy with a batch of n."""
    probe = copy.deepcopy(model).train()
    args, kwargs = make_inputs(n)
    counter = FlopCounterMode(display=False)
    with counter:
        out: Tensor = probe(*args, **kwargs)
        out.float().square().mean().backward()
    return counter.get_total_flops() / n


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or on the CPU the process's peak resident set, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
