"""CPU latency of few-step engines against the ODE, each at the quality it reaches, in the same run.

The runs are the checkerboard runs of the fewstep experiment (``python -m fastfm.experiments fewstep``:
runs/experiments/fewstep/runs, or the folder FASTFM_FEWSTEP_RUNS names; ``make bench-fewstep`` runs the
experiment first where its runs are missing): the same MLP trained as

    teacher   CFM (the ODE teacher)
    reflow    2-rectified flow++ on the teacher's pairs, from the teacher's weights
    meanflow  MeanFlow, a model of two times

and timed as

    meanflow-K-B      a K-step flow-map engine (K = 1, 2, 4: NFE K) on backend B (aoti, onnx)
    reflow-K-aoti     the reflowed model's Euler engine at K = 1, 2 steps (NFE K)
    teacher-ode-aoti  the teacher's engine with fastfm's default solve (midpoint x 32 steps, NFE 64)
    flow_matching     Meta's ODESolver on the teacher: midpoint x 16 steps (NFE 32), eager

at batch 1 and 1024. Every implementation's samples are checked against its eager solve before it is timed, and
its quality is measured on 2,000 samples against 2,000 held-out points (sliced W2, seed 0) beside the teacher's
dopri5 samples.
Run: make bench-fewstep (this file, then benchmarks/summarize_fewstep.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from export_cases import FlowMatchingModel, check
from torch import Tensor

from fastfm.evaluation.metrics import sample_quality
from fastfm.export import EngineRequest, export_engine, load
from fastfm.run.load import dataset_of, load_run
from fastfm.solve import EagerSampler, settings_with

RUNS = {"teacher": "checkerboard-teacher", "reflow": "checkerboard-reflow", "meanflow": "checkerboard-meanflow"}
"""The fewstep experiment's run directories this benchmark reads."""
QUALITY_N = 2000
FLOW_MATCHING_STEPS = 16
IMPLS: dict[str, dict[str, Any]] = {  # implementation -> run, settings, engine backend (None: flow_matching)
    **{f"meanflow-{k}-{b}": {"run": "meanflow", "settings": {"steps": k}, "backend": b}
       for k in (1, 2, 4) for b in ("aoti", "onnx")},
    **{f"reflow-{k}-aoti": {"run": "reflow", "settings": {"solver": "euler", "steps": k}, "backend": "aoti"}
       for k in (1, 2)},
    "teacher-ode-aoti": {"run": "teacher", "settings": {"solver": "midpoint", "steps": 32}, "backend": "aoti"},
    "flow_matching": {"run": "teacher", "settings": {"solver": "midpoint", "steps": FLOW_MATCHING_STEPS},
                      "backend": None},
}
CASES = [(impl, batch) for batch in (1, 1024) for impl in IMPLS]


@pytest.fixture(scope="module")
def runs() -> dict[str, Path]:
    folder = Path(os.environ.get("FASTFM_FEWSTEP_RUNS", "runs/experiments/fewstep/runs"))
    found = {name: folder / key for name, key in RUNS.items()}
    missing = [str(run) for run in found.values() if not (run / "model.json").exists()]
    if missing:
        pytest.fail(f"no fewstep experiment runs {missing}: run python -m fastfm.experiments fewstep first "
                    "(make bench-fewstep does)")
    return found


def eager(run_dir: Path, settings: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    run = load_run(run_dir)
    plan = EagerSampler.from_run(run, settings_with(settings)).plan()
    return torch.no_grad()(lambda x: plan.run(run.model, run.path, x).x)


def implementation(runs: dict[str, Path], impl: str, batch: int, root: Path) -> Callable[[Tensor], Tensor]:
    case = IMPLS[impl]
    if case["backend"] is None:  # flow_matching's ODESolver on the teacher
        from flow_matching.solver import ODESolver

        run = load_run(runs[case["run"]])
        solver, grid = ODESolver(FlowMatchingModel(run.model)), torch.tensor([0.0, 1.0])
        return torch.no_grad()(lambda x: solver.sample(x_init=x, step_size=1 / FLOW_MATCHING_STEPS,
                                                       method="midpoint", time_grid=grid))
    out = root / f"{impl}-{batch}"
    export_engine(runs[case["run"]], EngineRequest.of("sample", batch=batch, backend=case["backend"],
                                                      **case["settings"]), out, device="cpu", force=True)
    engine = load(out)
    return lambda x: engine(x).x


def quality(run_dir: Path, fn: Callable[[Tensor], Tensor]) -> dict[str, float]:
    """Sliced W2 and energy distance of QUALITY_N samples (batches of 1024 through ``fn``) to held-out points."""
    x0 = torch.randn(QUALITY_N, 2, generator=torch.Generator().manual_seed(0))
    x = torch.cat([fn(x0[i:i + 1024]) for i in range(0, QUALITY_N, 1024)])
    test = dataset_of(load_run(run_dir).meta).test[:QUALITY_N]
    return sample_quality(x, test, 0)


@pytest.mark.parametrize("impl, batch", CASES, ids=[f"{i}-b{b}" for i, b in CASES])
def test_fewstep(benchmark, runs: dict[str, Path], tmp_path: Path, impl: str, batch: int) -> None:
    case = IMPLS[impl]
    fn = implementation(runs, impl, batch, tmp_path)
    ref = eager(runs[case["run"]], case["settings"])
    x = torch.randn(batch, 2, generator=torch.Generator().manual_seed(1))
    err = check(fn(x), ref(x), impl)
    benchmark.group = f"sample batch {batch}"
    benchmark.pedantic(fn, args=(x,), rounds=200 if batch == 1 else 5, warmup_rounds=2)
    nfe = case["settings"]["steps"] * (2 if case["settings"].get("solver") == "midpoint" else 1)
    info = {"impl": impl, "batch": batch, "run": case["run"], "nfe": nfe, "max_abs_vs_eager": err,
            "rows_per_s": batch / benchmark.stats.stats.median}
    if batch == 1024:  # the quality each reaches (the same function at the larger batch)
        info["quality"] = quality(runs[case["run"]], fn)
    benchmark.extra_info.update(info)


def test_dopri5_reference(benchmark, runs: dict[str, Path]) -> None:
    """The teacher's adaptive solve: the quality every few-step result is compared with."""
    fn = eager(runs["teacher"], {"solver": "dopri5"})
    x = torch.randn(1024, 2, generator=torch.Generator().manual_seed(1))
    benchmark.group = "reference"
    benchmark.pedantic(fn, args=(x,), rounds=1)
    benchmark.extra_info.update({"impl": "teacher-dopri5", "batch": 1024, "run": "teacher",
                                 "quality": quality(runs["teacher"], fn)})
