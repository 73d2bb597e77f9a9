"""GPU benchmark of exported engines (run on a CUDA machine):

    python benchmarks/gpu/bench_export.py OUT.json [--rounds N] [--budget SECONDS]

The CPU benchmark's cases (benchmarks/export_cases.py: the 2D MLP 4 x 512 with 16 midpoint steps = 32
evaluations, the small UNet with 4) at batch 1 (latency) and 4096 (throughput), and the exact 2D likelihood
at batch 1024, for: flow_matching's ODESolver, eager fastfm, torch.compile, the AOTInductor engine, the
CUDA-graph runner (torch.compile captured in a CUDA graph), the ONNX engine when onnxruntime has its CUDA
provider, TensorRT when torch-tensorrt is installed, and bf16 AOTI / CUDA-graph engines. Every engine
build checks parity; every timed output is checked against eager here. An implementation that fails
records its error instead of stopping the run. Medians of synchronised wall-clock times.

Each row also holds, from torch.profiler's CUDA activity over a few calls, the kernels per call, the sum of
their times and the GPU-busy time per call; ``launch_gap_ms`` = engine time - GPU-busy time is the launch
(host) overhead left to close. On CPU these are recorded as not available. ``goals`` checks issue 12's
engine goals against flow_matching: >= 20x and <= 0.5 ms for sampling the MLP at batch 1, >= 10x for the
exact 2D likelihood at batch 1024, >= 3x for a bf16 UNet engine at batch 4096, as booleans with every
engine's time, speedup and kernel sum.

Rows run goal rows first (flow_matching, eager and the engines meant to meet each goal), then the rest;
the JSON is rewritten after every row; ``--budget`` records rows it has no time left for as skipped, and
a row still running when the budget ends is stopped and recorded as an error.
``--device cpu --quick`` runs the same code on the CPU with tiny models (CUDA-only backends left
out); the test suite runs it that way; ``--dry`` is that, marked ``dry`` in the JSON (check.sh's dry run).
The bf16 engines are recorded as skipped, with the reason, on a device without native bf16 (compute
capability below 8.0, a CPU without AVX512-BF16 / AMX-BF16): ``common.unsupported``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for export_cases
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/gpu/, for common

from common import (Budget, Results, TimeLimitExceeded, add_common_args, environment, kernel_time, log,  # noqa: E402
                    missing, parse_args, time_limit, time_wall, unsupported)
from export_cases import MODELS, QUICK, WORKLOADS, check, inputs, make_runs, runner  # noqa: E402

from fastfm.hardware import Capabilities, capabilities  # noqa: E402

ENGINE_EXCLUDED = ("flow_matching", "eager", "compile")  # every other implementation is an exported engine
# Goals of issue 12 (quick runs use the same rows at their small batches): engine speedup over flow_matching's
# ODESolver, at most ``max_ms`` where given, only engines of ``dtype`` where given.
GOALS = [
    {"name": "sample_mlp_batch1", "model": "mlp", "task": "sample", "batch": 1, "quick_batch": 1,
     "min_speedup": 20.0, "max_ms": 0.5},
    {"name": "likelihood_mlp_batch1024", "model": "mlp", "task": "likelihood", "batch": 1024, "quick_batch": 8,
     "min_speedup": 10.0},
    {"name": "sample_unet_bf16_batch4096", "model": "unet", "task": "sample", "batch": 4096, "quick_batch": 2,
     "min_speedup": 3.0, "dtype": "bf16"},
]
# What runs first (within a budget): the goal rows' peer, eager and the engines meant to meet them.
PRIORITY = {("mlp", "sample"): ("flow_matching", "eager", "cudagraph", "aoti"),
            ("mlp", "likelihood"): ("flow_matching", "eager", "aoti", "cudagraph"),
            ("unet", "sample"): ("flow_matching", "eager", "cudagraph_bf16", "aoti_bf16")}
PEERS = ("flow_matching",)


def implementations(device: str) -> list[str]:
    """What can run on this device and installation (peers only where installed: see ``missing``)."""
    impls = [p for p in PEERS if importlib.util.find_spec(p) is not None] + ["eager", "compile", "aoti", "aoti_bf16"]
    if device == "cuda":
        impls += ["cudagraph", "cudagraph_bf16"]
        if importlib.util.find_spec("torch_tensorrt") is not None:
            impls.append("tensorrt")
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        if device == "cpu" or "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            impls.append("onnx")
    return impls


def measure(fn: Callable[[Tensor], Tensor], x: Tensor, rounds: int) -> float:
    """Median seconds of one synchronised call, after one warm-up call."""
    return time_wall(lambda: fn(x), x.device, rounds)


def plan(workloads: list[tuple[str, str, int]], impls: list[str], quick: bool) -> list[tuple[tuple[str, str, int], str]]:
    """(workload, impl) pairs, the goal rows' priority implementations first, then the rest in order."""
    goal_rows = [(g["model"], g["task"], g["quick_batch"] if quick else g["batch"]) for g in GOALS]
    pairs = [(w, i) for w in workloads for i in impls]

    def key(pair: tuple[tuple[str, str, int], str]) -> tuple[int, int, int]:
        workload, impl = pair
        first = PRIORITY.get(workload[:2], ())
        if workload in goal_rows and impl in first:  # goal by goal, its priority implementations in order
            return (0, goal_rows.index(workload), first.index(impl))
        return (1, 0, 0)

    return sorted(pairs, key=key)  # stable: the order of ``workloads`` x ``impls`` within each group


def bench(root: Path, models: dict[str, dict[str, Any]], workloads: list[tuple[str, str, int]], impls: list[str],
          caps: Capabilities, rounds: int, quick: bool = False, budget: Budget | None = None,
          results: Results | None = None) -> list[dict[str, Any]]:
    """One row per (workload, implementation), in ``plan`` order; an implementation the device of ``caps`` cannot
    run (``unsupported``) or one left when the budget is spent is a skipped row."""
    device = torch.device(caps.device).type
    budget = budget or Budget(None)
    rows: list[dict[str, Any]] = []
    refs: dict[tuple[str, str, int], Tensor] = {}
    for (model, task, batch), impl in plan(workloads, impls, quick):
        row: dict[str, Any] = {"model": model, "task": task, "batch": batch, "impl": impl,
                               "steps": models[model]["steps"], "nfe": 2 * models[model]["steps"]}
        reason = unsupported(caps, impl)
        if reason is not None:
            row["skipped"] = reason
        elif not budget.allows():
            budget.skipped(row)
        else:
            left = budget.left()
            try:  # a failing backend must not lose the other implementations' numbers
                with time_limit(None if left == float("inf") else left):
                    x = inputs(models, model, batch, device)
                    if (model, task, batch) not in refs:
                        refs[(model, task, batch)] = runner(root, models, model, task, batch, "eager", device)[0](x)
                    fn, row["build_s"] = runner(root, models, model, task, batch, impl, device)
                    row["max_abs_vs_eager"] = check(fn(x), refs[(model, task, batch)], impl)
                    row["median_s"] = measure(fn, x, rounds if batch == 1 else max(3, rounds // 10))
                    row["rows_per_s"] = batch / row["median_s"]
                    prof = kernel_time(lambda: fn(x), device)
                    row["kernels"] = prof
                    if prof.get("available"):
                        engine_ms = 1e3 * row["median_s"]
                        row.update(kernel_sum_ms=prof["kernel_sum_ms"], gpu_busy_ms=prof["gpu_busy_ms"],
                                   launch_gap_ms=engine_ms - prof["gpu_busy_ms"],
                                   launch_gap_frac=1 - prof["gpu_busy_ms"] / engine_ms)
            except TimeLimitExceeded:
                row["error"] = f"stopped: the time budget of {budget.seconds:g} s ran out during this row"
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:2000]
        rows.append(row)
        if results is not None:
            results.append("results", row)
        log(row)
    for row in rows:
        base = {r["impl"]: r.get("median_s") for r in rows if (r["model"], r["task"], r["batch"]) ==
                (row["model"], row["task"], row["batch"])}
        for name in ("flow_matching", "eager"):
            ok = base.get(name) and row.get("median_s")
            row[f"speedup_vs_{name}"] = base[name] / row["median_s"] if ok else None
    return rows


def goals(rows: list[dict[str, Any]], quick: bool) -> list[dict[str, Any]]:
    """Each goal of GOALS: the engines measured on its row, the best, and whether it is met (None: the peer or
    every engine is missing)."""
    out = []
    for g in GOALS:
        batch = g["quick_batch"] if quick else g["batch"]
        here = [r for r in rows if (r["model"], r["task"], r["batch"]) == (g["model"], g["task"], batch)]
        peer = next((r for r in here if r["impl"] == "flow_matching" and r.get("median_s")), None)
        engines = {}
        for r in here:
            if r["impl"] in ENGINE_EXCLUDED or not r.get("median_s"):
                continue
            if g.get("dtype") and not r["impl"].endswith("_" + g["dtype"]):
                continue
            ms = 1e3 * r["median_s"]
            ok = (r["speedup_vs_flow_matching"] or 0) >= g["min_speedup"] and ms <= g.get("max_ms", float("inf"))
            engines[r["impl"]] = {"ms": ms, "speedup_vs_flow_matching": r["speedup_vs_flow_matching"],
                                  "kernel_sum_ms": r.get("kernel_sum_ms"), "gpu_busy_ms": r.get("gpu_busy_ms"),
                                  "launch_gap_ms": r.get("launch_gap_ms"), "meets": ok if peer else None}
        best = max(engines, key=lambda i: engines[i]["speedup_vs_flow_matching"] or 0, default=None)
        out.append({**{k: v for k, v in g.items() if k != "quick_batch"}, "batch": batch,
                    "nfe": here[0]["nfe"] if here else None,
                    "flow_matching_ms": 1e3 * peer["median_s"] if peer else None, "engines": engines,
                    "best": best, "best_speedup": engines[best]["speedup_vs_flow_matching"] if best else None,
                    "met": any(e["meets"] for e in engines.values()) if peer and engines else None})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output JSON path")
    p.add_argument("--quick", action="store_true", help="tiny models, small batches (a check of this script)")
    p.add_argument("--impls", default=None, help="comma-separated subset of the implementations")
    p.add_argument("--rounds", type=int, default=100, help="timed calls at batch 1 (a tenth at larger batches)")
    add_common_args(p)
    args = parse_args(p, argv)
    caps = capabilities(args.device)
    models = QUICK if args.quick else MODELS
    workloads = [("mlp", "sample", 1), ("mlp", "likelihood", 8), ("unet", "sample", 2)] if args.quick else WORKLOADS
    impls = implementations(args.device)
    if args.impls:
        impls = [i for i in impls if i in args.impls.split(",")]
    budget = Budget(args.budget)
    results = Results(args.out, **environment(caps, args.dry), quick=args.quick, implementations=impls,
                      missing=missing(PEERS), rounds=args.rounds, results=[],
                      timing="median_s: median wall time of one synchronised call; kernel_sum_ms / gpu_busy_ms: "
                             "torch.profiler CUDA activity per call (sum / union of kernel intervals); "
                             "launch_gap_ms = engine time - GPU-busy time")
    with tempfile.TemporaryDirectory() as tmp:
        make_runs(Path(tmp), models)
        rows = bench(Path(tmp), models, workloads, impls, caps, args.rounds, args.quick, budget, results)
    results.data.update(results=rows, goals=goals(rows, args.quick), **budget.record())
    return results.finish()


if __name__ == "__main__":
    main()
