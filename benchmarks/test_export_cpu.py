"""CPU latency and throughput of exported engines against eager PyTorch, torch.compile and Meta's
flow_matching ODESolver, on the same model, solver and steps, in the same run.

    2D MLP (4 x 512), midpoint, 16 steps (NFE 32): sampling at batch 1 and 4096, exact likelihood at 1024
    small UNet (1 x 8 x 8, 16 channels), midpoint, 4 steps (NFE 8): sampling at batch 1 and 4096

``auto`` is the engine ``python -m fastfm.export`` builds by default (backend and dtype chosen by timing the
candidates at build time); ``aoti_bf16`` is a bf16 engine as asked, emulated where bf16 is not native.

Engines and compiled programs are built once per case (their build time goes to extra_info, not
the timing); every implementation's output is checked against the eager one before it is timed.
Run: make bench-export (this file, then benchmarks/summarize_export.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from export_cases import MODELS, SOLVER, WORKLOADS, check, chosen, inputs, make_runs, runner

IMPLS = ["flow_matching", "eager", "compile", "aoti", "onnx", "aoti_bf16", "auto"]
# bf16 engines on the MLP only (on 2 cores a bf16 UNet build adds minutes and shows the same trade-off).
CASES = [(*w, impl) for w in WORKLOADS for impl in IMPLS if impl != "aoti_bf16" or w[0] == "mlp"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench_export")
    make_runs(root, MODELS)
    return root


@pytest.mark.parametrize("model, task, batch, impl", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_export(benchmark, workdir: Path, model: str, task: str, batch: int, impl: str) -> None:
    fn, build_s = runner(workdir, MODELS, model, task, batch, impl)
    x = inputs(MODELS, model, batch)
    err = check(fn(x), runner(workdir, MODELS, model, task, batch, "eager")[0](x), impl)
    benchmark.group = f"{model} {task} batch {batch}"
    benchmark.pedantic(fn, args=(x,), rounds=100 if batch == 1 else 3, warmup_rounds=1)
    steps = MODELS[model]["steps"]
    benchmark.extra_info.update(model=model, task=task, batch=batch, impl=impl, solver=SOLVER, steps=steps,
                                nfe=2 * steps, build_s=round(build_s, 1), max_abs_vs_eager=err,
                                rows_per_s=batch / benchmark.stats.stats.median,
                                chosen=chosen(workdir, model, task, batch, impl))
