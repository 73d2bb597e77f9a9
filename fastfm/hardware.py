"""What the hardware this process runs on does natively: the one owner of ISA, native precisions and threads,
and of the choices that follow from them (autocast precision, the fastest of several implementations).

CPU. ATen's vector kernels run at ``torch.backends.cpu.get_cpu_capability()`` (capped by
``ATEN_CPU_CAPABILITY``); GEMMs and convolutions run in oneDNN at the CPU's best ISA, capped by
``ONEDNN_MAX_CPU_ISA``. A bf16 matmul is native where oneDNN may use AVX512-BF16 or AMX-BF16; fp16 where it may
use AVX512-FP16 or AMX-FP16 (on ARM: the bf16 / fp16 arithmetic extensions). Elsewhere oneDNN emulates them:
`make train` with bf16 forced ran 24x slower than in fp32 on a 2-core AVX2 EPYC (cpu-avx2, 2.7k vs 64k
samples/s).

CUDA. bf16 tensor cores from compute capability 8.0 (Ampere), fp8 from 8.9 (Ada, Hopper), fp16 on every GPU
torch supports; flash attention (``scaled_dot_product_attention``'s flash kernel) from 8.0.

``python -m fastfm.hardware`` prints what this machine is (JSON); ``--levels`` the CPU ISA levels it can be
measured at, one per line as ``NAME ENV=VALUE ...`` (the lower ones by capping oneDNN and ATen).
This module imports nothing from fastfm: every layer may use it.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Callable

import torch

# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA), lowest first; aliases share a level.
ONEDNN_ISAS: dict[str, int] = {
    "SSE41": 1, "AVX": 2, "AVX2": 3, "AVX2_VNNI": 4, "AVX2_VNNI_2": 5, "AVX512_CORE": 6, "AVX512_CORE_VNNI": 7,
    "AVX512_CORE_BF16": 8, "AVX512_CORE_FP16": 9, "AVX10_1_512": 9, "AVX512_CORE_AMX": 10, "AVX10_1_512_AMX": 10,
    "AVX512_CORE_AMX_FP16": 11, "AVX10_1_512_AMX_FP16": 11, "AVX10_2_512": 12, "AVX10_2_512_AMX_2": 13,
    "ALL": 99, "DEFAULT": 99,
}
# The CPU flag that gives each oneDNN level (the best one present is the CPU's own ISA).
_ISA_FLAGS = (("AVX512_CORE_AMX_FP16", "amx_fp16"), ("AVX512_CORE_AMX", "amx_bf16"),
              ("AVX512_CORE_FP16", "avx512_fp16"), ("AVX512_CORE_BF16", "avx512_bf16"),
              ("AVX512_CORE_VNNI", "avx512_vnni"), ("AVX512_CORE", "avx512_bw"), ("AVX2_VNNI_2", "avx_ne_convert"),
              ("AVX2_VNNI", "avx_vnni"), ("AVX2", "avx2"), ("AVX", "avx"), ("SSE41", "sse4_1"))
_CPUINFO_NAMES = {"avx512bw": "avx512_bw", "avx512f": "avx512_f", "avx512_vnni": "avx512_vnni",
                  "avx512_bf16": "avx512_bf16", "avx512_fp16": "avx512_fp16", "amx_bf16": "amx_bf16",
                  "amx_fp16": "amx_fp16", "amx_tile": "amx_tile", "avx_vnni": "avx_vnni", "avx2": "avx2", "avx": "avx",
                  "sse4_1": "sse4_1", "avx_ne_convert": "avx_ne_convert", "bf16": "bf16", "fphp": "fp16_arith"}
LOWER_LEVEL_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
"""The environment that makes any x86 CPU with AVX2 measure as the AVX2 class."""


MIN_CAPABILITY: dict[str, tuple[int, int]] = {"bf16": (8, 0), "fp16": (5, 3), "fp8": (8, 9), "flash_attention": (8, 0)}
"""The CUDA compute capability each native feature needs."""


class PrecisionWarning(UserWarning):
    """A requested precision this hardware does not run natively."""


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as PyTorch and oneDNN use it (``onednn_isa`` and ``aten_isa`` after the environment's caps)."""

    name: str
    arch: str
    threads: int
    flags: tuple[str, ...]  # the precision-relevant ISA extensions present
    onednn_isa: str  # what oneDNN may use: min(the CPU's best, ONEDNN_MAX_CPU_ISA)
    onednn_cap: str | None  # ONEDNN_MAX_CPU_ISA as set, if any
    aten_isa: str  # torch.backends.cpu.get_cpu_capability()
    bf16_native: bool
    fp16_native: bool

    @property
    def machine_class(self) -> str:
        """cpu-amx, cpu-avx512-bf16, cpu-avx512, cpu-avx2, cpu-arm-bf16, cpu-arm or cpu-<ATen ISA>."""
        level = ONEDNN_ISAS.get(self.onednn_isa, 0)
        if self.arch in ("aarch64", "arm64"):
            return "cpu-arm-bf16" if self.bf16_native else "cpu-arm"
        if level >= ONEDNN_ISAS["AVX512_CORE_AMX"] and "amx_bf16" in self.flags:
            return "cpu-amx"
        if self.bf16_native:
            return "cpu-avx512-bf16"
        if level >= ONEDNN_ISAS["AVX512_CORE"] and self.aten_isa.startswith("AVX512"):
            return "cpu-avx512"
        if level >= ONEDNN_ISAS["AVX2"]:
            return "cpu-avx2"
        return f"cpu-{self.aten_isa.lower()}"


@dataclass(frozen=True)
class CudaInfo:
    """One CUDA device."""

    name: str
    capability: tuple[int, int]
    memory_gib: float
    multiprocessors: int

    def has(self, feature: str) -> bool:
        """Whether this device has ``feature`` (a key of MIN_CAPABILITY) natively."""
        return self.capability >= MIN_CAPABILITY[feature]

    @property
    def bf16_native(self) -> bool:
        return self.has("bf16")

    @property
    def fp8_native(self) -> bool:
        return self.has("fp8")

    @property
    def flash_attention(self) -> bool:
        return self.has("flash_attention")


@dataclass(frozen=True)
class Capabilities:
    """What the device a job runs on does natively, with the CPU beside it."""

    device: str
    cpu: CpuInfo
    cuda: CudaInfo | None = None

    @property
    def machine_class(self) -> str:
        if self.cuda is not None:
            return f"cuda-sm{self.cuda.capability[0]}{self.cuda.capability[1]}"
        return self.cpu.machine_class

    @property
    def bf16_native(self) -> bool:
        return self.cuda.bf16_native if self.cuda is not None else self.cpu.bf16_native

    @property
    def fp16_native(self) -> bool:
        return self.cuda.has("fp16") if self.cuda is not None else self.cpu.fp16_native

    @property
    def fp8_native(self) -> bool:
        return self.cuda is not None and self.cuda.fp8_native

    def to_json(self) -> dict[str, Any]:
        """The record written into metrics.jsonl headers, engine manifests and benchmark JSON."""
        cuda = None if self.cuda is None else dict(
            asdict(self.cuda), capability=list(self.cuda.capability), bf16_native=self.cuda.bf16_native,
            fp8_native=self.cuda.fp8_native, flash_attention=self.cuda.flash_attention)
        return {"machine_class": self.machine_class, "device": self.device, "bf16_native": self.bf16_native,
                "fp16_native": self.fp16_native, "fp8_native": self.fp8_native,
                "cpu": dict(asdict(self.cpu), flags=list(self.cpu.flags)), "cuda": cuda,
                "torch": torch.__version__, "python": platform.python_version()}


def _cpu_flags() -> set[str]:
    """The CPU's ISA extensions (torch's cpuinfo where this torch has it, else /proc/cpuinfo) in cpuinfo's names."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        return {k for k, v in get().items() if v is True}
    found: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    found.update(_CPUINFO_NAMES[w] for w in line.split(":", 1)[1].split() if w in _CPUINFO_NAMES)
                    break
    except OSError:
        pass
    return found


def cpu_info(flags: set[str] | None = None, env: dict[str, str] | None = None, aten: str | None = None) -> CpuInfo:
    """The CPU as this process sees it; ``flags``, ``env`` and ``aten`` (ATen's ISA) default to the real ones."""
    flags = _cpu_flags() if flags is None else set(flags)
    env = dict(os.environ) if env is None else env
    arch = platform.machine()
    own = next((isa for isa, flag in _ISA_FLAGS if flag in flags), "SSE41" if arch in ("x86_64", "AMD64") else "")
    cap = env.get("ONEDNN_MAX_CPU_ISA", env.get("DNNL_MAX_CPU_ISA"))
    isa = own
    if cap is not None and cap.upper() in ONEDNN_ISAS and own and ONEDNN_ISAS[cap.upper()] < ONEDNN_ISAS[own]:
        isa = cap.upper()
    level = ONEDNN_ISAS.get(isa, 0)
    if arch in ("aarch64", "arm64"):
        bf16, fp16 = "bf16" in flags, "fp16_arith" in flags
    else:
        bf16 = (("avx512_bf16" in flags and level >= ONEDNN_ISAS["AVX512_CORE_BF16"])
                or ("amx_bf16" in flags and level >= ONEDNN_ISAS["AVX512_CORE_AMX"]))
        fp16 = (("avx512_fp16" in flags and level >= ONEDNN_ISAS["AVX512_CORE_FP16"])
                or ("amx_fp16" in flags and level >= ONEDNN_ISAS["AVX512_CORE_AMX_FP16"]))
    relevant = sorted(f for f in flags if f.startswith(("avx", "amx", "sve", "bf16", "fp16", "neon")))
    name = getattr(torch.cpu, "get_capabilities", lambda: {})().get("cpu_name") or platform.processor() or arch
    return CpuInfo(name=str(name), arch=arch, threads=torch.get_num_threads(), flags=tuple(relevant),
                   onednn_isa=isa or "none", onednn_cap=cap, aten_isa=aten or torch.backends.cpu.get_cpu_capability(),
                   bf16_native=bf16, fp16_native=fp16)


@lru_cache(maxsize=None)
def _cuda_info(index: int) -> CudaInfo:
    p = torch.cuda.get_device_properties(index)
    return CudaInfo(name=p.name, capability=(p.major, p.minor), memory_gib=round(p.total_memory / 2**30, 1),
                    multiprocessors=p.multi_processor_count)


def capabilities(device: torch.device | str = "cpu") -> Capabilities:
    """What ``device`` (and the CPU beside it) does natively."""
    dev = torch.device(device)
    cuda = None
    if dev.type == "cuda":
        cuda = _cuda_info(dev.index if dev.index is not None else torch.cuda.current_device())
    return Capabilities(device=str(dev), cpu=cpu_info(), cuda=cuda)


# ---------------------------------------------------------------- choices that follow from the hardware


@dataclass(frozen=True)
class Precision:
    """An autocast decision: bf16 requested, bf16 used, and why."""

    requested: bool
    bf16: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"requested": "bf16" if self.requested else "fp32", "compute": "bf16" if self.bf16 else "fp32",
                "reason": self.reason}


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """A ``PrecisionWarning`` the first time ``message`` is given in this process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, PrecisionWarning, stacklevel=3)


def autocast_precision(requested: bool, caps: Capabilities, force: bool = False) -> Precision:
    """PyTorch's autocast convention for a dtype the device cannot run well: bf16 where it is native; where it is
    emulated, one warning and fp32 compute, unless ``force`` (then bf16, emulated, as asked)."""
    if not requested:
        return Precision(False, False, "fp32 requested")
    if caps.bf16_native:
        return Precision(True, True, f"bf16 is native on {caps.machine_class}")
    if force:
        return Precision(True, True, f"bf16 forced on {caps.machine_class}, where it is emulated (slow)")
    where = ("the GPU's compute capability is below 8.0" if caps.cuda is not None else
             f"the CPU has no AVX512-BF16 or AMX-BF16 within oneDNN's reach (oneDNN ISA {caps.cpu.onednn_isa})")
    reason = (f"bf16 is not native on this {caps.machine_class} machine ({where}): running fp32 instead; "
              "--force-bf16 runs the emulated bf16")
    warn_once(f"--bf16: {reason}")
    return Precision(True, False, reason)


def seconds_per_call(fn: Callable[[], Any], min_s: float = 0.05, max_calls: int = 50,
                     clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of ``fn()`` after one warm-up call, over at least 3 calls and ``min_s`` of calls."""
    fn()
    times: list[float] = []
    while len(times) < 3 or (sum(times) < min_s and len(times) < max_calls):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def fastest(candidates: dict[str, Callable[[], Any]], **timing: Any) -> tuple[str, dict[str, float]]:
    """The name of the fastest candidate and every candidate's median seconds per call (``seconds_per_call``)."""
    if not candidates:
        raise ValueError("fastest: no candidates")
    seconds = {name: seconds_per_call(fn, **timing) for name, fn in candidates.items()}
    return min(seconds, key=seconds.__getitem__), seconds


def levels(info: CpuInfo | None = None) -> dict[str, dict[str, str]]:
    """CPU classes this machine can be measured as, each with the environment that makes it so: its own class,
    and the AVX2 class below it where the CPU has more than AVX2 (x86 only)."""
    info = info or cpu_info()
    out = {info.machine_class: {}}
    if info.machine_class != "cpu-avx2" and "avx2" in info.flags and info.arch in ("x86_64", "AMD64"):
        out["cpu-avx2"] = dict(LOWER_LEVEL_ENV)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m fastfm.hardware",
                                description="What this machine does natively (ISA, native precisions, threads; "
                                            "CUDA capability), as JSON.")
    p.add_argument("device", nargs="?", default=None,
                   help="cpu, cuda or cuda:N (default: cuda where available, else cpu)")
    p.add_argument("--levels", action="store_true",
                   help="print instead the CPU classes this machine can be measured at, one per line as "
                        "NAME ENV=VALUE ...")
    args = p.parse_args(argv)
    if args.levels:
        for name, env in levels().items():
            print(" ".join([name, *(f"{k}={v}" for k, v in env.items())]))
        return
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(capabilities(device).to_json(), indent=2))


if __name__ == "__main__":
    main()
