"""GPU benchmark of exported engines (run on a CUDA machine):

    python benchmarks/gpu/bench_export.py OUT.json

The CPU benchmark's cases (benchmarks/export_cases.py: the 2D MLP 4 x 512 with 16 midpoint steps,
the small UNet with 4) at batch 1 (latency) and 4096 (throughput), and the exact 2D likelihood at
batch 1024, for: flow_matching's ODESolver, eager fastfm, torch.compile, the AOTInductor engine,
the CUDA-graph runner (torch.compile captured in a CUDA graph), the ONNX engine when onnxruntime has
its CUDA provider, TensorRT when torch-tensorrt is installed, and bf16 AOTI / CUDA-graph engines.
Every engine build checks parity; every timed output is checked against eager here. An
implementation that fails records its error instead of stopping the run. Medians of synchronised
wall-clock times.

``--device cpu --quick`` runs the same code on the CPU with tiny models (CUDA-only backends left
out); the test suite runs it that way.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for export_cases

from export_cases import MODELS, QUICK, WORKLOADS, check, inputs, make_runs, runner

GOALS = {("mlp", "sample", 1): 8.0, ("mlp", "likelihood", 1024): 4.0}


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
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    fn(x)
    times = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(root: Path, models: dict[str, dict[str, Any]], workloads: list[tuple[str, str, int]], impls: list[str],
          device: str, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for model, task, batch in workloads:
        x = inputs(models, model, batch, device)
        ref = runner(root, models, model, task, batch, "eager", device)[0](x)
        for impl in impls:
            row: dict[str, Any] = {"model": model, "task": task, "batch": batch, "impl": impl,
                                   "steps": models[model]["steps"], "nfe": 2 * models[model]["steps"]}
            try:
                fn, row["build_s"] = runner(root, models, model, task, batch, impl, device)
                row["max_abs_vs_eager"] = check(fn(x), ref, impl)
                row["median_s"] = measure(fn, x, rounds if batch == 1 else max(3, rounds // 10))
                row["rows_per_s"] = batch / row["median_s"]
            except Exception as e:  # a failing backend must not lose the other implementations' numbers
                row["error"] = f"{type(e).__name__}: {e}"[:2000]
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in rows:
        base = {r["impl"]: r.get("median_s") for r in rows if (r["model"], r["task"], r["batch"]) ==
                (row["model"], row["task"], row["batch"])}
        for name in ("flow_matching", "eager"):
            ok = base.get(name) and row.get("median_s")
            row[f"speedup_vs_{name}"] = base[name] / row["median_s"] if ok else None
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output JSON path")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="tiny models, small batches (a check of this script)")
    p.add_argument("--impls", default=None, help="comma-separated subset of the implementations")
    p.add_argument("--rounds", type=int, default=100, help="timed calls at batch 1 (a tenth at larger batches)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available (use --device cpu --quick for a CPU check)")
    models = QUICK if args.quick else MODELS
    workloads = [("mlp", "sample", 1), ("mlp", "likelihood", 8), ("unet", "sample", 2)] if args.quick else WORKLOADS
    impls = implementations(args.device)
    if args.impls:
        impls = [i for i in impls if i in args.impls.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        make_runs(Path(tmp), models)
        rows = bench(Path(tmp), models, workloads, impls, args.device, args.rounds)
    goals = [{"model": m, "task": t, "batch": b, "goal_speedup_vs_flow_matching": g,
              "speedups": {r["impl"]: r["speedup_vs_flow_matching"] for r in rows
                           if (r["model"], r["task"], r["batch"]) == (m, t, b) and r.get("speedup_vs_flow_matching")}}
             for (m, t, b), g in GOALS.items()]
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda, "quick": args.quick, "implementations": impls,
              "missing": [p for p in PEERS if importlib.util.find_spec(p) is None],
              "goals": goals, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
