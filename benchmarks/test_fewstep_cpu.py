"""CPU latency of few-step engines against the ODE, each at the quality it reaches, in the same run.

    teacher   a 2D MLP trained with CFM on the checkerboard (fastfm's default job, at the size below)
    meanflow  the same MLP with two times, trained with --objective meanflow (logit-normal times)

    meanflow-K        a K-step flow-map engine (K = 1, 2, 4: NFE K), AOTInductor and ONNX
    teacher-ode       the teacher's engine with fastfm's default solve (midpoint x 32 steps, NFE 64)
    flow_matching     Meta's ODESolver on the teacher: midpoint x 16 steps (NFE 32), eager

at batch 1 and 1024. Every implementation's samples are checked against its eager solve before it is timed, and
its quality is measured on 2,000 samples against 2,000 held-out points (sliced W2, seed 0) beside the teacher's
dopri5 samples. The runs are the checkerboard's teacher and MeanFlow runs of the fewstep experiment
(``python -m fastfm.experiments fewstep``: runs/experiments/fewstep/runs, or the folder FASTFM_FEWSTEP_RUNS names);
where they are missing, two runs of the same kind are trained first into a temporary folder.
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
from fastfm.training.config import TrainConfig
from fastfm.training.trainer import train

MLP = {"hidden": 256, "depth": 4}
TRAINING: dict[str, dict[str, Any]] = {  # the two runs: the same MLP, the same data and budget
    "teacher": {},
    "meanflow": {"objective": "meanflow", "time_sampler": "logit-normal"},
}
STEPS, BATCH = 4000, 512
QUALITY_N = 2000
FLOW_MATCHING_STEPS = 16
IMPLS: dict[str, dict[str, Any]] = {  # implementation -> (run, settings, engine backend or None)
    **{f"meanflow-{k}-{b}": {"run": "meanflow", "settings": {"steps": k}, "backend": b}
       for k in (1, 2, 4) for b in ("aoti", "onnx")},
    "teacher-ode-aoti": {"run": "teacher", "settings": {"solver": "midpoint", "steps": 32}, "backend": "aoti"},
    "flow_matching": {"run": "teacher", "settings": {"solver": "midpoint", "steps": FLOW_MATCHING_STEPS},
                      "backend": None},
}
CASES = [(impl, batch) for batch in (1, 1024) for impl in IMPLS]


EXPERIMENT_RUNS = {"teacher": "checkerboard-teacher", "meanflow": "checkerboard-meanflow"}
"""The fewstep experiment's run directories of the two runs."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = Path(os.environ.get("FASTFM_FEWSTEP_RUNS", "runs/experiments/fewstep/runs"))
    found = {name: folder / key for name, key in EXPERIMENT_RUNS.items()}
    if all((run / "model.json").exists() for run in found.values()):
        return found
    root = tmp_path_factory.mktemp("fewstep_runs")
    for name, options in TRAINING.items():
        train(TrainConfig(data="checkerboard", model_args=MLP, steps=STEPS, batch_size=BATCH, out=str(root / name),
                          device="cpu", log_every=STEPS, eval_n=2, n_samples=8, **options).validate())
    return {name: root / name for name in TRAINING}


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
    nfe = case["settings"]["steps"] * (2 if case["run"] == "teacher" else 1)
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
