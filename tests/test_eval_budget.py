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
from torch import nn

from fastfm import evaluate, sample

from fastfm.evaluation import budget

from fastfm.training import trainer
from fastfm.evaluation.budget import (BudgetedSampler, chunk_points, nll_seconds_per_point, points_left, points_within,
                           sample_seconds_per_point)
from fastfm.run.meta import RunMeta
from fastfm.solve import EagerSampler, InferenceSettings, nll_report, plan_solve
from fastfm.solve.sampler import Progress
from fastfm.models import build_model
from fastfm.path.affine import get_path

UNET = {"name": "unet", "in_channels": 1, "image_size": 8, "model_channels": 8, "channel_mult": [1],
        "num_res_blocks": 1}


def test_points_within_a_budget():
    assert points_within(None, 1.0, 4, 2000) == 2000  # no budget: all asked for
    assert points_within(10.0, 0.5, 4, 2000) == 20
    assert points_within(10.0, 100.0, 4, 2000) == 4  # the floor
    assert points_within(1e6, 0.001, 4, 2000) == 2000  # the cap


def test_points_left_replan_from_the_measured_time():
    """Total = clamp(done + (budget - elapsed) // seconds per point, max(floor, done), planned), less done."""
    assert points_left(10.0, 4.0, 100, 0.0625, 8, 300) == 96  # 6 s left at 1/16 s a point
    assert points_left(10.0, 4.0, 100, 0.0625, 8, 150) == 50  # never beyond the plan
    assert points_left(10.0, 12.0, 100, 0.0625, 8, 300) == 0  # budget spent: stop
    assert points_left(10.0, 12.0, 3, 1.0, 8, 300) == 5  # ... but the floor is honoured
    assert points_left(10.0, 9.5, 8, 1.0, 8, 300) == 0


def test_chunks_of_a_budgeted_evaluation():
    """ceil(n / 8) points a chunk, at least the floor, at most a batch."""
    assert budget.REPLAN_CHUNKS == 8
    assert chunk_points(2000, 8, 1000) == 250
    assert chunk_points(100, 8, 1000) == 13
    assert chunk_points(20, 8, 1000) == 8
    assert chunk_points(2000, 8, 64) == 64


class FakeClock:
    """Seconds that pass only while a model runs: ``cost`` per point of every call (``slowdown`` times that)."""

    def __init__(self, cost: float) -> None:
        self.now, self.cost, self.slowdown = 0.0, cost, 1

    def __call__(self) -> float:
        return self.now

    def charge(self, points: int) -> None:
        self.now += points * self.cost * self.slowdown


class Costly(nn.Module):
    """``model`` whose every call costs ``clock.charge`` of its batch."""

    def __init__(self, model: nn.Module, clock: FakeClock) -> None:
        super().__init__()
        self.model, self.clock = model, clock

    def forward(self, x, t, **kw):
        self.clock.charge(x.shape[0])
        return self.model(x, t, **kw)


def mlp(**args) -> nn.Module:
    torch.manual_seed(0)
    return build_model({"name": "mlp", "dim": 3, "hidden": 16, "depth": 2, **args}).eval()


@pytest.mark.parametrize("slowdown", [1, 4])
def test_the_nll_replans_when_the_machine_slows_down(monkeypatch, slowdown: int):
    """Fake seconds, 2^-7 per point of a model call; euler x 4 with the exact divergence of D = 3: 12 calls,
    12 / 128 s a point. The probe (warm-up on 1 point, one step on 32: 99 / 128 s) plans 98 points within
    10 s; they go in chunks of 13. Then the machine gets ``slowdown`` times slower: a chunk measures 48 / 128 s
    a point, the 13 done leave 10 - 723 / 128 s, 11 more points; the evaluation stops at 24, within the
    budget. At the probe's speed all 98 points run, within the budget."""
    clock = FakeClock(2 ** -7)
    monkeypatch.setattr(budget, "clock", clock)
    settings = InferenceSettings(solver="euler", steps=4, divergence="exact")
    sampler = EagerSampler(Costly(mlp(), clock), get_path("condot"), RunMeta.bare((3,)), settings=settings)
    x = torch.randn(200, 3)
    per = nll_seconds_per_point(sampler, x)
    assert per == 12 / 128 and clock.now == 99 / 128
    planned = points_within(10.0 - clock.now, per, 8, len(x))
    assert planned == 98
    clock.slowdown = slowdown
    budgeted = BudgetedSampler(sampler, 10.0, 0.0, 8)
    res = budgeted.log_likelihood(x[:planned])
    assert clock.now <= 10.0
    if slowdown == 1:
        assert len(res.log_prob) == 98 and [r["points"] for r in budgeted.replans] == [98] * 8
    else:
        assert len(res.log_prob) == 24 and budgeted.replans == [
            {"done": 13, "elapsed_s": 723 / 128, "seconds_per_point": 48 / 128, "points": 13 + 11},
            {"done": 24, "elapsed_s": 1251 / 128, "seconds_per_point": 48 / 128, "points": 24}]
    # the points done are those of one unbudgeted call with the chunk as batch size
    batched = EagerSampler(sampler.model, sampler.path, RunMeta.bare((3,)), settings=InferenceSettings(
        solver="euler", steps=4, divergence="exact", batch_size=13))
    assert torch.equal(res.log_prob, batched.log_likelihood(x[:len(res.log_prob)]).log_prob)


def test_chunks_give_what_one_call_gives():
    """One generator through the chunks: Hutchinson probes, prior draws and default labels (cycling through
    the classes) as in one call with the chunk as batch size, and with the exact divergence as in one call of
    any batch size; the NLL report is that of the points done."""
    model = mlp(num_classes=3)

    def sampler(**settings):
        return EagerSampler(model, get_path("condot"), RunMeta.bare((3,), num_classes=3),
                            settings=InferenceSettings(solver="midpoint", steps=3, **settings))

    x = torch.randn(50, 3)
    for divergence in ("hutchinson", "exact"):
        budgeted = BudgetedSampler(sampler(divergence=divergence), 1e9, budget.clock(), 8)
        chunked = nll_report(budgeted, x, seed=3)
        assert chunked == nll_report(sampler(divergence=divergence, batch_size=8), x, seed=3)
        assert [r["done"] for r in budgeted.replans] == [8, 16, 24, 32, 40, 48, 50]
    one = nll_report(sampler(divergence="exact"), x, seed=3)
    assert chunked["n"] == one["n"] == 50 and chunked["nll_nats"] == pytest.approx(one["nll_nats"], rel=1e-6)
    budgeted = BudgetedSampler(sampler(), 1e9, budget.clock(), 8)
    a = budgeted.sample(50, seed=3, transport=True)
    b = sampler(batch_size=8).sample(50, seed=3, transport=True)
    for name in ("x", "kinetic", "straightness"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.nfe == b.nfe and a.log_prob is None


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
        return EagerSampler(unet, path, RunMeta.bare((1, 8, 8), kind="image"), settings=InferenceSettings(batch_size=500, **settings))

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
        return EagerSampler(model, get_path("condot"), RunMeta.bare((3,)), settings=InferenceSettings(batch_size=4, **settings))

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
    def steps(**settings):
        return plan_solve(InferenceSettings(**settings), RunMeta.bare((3,)), get_path("condot")).describe()["steps"]

    assert steps(solver="midpoint", steps=32) == 32
    assert steps(solver="dopri5", steps=32) == "adaptive"
    assert steps(solver="euler", steps=32, grid=(0.0, 0.5, 0.9, 1.0)) == 3


def finite(value) -> bool:
    """Every number in a (nested) summary is finite."""
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, list):
        return all(finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def check_plan(plan: dict, what: str, budget_s: float, asked: int, done: int) -> None:
    """The arithmetic of one budgeted part of ``eval_plan`` (``what``: sample or nll): the points planned
    from the probe's seconds per point fit the budget (up to the floor of 8), every re-plan is
    clamp(done + (budget - elapsed) // measured seconds per point, max(8, done), planned), and the last
    re-plan is the points done."""
    prefix, planned_key = ("sample", "samples_planned") if what == "sample" else ("nll", "nll_points_planned")
    planned, per, replans = plan[planned_key], plan[f"{prefix}_seconds_per_point"], plan[f"{prefix}_replans"]
    floor = min(asked, 8)
    assert floor <= done <= planned <= asked and per > 0
    assert planned == floor or planned * per <= budget_s
    assert replans and replans[-1]["done"] == replans[-1]["points"] == done
    for before, r in zip([None, *replans], replans):
        assert r["done"] > (before["done"] if before else 0) and r["seconds_per_point"] > 0
        total = r["done"] + int((budget_s - r["elapsed_s"]) // r["seconds_per_point"])
        assert r["points"] == min(planned, max(floor, r["done"], total))


def test_budgeted_final_evaluation_of_an_image_run(tmp_path: Path):
    """A digits UNet with the default evaluation: the NLL is sized to the budget (far fewer than the
    2000 test points asked for) and reported with its plan, whose arithmetic holds."""
    run = run_training(tmp_path / "digits", "--data", "digits", "--eval-n", "2000", "--eval-steps", "32",
                       "--eval-budget", "3", "--model-args", "model_channels=8", "channel_mult=[1]",
                       "num_res_blocks=1", model=[], steps=2)
    plan = run.summary["eval_plan"]
    test = run.summary["test"]
    assert plan["budget_s"] == 3 and test["n"] == plan["nll_points"] < 2000
    assert test["divergence"].startswith("hutchinson") and finite(run.summary)
    check_plan(plan, "sample", 1.5, 50, plan["samples"])
    check_plan(plan, "nll", 3, 2000, test["n"])


@pytest.mark.parametrize("slowdown", [1, 4])
def test_a_training_run_evaluation_replans_on_a_slower_machine(tmp_path: Path, monkeypatch, slowdown: int):
    """Fake seconds that pass only in model calls (2^-8 per point of a call); after the NLL's probe the
    machine gets ``slowdown`` times slower: the NLL stops early within the budget, with fewer points than
    planned and the plan's arithmetic exact; at the probe's speed every planned point runs.

    Midpoint x 4 on checkerboard: a sample costs 8 calls (1/32 s), an NLL point 16 with the exact divergence
    (1/16 s). Sample probe 66/256 s, 100 samples 3.125 s, NLL probe 132/256 s: 3.8984375 s spent, 97 points
    planned, in chunks of 13. Four times slower, 13 points take 3.25 s: 11 more fit, 24 in all, 9.90 s."""
    clock = FakeClock(2 ** -8)
    monkeypatch.setattr(budget, "clock", clock)
    monkeypatch.setattr(trainer, "clock", clock)
    costly, probe = Progress.forward, budget.nll_seconds_per_point

    def forward(self, x, *args, **kw):
        clock.charge(x.shape[0])
        return costly(self, x, *args, **kw)

    def slower_after(*args, **kw):
        per = probe(*args, **kw)
        clock.slowdown = slowdown
        return per

    monkeypatch.setattr(Progress, "forward", forward)
    monkeypatch.setattr(budget, "nll_seconds_per_point", slower_after)
    run = run_training(tmp_path / "toy", "--data", "checkerboard", "--eval-n", "300", "--n-samples", "100",
                       "--eval-steps", "4", "--eval-budget", "10", steps=2)
    plan, test = run.summary["eval_plan"], run.summary["test"]
    assert finite(run.summary) and plan["seconds"] == clock.now <= 10
    assert plan["samples"] == plan["samples_planned"] == 100  # before the slowdown: all planned
    check_plan(plan, "sample", 5, 100, 100)
    check_plan(plan, "nll", 10, 300, test["n"])
    measured = {r["seconds_per_point"] for r in plan["nll_replans"]}
    assert measured == {slowdown * plan["nll_seconds_per_point"]}  # the fake costs, exactly
    assert plan["nll_points_planned"] == 97 and test["n"] == plan["nll_points"] == (97 if slowdown == 1 else 24)
    assert plan["seconds"] == (9.9609375 if slowdown == 1 else 9.8984375)


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
        writes = [ln.split() for ln in out.splitlines() if "summarize" in ln]
        assert writes and all(results(ln, ".benchmarks/results") and not results(ln, "benchmarks/results")
                              for ln in writes)
        assert results(subprocess.run(["make", "-n", target, "RESULTS=benchmarks/results"], cwd=root,
                                      capture_output=True, text=True, check=True).stdout.split(), "benchmarks/results")


def results(words: list[str], folder: str) -> bool:
    """A command's words name ``folder`` or a path in it."""
    return any(w == folder or w.startswith(folder + "/") for w in words)


def test_sample_reports_the_steps_that_ran(toy_run):
    out = last_json(call(sample.main, ["--checkpoint", str(toy_run.dir), "--n", "8", "--solver", "euler",
                                       "--grid", "0,0.5,1", "--out", str(toy_run.dir / "s")]))
    assert out["steps"] == 2 and out["nfe"] == 2


def test_stiff_field_under_an_adaptive_solver_is_one_clear_error(monkeypatch):
    """torchdiffeq asserts when its step size underflows (VP with x1 prediction near t = 1 did)."""
    import torchdiffeq

    from fastfm.solve.solvers import solve

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
    evaluation is planned from its measured costs and re-planned as it runs (``check_plan``; no wall clock
    of a shared machine), and every number comes back finite."""
    run = run_training(tmp_path / name, *README_RUNS[name], "--eval-n", "2000", "--n-samples", "2000",
                       "--eval-steps", "32", model=[], steps=2)
    plan = run.summary["eval_plan"]
    budget_s = plan["budget_s"]
    assert budget_s >= 10 and finite(run.summary)
    asked = 64 if name in ("digits-cond", "mnist5k") else 2000  # images: a 64-sample grid
    check_plan(plan, "sample", budget_s / 2, asked, plan["samples"])
    test = run.summary["test"]
    if test is not None:  # gmm-to-moons: a data-set source has no density
        assert math.isfinite(test["nll_nats"]) and test["n"] == plan["nll_points"]
        check_plan(plan, "nll", budget_s, 2000, test["n"])
