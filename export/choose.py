"""``backend='auto'`` and ``dtype='auto'``: the engines worth building for a request on this machine.

    backends   CPU: aoti, and onnx where its packages are installed; CUDA: cudagraph and aoti, onnx where
               onnxruntime has its CUDA provider, tensorrt where torch-tensorrt is installed
    dtypes     fp32, and bf16 where the device runs bf16 natively (``fastfm.hardware``) and the backend has bf16
               kernels (onnxruntime's CPU provider has none)

The build (export/build.py) builds every candidate, checks each one's parity against eager, times each on the
probe batch and publishes the fastest; the manifest keeps every candidate's time, so the choice is the
measurement of the machine that built the engine, not a constant. A named backend or dtype is built as asked
(a bf16 engine on hardware that emulates bf16 with one warning).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fastfm import hardware

from .backends import ENGINE_BACKENDS, check_available
from .spec import DTYPES, EngineRequest, ExportError

AUTO = "auto"
CPU_BACKENDS = ("aoti", "onnx")
CUDA_BACKENDS = ("cudagraph", "aoti", "onnx", "tensorrt")


def _usable(backend: str, device: torch.device, dtype: str) -> bool:
    try:
        check_available(backend, device, dtype)
    except ExportError:
        return False
    if backend == "onnx" and device.type == "cuda":
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return True


def candidates(spec: EngineRequest, device: torch.device,
               caps: hardware.Capabilities | None = None) -> list[EngineRequest]:
    """The concrete (backend, dtype) requests ``spec`` stands for on ``device``, the explicit ones checked
    (ExportError naming a missing package or device), in order of preference for equal times."""
    if spec.backend != AUTO and spec.backend not in ENGINE_BACKENDS:
        raise ExportError(f"unknown backend {spec.backend!r}; choose one of {(AUTO, *ENGINE_BACKENDS)}")
    if spec.dtype != AUTO and spec.dtype not in DTYPES:
        raise ExportError(f"unknown dtype {spec.dtype!r}; choose one of {(AUTO, *DTYPES)}")
    caps = caps or hardware.capabilities(device)
    dtypes = [spec.dtype] if spec.dtype != AUTO else ["fp32", *(["bf16"] if caps.bf16_native else [])]
    if spec.backend != AUTO:  # named: its package and device, and a named dtype, checked (auto dtypes filtered)
        check_available(spec.backend, device, spec.dtype if spec.dtype != AUTO else "fp32")
        backends = [spec.backend]
    else:
        backends = list(CUDA_BACKENDS if device.type == "cuda" else CPU_BACKENDS)
    out = [replace(spec, backend=b, dtype=d) for d in dtypes for b in backends if _usable(b, device, d)]
    if not out:
        raise ExportError(f"no engine backend can build a {'/'.join(dtypes)} engine on {device} here")
    if spec.dtype == "bf16" and not caps.bf16_native:
        hardware.warn_once(f"a bf16 engine on this {caps.machine_class} machine, which emulates bf16: expect it to "
                           "run slower than fp32 (--dtype auto measures both where bf16 is native)")
    return out
