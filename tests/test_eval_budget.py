"""What a user sees of evaluation: its cost sized before it starts, its progress, what ran, the --help pages.

Before: an image run's unrequested final NLL evaluated 2000 test points with a UNet JVP per solver
stage (35+ minutes after 2 minutes of training, one progress bar that never moved).
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import call, help_text, last_json, run_training

from fastfm import evaluate, sample
from fastfm import budget
from fastfm.budget import nll_seconds_per_point, points_within, sample_seconds_per_point
from fastfm.inference import EagerSampler, InferenceSettings, Progress, nll_report
from fastfm.models import build_model
from fastfm.paths import get_path

UNET = {"name": "unet", "in_channels": 1, "image_size": 8, "model_channels": 8, "channel_mult": [1],
        "num_res_blocks": 1}


def test_points_within_a_budget():
    assert points_within(None, 1.0, 4, 2000) == 2000  # no budget: all asked for
    assert points_within(10.0, 0.5, 4, 2000) == 20
    assert points_within(10.0, 100.0, 4, 2000) == 4  # the floor
    assert points_within(1e6, 0.001, 4, 2000) == 2000  # the cap


def test_measured_costs_are_one_timed_step_scaled(monkeypatch):
    """Per-point seconds come from one timed solver step (a 1-step solve, really run), scaled by the steps;
    the timed batch grows (32, 128, 512, ... up to a batch) until a call is long enough to amortise
    per-call overhead. No fixed-step solver, no estimate."""
    seconds = {32: 0.01, 128: 0.02, 500: 0.5}
    timed = []

    def fake_timed(fn, k):
        fn(k)
        timed.append(k)
        return seconds.get(k, 0.8)

    monkeypatch.setattr(budget, "_timed", fake_timed)
    torch.manual_seed(0)
    unet = build_model(UNET).eval()
    path = get_path("condot")

    def sampler(**settings):
        return EagerSampler(unet, path, (1, 8, 8), settings=InferenceSettings(batch_size=500, **settings))

    assert nll_seconds_per_point(sampler(steps=64), torch.randn(600, 1, 8, 8)) == pytest.approx(0.5 / 500 * 64)
    assert timed == [32, 128, 500]  # grown while calls were short, capped at the batch
    timed.clear()
    assert nll_seconds_per_point(sampler(steps=10), torch.randn(3, 1, 8, 8)) == pytest.approx(0.8 / 3 * 10)
    assert sample_seconds_per_point(sampler(steps=32), 40) == pytest.approx(0.8 / 40 * 32)
    assert timed == [3, 32, 40]
    with pytest.raises(ValueError, match="fixed-step"):
        nll_seconds_per_point(sampler(solver="dopri5"), torch.randn(4, 1, 8, 8))


def test_progress_counts_every_model_evaluation():
    """The NLL bar's total (batches x NFE x JVPs per evaluation) is what the solve really does."""
    model = build_model({"name": "mlp", "dim": 3, "hidden": 16, "depth": 2}).eval()

    def sampler(**settings):
        return EagerSampler(model, get_path("condot"), (3,), settings=InferenceSettings(batch_size=4, **settings))

    calls = []
    real = Progress.forward

    def spy(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    Progress.forward = spy
    try:
        out = nll_report(sampler(solver="heun", steps=3, divergence="exact"), torch.randn(10, 3))
        assert len(calls) == 3 * 3 * 2 * 3  # batches x steps x stages x D JVPs
        calls.clear()
        sampler(solver="midpoint", steps=5).sample(10)
        assert len(calls) == 3 * 5 * 2
        calls.clear()  # the SDE sampler: a call per step, and a denoising jump where t = 1 is cut short
        sampler(steps=5, diffusion="1").sample(10)
        assert len(calls) == 3 * 6
    finally:
        Progress.forward = real
    assert out["steps"] == 3 and out["nfe"] == 6


def test_reported_steps_are_what_ran():
    assert InferenceSettings(solver="midpoint", steps=32).steps_run == 32
    assert InferenceSettings(solver="dopri5", steps=32).steps_run == "adaptive"
    assert InferenceSettings(solver="euler", steps=32, grid=(0.0, 0.5, 0.9, 1.0)).steps_run == 3


def test_budgeted_final_evaluation_of_an_image_run(tmp_path: Path):
    """A digits UNet with the default evaluation: the NLL is sized to the budget (far fewer than the
    2000 test points asked for), reported with its plan, and finishes near the budget."""
    run = run_training(tmp_path / "digits", "--data", "digits", "--eval-n", "2000", "--eval-steps", "32",
                       "--eval-budget", "3", "--model-args", "model_channels=8", "channel_mult=[1]",
                       "num_res_blocks=1", model=[], steps=2)
    plan = run.summary["eval_plan"]
    test = run.summary["test"]
    assert plan["budget_s"] == 3 and test["n"] == plan["nll_points"] < 2000
    assert test["divergence"].startswith("hutchinson") and math.isfinite(test["bits_per_dim"])
    assert plan["seconds"] < 3 * 3 + 10  # the floor of points can overrun a tiny budget, not by minutes


def test_unbudgeted_evaluation_on_request(tmp_path: Path):
    run = run_training(tmp_path / "toy", "--data", "checkerboard", "--eval-n", "40", "--eval-budget", "0",
                       "--eval-divergence", "exact", steps=2)
    assert run.summary["test"]["n"] == 40 and run.summary["test"]["divergence"] == "exact"
    assert run.summary["eval_plan"]["budget_s"] is None


@pytest.mark.parametrize("module,command", [(sample, "sample"), (evaluate, "evaluate")])
def test_help_pages(module, command):
    text = help_text(module.main)
    assert text.startswith(f"usage: python -m fastfm.{command}")
    for group in ("model:", "solver:", "likelihood:", "run:"):
        assert group in text
    assert "(default: auto)" in text and "(default: 1000)" in text  # defaults shown


def test_benchmarks_do_not_rewrite_committed_results():
    """make's benchmark targets write under .benchmarks/results unless RESULTS= says otherwise."""
    root = Path(__file__).resolve().parents[1]
    for target in ("bench", "bench-train", "bench-export"):
        out = subprocess.run(["make", "-n", "-W", "pyproject.toml", target], cwd=root, capture_output=True,
                             text=True, check=True).stdout
        writes = [ln for ln in out.splitlines() if "summarize" in ln]
        assert writes and all(" .benchmarks/results/" in ln and " benchmarks/results/" not in ln for ln in writes)
        assert "benchmarks/results/" in subprocess.run(
            ["make", "-n", target, "RESULTS=benchmarks/results"], cwd=root, capture_output=True, text=True,
            check=True).stdout


def test_sample_reports_the_steps_that_ran(toy_run):
    out = last_json(call(sample.main, ["--checkpoint", str(toy_run.dir), "--n", "8", "--solver", "euler",
                                       "--grid", "0,0.5,1", "--out", str(toy_run.dir / "s")]))
    assert out["steps"] == 2 and out["nfe"] == 2


def test_stiff_field_under_an_adaptive_solver_is_one_clear_error(monkeypatch):
    """torchdiffeq asserts when its step size underflows (VP with x1 prediction near t = 1 did)."""
    import torchdiffeq

    from fastfm.solvers import solve

    def underflow(*args, **kwargs):
        raise AssertionError("underflow in dt 0.0")

    monkeypatch.setattr(torchdiffeq, "odeint", underflow)
    with pytest.raises(ValueError, match="too stiff .* fixed-step solver"):
        solve(lambda t, y: y, torch.ones(2), solver="dopri5")


README_RUNS = {  # every data set and model the README trains, with its default evaluation (few steps)
    "checkerboard": ["--data", "checkerboard"],
    "moons-ot": ["--data", "moons", "--coupling", "ot"],
    "gmm-to-moons": ["--data", "moons", "--source", "gmm", "--path", "trig"],
    "8gaussians-vp": ["--data", "8gaussians", "--path", "vp", "--target", "x0"],
    "digits-cond": ["--data", "digits", "--class-cond", "--batch-size", "128"],
    "mnist5k": ["--data", "mnist5k", "--batch-size", "64"],
}


@pytest.mark.parametrize("name", list(README_RUNS))
def test_readme_runs_finish_their_default_evaluation(tmp_path: Path, name: str):
    """Default model and evaluation (2000 test points, 32 midpoint steps, automatic budget): the
    evaluation is sized to the budget, and every number comes back finite."""
    run = run_training(tmp_path / name, *README_RUNS[name], "--eval-n", "2000", "--n-samples", "2000",
                       "--eval-steps", "32", model=[], steps=2)
    plan = run.summary["eval_plan"]
    assert plan["budget_s"] >= 10 and plan["seconds"] < 3 * plan["budget_s"] + 30
    test = run.summary["test"]
    if test is not None:  # gmm-to-moons: a data-set source has no density
        assert math.isfinite(test["nll_nats"]) and test["n"] == plan["nll_points"]
