"""Shared by the GPU benchmark scripts (bench_kernels.py, bench_train.py, bench_export.py): one piece of
code for the environment record, incremental JSON results, the time budget, timing, checked
torch.compile and kernel times from the profiler.

* ``environment``   device, versions (python, torch, CUDA, triton, flow_matching, ...), GPU properties, the
                    device's capabilities (fastfm.hardware) and what it cannot do, whether the run is dry.
* ``unsupported``   why the device cannot run a row that needs bf16, fp16, fp8 or flash attention (None where it
                    can): the scripts record such rows as skipped with this message instead of failing.
* ``add_common_args`` / ``parse_args``  --device, --dry (check.sh's CHECK_DRY=1: the CPU at --quick sizes, the
                    JSON marked ``dry``) and --budget, shared by the three scripts.
* ``Results``       the output JSON, rewritten (atomically) after every row, so a script killed by its
                    time limit still leaves every finished row; ``complete`` is true only at the end.
* ``Budget``        seconds a script may spend; rows it has no time for are recorded as skipped.
* ``time_kernel``   ms per call of a GPU op: replays of a CUDA graph of n calls (device time, no launch
                    overhead) and CUDA events around n eager calls (with launch overhead); wall clock on CPU.
* ``time_wall``     median seconds of one synchronised call (end-to-end engine latency).
* ``compile_checked`` torch.compile through a counting wrapper of the backend: a row whose calls did not
                    all run the compiled graph (recompile limit hit, eager fallback, recompile while timed)
                    is marked not compiled, never reported as compiled; the first call (the compile) can
                    run under a time limit.
* ``kernel_time``   sum of kernel (and memcpy/memset) times per call from torch.profiler's CUDA activity,
                    and the GPU-busy time (union of their intervals).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from fastfm import compat
from fastfm.hardware import MIN_CAPABILITY, Capabilities, capabilities

# ----------------------------------------------------------------------------- environment


def package_version(name: str) -> str | None:
    """Installed version of a distribution (``flow_matching`` or ``flow-matching`` spelling), None if missing."""
    for candidate in (name, name.replace("_", "-"), name.replace("-", "_")):
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _nvidia_smi() -> dict[str, str]:
    query = "driver_version,clocks.max.sm,clocks.max.memory,power.limit"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(zip(query.split(","), (v.strip() for v in out[0].split(",")))) if out else {}


def environment(caps: Capabilities, dry: bool = False) -> dict[str, Any]:
    """Machine, versions and capabilities of the device of ``caps``, recorded in every result file."""
    cuda = caps.cuda is not None
    env: dict[str, Any] = {
        "device": caps.cuda.name if cuda else (platform.processor() or platform.machine()),
        "device_type": torch.device(caps.device).type, "dry": dry, "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": package_version("triton"),
        "flow_matching": package_version("flow_matching"), "onnxruntime": package_version("onnxruntime"),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hardware": caps.to_json(), "unsupported": unsupported_needs(caps),
    }
    if cuda:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(gpu_memory_gib=props.total_memory / 2**30, sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", nvidia_smi=_nvidia_smi())
    return env


# need -> the CUDA compute capability it takes (bf16 and fp16 are native on some CPUs too, fp8 and flash attention
# on none)
NEEDS = MIN_CAPABILITY
_CPU_NEEDS = ("bf16", "fp16")


def _has(caps: Capabilities, need: str) -> bool:
    """Whether the device of ``caps`` has ``need`` (a key of NEEDS) natively."""
    if need == "flash_attention":
        return caps.cuda is not None and caps.cuda.flash_attention
    return getattr(caps, f"{need}_native")


def unsupported(caps: Capabilities, label: str) -> str | None:
    """Why the device of ``caps`` cannot run the row ``label`` (a dtype, mode or implementation name: ``bf16``,
    ``compile-bf16``, ``aoti_bf16``, ``flash_attention``, ...): the first need of NEEDS named in ``label`` that the
    device lacks, as the message the row is skipped with; None if it lacks none."""
    for need, (major, minor) in NEEDS.items():
        if need not in label or _has(caps, need):
            continue
        what = need.replace("_", " ")
        if caps.cuda is not None:
            have = caps.cuda.capability
            return f"{what} needs compute capability >= {major}.{minor}; this device is sm_{have[0]}{have[1]}"
        if need in _CPU_NEEDS:
            return f"{what} is not native on this CPU ({caps.machine_class}, oneDNN ISA {caps.cpu.onednn_isa})"
        return f"{what} needs a CUDA GPU of compute capability >= {major}.{minor}; this device is {caps.machine_class}"
    return None


def unsupported_needs(caps: Capabilities) -> dict[str, str]:
    """Each need of NEEDS the device of ``caps`` lacks, with the message its rows are skipped with."""
    return {need: reason for need in NEEDS if (reason := unsupported(caps, need)) is not None}


def missing(packages: tuple[str, ...]) -> list[str]:
    import importlib.util

    return [p for p in packages if importlib.util.find_spec(p) is None]


# ----------------------------------------------------------------------------- results and budget


class Results:
    """The result JSON of one script, written after every change (tmp file + rename), so what finished
    before a timeout is on disk; ``finish()`` sets ``complete``."""

    def __init__(self, path: str | Path, **header: Any) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {**header, "complete": False}
        self.write()

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.write()

    def append(self, key: str, row: dict[str, Any]) -> dict[str, Any]:
        self.data.setdefault(key, []).append(row)
        self.write()
        return row

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)

    def finish(self) -> dict[str, Any]:
        self.data["complete"] = True
        self.write()
        return self.data


class Budget:
    """Seconds a script may spend (None: unlimited), from construction."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds, self.start = seconds, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def allows(self, need: float = 0.0) -> bool:
        """Whether ``need`` more seconds fit (a row starts only while this holds)."""
        return self.left() > need

    def skipped(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` marked as skipped for lack of time."""
        row["skipped"] = f"time budget of {self.seconds:g} s spent ({self.elapsed():.1f} s elapsed)"
        return row

    def record(self) -> dict[str, Any]:
        return {"budget_s": self.seconds, "elapsed_s": round(self.elapsed(), 3)}


# ----------------------------------------------------------------------------- time limits


class TimeLimitExceeded(BaseException):
    """Raised by ``time_limit`` (a BaseException, so library code catching Exception does not swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[bool]:
    """Raise TimeLimitExceeded in this block after ``seconds`` (SIGALRM: main thread on POSIX only).
    Yields whether a limit is enforced."""
    usable = (seconds is not None and hasattr(signal, "SIGALRM")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield False
        return

    def on_alarm(signum, frame):
        raise TimeLimitExceeded(f"did not finish in {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 1e-3))
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_wall(fn: Callable[[], Any], device: torch.device | str, rounds: int, warmup: int = 1) -> float:
    """Median seconds of one synchronised call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _events_ms(fn: Callable[[], Any], n: int, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    return statistics.median(times)


def time_kernel(fn: Callable[[], Any], device: torch.device | str, target_ms: float = 20.0,
                graph: bool = True, reps: int = 5) -> dict[str, Any]:
    """Warm ms per call of ``fn`` (no arguments).

    CUDA: ``ms`` from replays of one CUDA graph holding n calls (the device time of the kernels: what the
    bandwidth figures use), ``ms_launch`` from CUDA events around n eager calls (adds the host's launch
    overhead where that dominates). n makes a repetition last about ``target_ms``. L2 is warm (the same
    tensors each call): irrelevant once a tensor is larger than L2. If capture fails, ``ms`` falls back
    to the events time and ``graph_error`` says why. CPU: wall-clock medians, ``method`` 'wall'.
    """
    if torch.device(device).type != "cuda":
        fn()
        t0 = time.perf_counter()
        fn()
        est = max(time.perf_counter() - t0, 1e-6) * 1e3
        n = max(1, min(1000, int(target_ms / est)))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / n)
        ms = statistics.median(times)
        return {"ms": ms, "ms_launch": ms, "calls": n, "method": "wall"}
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    est = _events_ms(fn, 3, 1)
    n = max(5, min(2000, int(target_ms / max(est, 1e-4))))
    out: dict[str, Any] = {"ms_launch": _events_ms(fn, n, reps), "calls": n}
    if graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(n):
                    fn()
            g.replay()
            torch.cuda.synchronize()
            out.update(ms=_events_ms(g.replay, 1, reps) / n, method="cuda_graph")
            del g
            return out
        except Exception as e:  # some callables cannot be captured: time them eagerly, and say so
            torch.cuda.synchronize()
            out["graph_error"] = f"{type(e).__name__}: {e}"[:500]
    out.update(ms=out["ms_launch"], method="events")
    return out


# ----------------------------------------------------------------------------- checked torch.compile


def set_recompile_limit(n: int) -> None:
    """Dynamo's per-code-object recompile limit (``recompile_limit``; ``cache_size_limit`` on older torch)."""
    cfg = compat.dynamo_config()
    setattr(cfg, "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit", n)


def _counting_backend(backend: str | Callable, counter: dict[str, int]) -> Callable:
    """``backend`` with every compiled graph wrapped to count its executions."""
    inner = compat.lookup_backend(backend) if isinstance(backend, str) else backend

    def compile_graph(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        compiled = inner(gm, example_inputs)
        counter["graphs"] += 1

        def run(*args: Any) -> Any:
            counter["calls"] += 1
            return compiled(*args)

        return run

    return compile_graph


class CheckedCompile:
    """A torch.compile'd function whose every call is counted; ``status()`` says whether all calls since
    ``reset_count()`` ran the compiled graph (one graph per call: fullgraph)."""

    def __init__(self, fn: Callable, backend: str | Callable = "inductor", dynamic: bool = False,
                 fullgraph: bool = True) -> None:
        self.counter = {"graphs": 0, "calls": 0}
        self.compiled = torch.compile(fn, backend=_counting_backend(backend, self.counter), fullgraph=fullgraph,
                                      dynamic=dynamic)
        self.python_calls = 0
        self._base = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.python_calls += 1
        return self.compiled(*args, **kwargs)

    def reset_count(self) -> None:
        self.python_calls, self._base = 0, self.counter["calls"]

    def status(self) -> tuple[bool, str | None]:
        ran = self.counter["calls"] - self._base
        if self.python_calls and ran < self.python_calls:
            return False, (f"ran eager: {self.python_calls - ran} of {self.python_calls} calls did not execute a "
                           "compiled graph (recompile limit hit or eager fallback)")
        return True, None


@contextlib.contextmanager
def strict_dynamo(error_on_recompile: bool = False) -> Iterator[None]:
    """Hitting the recompile limit raises (where torch has the switch) instead of silently running eager."""
    cfg = compat.dynamo_config()
    patch = {k: True for k in ("fail_on_recompile_limit_hit",) if hasattr(cfg, k)}
    if error_on_recompile:
        patch["error_on_recompile"] = True
    with cfg.patch(**patch):
        yield


def compile_checked(fn: Callable, args: tuple, *, backend: str | Callable = "inductor", fresh: bool = True,
                    time_limit_s: float | None = None, dynamic: bool = False,
                    fullgraph: bool = True) -> tuple[CheckedCompile | None, dict[str, Any]]:
    """Compile ``fn`` and run it once on ``args`` (the compilation), under ``time_limit_s``.

    Returns (callable or None, info): info has ``compiled`` (bool), ``compile_s``, ``graphs`` and, when
    not compiled, ``reason`` (compile error, time limit, or calls that ran eager). ``fresh`` resets dynamo
    first, so no earlier compile counts against this function's recompile limit. Time the returned callable
    inside ``timed(cc)``, which re-checks that every call ran compiled code and that nothing recompiled.
    """
    if fresh:
        torch.compiler.reset()
    cc = CheckedCompile(fn, backend, dynamic=dynamic, fullgraph=fullgraph)
    started = time.perf_counter()
    info: dict[str, Any] = {"backend": backend if isinstance(backend, str) else getattr(backend, "__name__", "custom"),
                            "dynamic": dynamic, "time_limit_s": time_limit_s}
    try:
        with time_limit(time_limit_s), strict_dynamo():
            cc(*args)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    except TimeLimitExceeded as e:
        torch.compiler.reset()
        info.update(compiled=False, compile_s=time.perf_counter() - started, reason=f"compile {e}")
        return None, info
    except Exception as e:
        info.update(compiled=False, compile_s=time.perf_counter() - started,
                    reason=f"compile failed: {type(e).__name__}: {e}"[:1000])
        return None, info
    info.update(compile_s=time.perf_counter() - started, graphs=cc.counter["graphs"])
    ok, reason = cc.status()
    info["compiled"] = ok and cc.counter["graphs"] > 0
    if not info["compiled"]:
        info["reason"] = reason or "no graph compiled"
        return None, info
    return cc, info


@contextlib.contextmanager
def timed(cc: CheckedCompile, info: dict[str, Any]) -> Iterator[None]:
    """Around the timing of ``cc``: a recompile raises, and afterwards ``info['compiled']`` is false with a
    reason if any call ran eager."""
    cc.reset_count()
    with strict_dynamo(error_on_recompile=True):
        try:
            yield
        except Exception as e:
            info.update(compiled=False, reason=f"failed while timed (recompile?): {type(e).__name__}: {e}"[:1000])
            raise
    ok, reason = cc.status()
    if not ok:
        info.update(compiled=False, reason=reason)


class DynamoWatch:
    """Dynamo's counters over a block (for code compiled elsewhere, e.g. inside the trainer)."""

    def __init__(self) -> None:
        self.counters = compat.dynamo_counters()
        self.before = self._snap()

    def _snap(self) -> dict[str, int]:
        c = self.counters
        return {"graphs": int(c["stats"]["unique_graphs"]), "graph_breaks": int(sum(c["graph_break"].values())),
                "recompile_limit_hits": int(sum(v for k, v in c["unimplemented"].items() if "recompile" in k.lower()))}

    def delta(self) -> dict[str, int]:
        now = self._snap()
        return {k: now[k] - self.before[k] for k in now}


# ----------------------------------------------------------------------------- profiler


def kernel_summary(events: list[dict[str, Any]], calls: int) -> dict[str, Any]:
    """Kernel, memcpy and memset events of a chrome trace: their count, summed time and the GPU-busy time
    (union of their intervals, so overlapping streams are not counted twice), per call, in ms."""
    gpu = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events
                 if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    total = sum(b - a for a, b in gpu)
    busy, end = 0.0, float("-inf")
    for a, b in gpu:
        if b > end:
            busy += b - max(a, end)
            end = b
    return {"available": True, "kernels_per_call": len(gpu) / calls, "kernel_sum_ms": total / calls / 1e3,
            "gpu_busy_ms": busy / calls / 1e3, "profiled_calls": calls}


def kernel_time(fn: Callable[[], Any], device: torch.device | str, calls: int = 3) -> dict[str, Any]:
    """``kernel_summary`` of ``calls`` calls of ``fn`` under torch.profiler (CUDA activity); on CPU
    ``available`` false with the reason."""
    if torch.device(device).type != "cuda":
        return {"available": False, "reason": "no CUDA device: kernel times come from the profiler's CUDA activity"}
    from torch.profiler import ProfilerActivity, profile

    try:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text()).get("traceEvents", [])
    except Exception as e:
        return {"available": False, "reason": f"profiler failed: {type(e).__name__}: {e}"[:500]}
    out = kernel_summary(events, calls)
    if not out["kernels_per_call"]:
        out.update(available=False, reason="the profiler recorded no kernels (CUDA-graph replays can be invisible "
                                           "to it)")
    return out


def log(row: dict[str, Any]) -> None:
    print(json.dumps(row, default=str), flush=True)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dry", action="store_true",
                   help="a dry run (check.sh's CHECK_DRY=1): --device cpu --quick, the JSON marked dry")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds this script may spend; rows left when it is spent are recorded as skipped")


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``p``'s arguments with --dry applied; exits when --device cuda has no CUDA."""
    args = p.parse_args(argv)
    if args.dry:
        args.device, args.quick = "cpu", True
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available (use --device cpu --quick for a CPU check)")
    return args


__all__ = ["NEEDS", "Budget", "CheckedCompile", "DynamoWatch", "Results", "TimeLimitExceeded", "add_common_args",
           "compile_checked", "environment", "kernel_summary", "kernel_time", "log", "missing", "package_version",
           "parse_args", "set_recompile_limit", "strict_dynamo", "sync", "time_kernel", "time_limit", "time_wall",
           "timed", "unsupported", "unsupported_needs"]

if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(environment(capabilities("cuda" if torch.cuda.is_available() else "cpu")), indent=2))
    sys.exit(0)
