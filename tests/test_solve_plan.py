"""The solve plan (fastfm.solve.plan): the settings resolved against a run once, for the eager sampler, the
engines, the parity check and the Python API; its NFE and signature; every contradiction one error, the same
from ``sample``, ``evaluate``, ``export`` and the Python API; a new kind of solve added as one registered
class; the typed run metadata (``RunMeta``) it reads."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import cli_error
from test_export import DIGITS, MLP, UNET, VECTOR, make_run

from fastfm import evaluate, sample, seeding
from fastfm.commands import export as export_cli
from fastfm.export.spec import EngineRequest, ExportError, resolve
from fastfm.path import get_path
from fastfm.run import RunMeta, load_run
from fastfm.run.checkpoint import META
from fastfm.run.meta import MetaError
from fastfm.solve import PLAN_KINDS, EagerSampler, InferenceSettings, SolvePlan, ode_sample, plan_solve
from fastfm.solve.ode import SampleResult
from fastfm.solve.signature import TensorSlot


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan_runs")
    return {"mlp": make_run(root / "mlp", MLP, VECTOR, 0),
            "unet_sr": make_run(root / "unet_sr", {**UNET, "low_res_channels": 1}, DIGITS, 2)}


def _cli(command: str, run: Path, tmp_path: Path, argv: list[str]) -> str:
    """The one error line of ``command`` on ``run`` with ``argv``."""
    if command == "export":
        return cli_error(export_cli.main, ["--checkpoint", str(run), "--task", "sample", "--out", str(tmp_path / "e"),
                                           "--device", "cpu", "--backend", "aoti", "--dtype", "fp32", *argv])
    main = {"sample": sample.main, "evaluate": evaluate.main}[command]
    extra = ["--out", str(tmp_path / "s")] if command == "sample" else []
    return cli_error(main, ["--checkpoint", str(run), "--device", "cpu", *extra, *argv])


CONTRADICTIONS = [
    ({"diffusion": "1", "solver": "dopri5"}, ["--sde", "--solver", "dopri5"],
     "the SDE sampler integrates with Euler-Maruyama: --solver dopri5 does not apply", ("sample", "export")),
    ({"diffusion": "1", "solver": "rk4"}, ["--sde", "--solver", "rk4"],
     "the SDE sampler integrates with Euler-Maruyama: --solver rk4 does not apply", ("sample", "export")),
    ({"grid": (0.0, 0.5)}, ["--grid", "0,0.5"], "--grid must span the solve from t = 0 to t = 1, got 0 .. 0.5",
     ("sample", "evaluate")),
    ({"diffusion": "1", "grid": (0.0, 1.0)}, ["--sde", "--grid", "0,1"], "the SDE sampler takes --steps", ("sample",)),
    ({"guidance": 2.0}, ["--guidance", "2"], "guidance 2.0 needs a class-conditional model", ("sample", "export")),
    ({"class_label": 3}, ["--class-label", "3"], "class label 3 invalid: the model has no classes",
     ("sample", "export")),
]


@pytest.mark.parametrize("settings, argv, message, commands", CONTRADICTIONS,
                         ids=["sde-dopri5", "sde-rk4", "short-grid", "sde-grid", "guidance", "class-label"])
def test_a_contradiction_is_one_error_everywhere(runs: dict[str, Path], tmp_path: Path, settings: dict[str, Any],
                                                argv: list[str], message: str, commands: tuple[str, ...]) -> None:
    run = load_run(runs["mlp"])
    with pytest.raises(ValueError, match=message):  # the Python API: the eager sampler refuses at construction
        EagerSampler.from_run(run, InferenceSettings(**settings))
    if "export" in commands:  # ... and an engine request the same way
        with pytest.raises(ExportError, match=message):
            resolve(EngineRequest.of("sample", **settings), run.meta, run.path)
    for command in commands:
        msg = _cli(command, runs["mlp"], tmp_path, argv)
        assert msg == f"error: {message}" or msg.startswith(f"error: {message}"), (command, msg)
        assert "\n" not in msg
    assert not (tmp_path / "e").exists() and not (tmp_path / "s").exists()


def test_diffusion_without_sde_is_refused_by_both_commands(runs: dict[str, Path], tmp_path: Path) -> None:
    for command in ("sample", "export"):
        msg = _cli(command, runs["mlp"], tmp_path, ["--diffusion", "0.5"])
        assert msg == "error: --diffusion 0.5 applies to SDE sampling: add --sde (without it the ODE runs)", msg


@pytest.mark.parametrize("low, message", [
    (np.full((2, 1, 4, 4), np.nan, np.float32), "holds NaN/Inf values"),
    (np.zeros((5, 1, 3, 3), np.float32), r"expected shape \(N, 1, 4, 4\) with N >= 1 \(the 8x8 images pooled by 2\), "
                                         r"got \(5, 1, 3, 3\)"),
], ids=["nan", "shape"])
def test_bad_low_res_is_one_error_everywhere(runs: dict[str, Path], tmp_path: Path, low: np.ndarray,
                                             message: str) -> None:
    run = load_run(runs["unet_sr"])
    sampler = EagerSampler.from_run(run, InferenceSettings(steps=1))
    with pytest.raises(ValueError, match=message):  # the Python API
        sampler.sample(2, cond={"low_res": torch.from_numpy(low)}, progress=False)
    np.save(tmp_path / "low.npy", low)
    for command in ("sample", "export"):
        msg = _cli(command, runs["unet_sr"], tmp_path, ["--low-res", str(tmp_path / "low.npy"), "--steps", "1"])
        assert msg.startswith(f"error: --low-res {tmp_path / 'low.npy'}") and "\n" not in msg, msg
        assert re.search(message, msg), msg


def test_the_plan_resolves_what_runs(runs: dict[str, Path]) -> None:
    """Interval, final jump, NFE, model calls and signature, per kind."""
    run = load_run(runs["mlp"])
    vp_meta = replace(run.meta, path="vp")
    vp = get_path("vp")
    ode = plan_solve(InferenceSettings(solver="rk4", steps=3), vp_meta, vp)
    assert (ode.kind, ode.start, ode.denoise, ode.nfe, ode.calls) == ("ode", 0.0, True, 13, 13)
    lik = plan_solve(InferenceSettings(solver="heun", steps=4, divergence="hutchinson", probes=3), run.meta, run.path,
                     "likelihood")
    assert (lik.kind, lik.start, lik.end, lik.divergence, lik.probes) == ("likelihood", 1.0, 0.0, "hutchinson", 3)
    assert (lik.nfe, lik.calls) == (8, 24)  # 4 steps x 2 stages, each a JVP per probe
    assert [(s.name, s.shape) for s in lik.inputs(5)] == [("x1", (5, 2)), ("probes", (3, 5, 2))]
    sde = plan_solve(InferenceSettings(steps=6, diffusion="sin2:2"), run.meta, run.path)
    assert (sde.kind, sde.solver, sde.diffusion, sde.nfe) == ("sde", "euler", "sin2:2", 7)
    assert [s.name for s in sde.inputs(2)] == ["x0", "noise"] and sde.describe()["solver"] == "euler-maruyama"
    adaptive = plan_solve(InferenceSettings(solver="dopri5"), run.meta, run.path, "likelihood")
    assert adaptive.nfe is None and adaptive.describe() == {"solver": "dopri5", "steps": "adaptive"}
    grid = plan_solve(InferenceSettings(grid=(1.0, 0.5, 0.0)), run.meta, run.path)
    assert grid.grid == (0.0, 0.5, 1.0) and grid.steps == 2  # sampling runs a grid from noise to data
    with pytest.raises(ValueError, match="guidance 2 applies to sampling"):
        plan_solve(InferenceSettings(guidance=2.0), replace(run.meta, model={"num_classes": 3}), run.path,
                   "likelihood")


def test_the_plan_runs_what_the_functions_run(runs: dict[str, Path]) -> None:
    """``plan.run`` from explicit inputs equals ``ode_sample`` on the same x0; the eager sampler runs ``plan.run`` on
    the draws of ``plan.draw`` from the sampling stream of its seed."""
    run = load_run(runs["mlp"])
    plan = plan_solve(InferenceSettings(solver="midpoint", steps=4), run.meta, run.path)
    x0 = torch.randn(7, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ode_sample(run.model, run.path, x0, solver="midpoint", steps=4)
        got = plan.run(run.model, run.path, x0)
    assert torch.equal(got.x, want.x) and got.nfe == want.nfe == plan.nfe
    res = EagerSampler.from_run(run, InferenceSettings(solver="midpoint", steps=4)).sample(9, seed=3, progress=False)
    inputs = plan.draw(run.path, 9, seeding.generator(3, seeding.SAMPLE), "cpu")
    assert list(inputs) == ["x0"]
    with torch.no_grad():
        assert torch.equal(res.x, plan.run(run.model, run.path, inputs["x0"]).x)
    sampler = EagerSampler.from_run(run)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        sampler.sample(0)
    for bad in (torch.zeros(0, 2), torch.zeros(3, 3)):
        with pytest.raises(ValueError, match=r"x must have shape \(N, 2\) with N >= 1"):
            sampler.log_likelihood(bad)


def test_a_new_kind_of_solve_is_one_registered_class(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A toy 'flow map' kind (one Euler jump over the whole interval, asked for by its own solver name): the
    eager sampler runs it, its NFE and describe come from it, without touching any other module."""

    monkeypatch.setattr(PLAN_KINDS, "_entries", dict(PLAN_KINDS._entries))  # the registration ends with the test

    class OneJump(SolvePlan, kind="onejump", task="sample", help="one Euler jump over the interval"):
        @classmethod
        def applies(cls, task: str, settings: InferenceSettings, meta: RunMeta) -> bool:
            return task == "sample" and settings.solver == "euler" and settings.steps == 1

        @classmethod
        def resolve(cls, settings, meta, path, *, log_likelihood=False, transport=False) -> SolvePlan:
            start, end = path.time_interval(meta.target)
            return cls._base(settings, meta, start, end)

        def outputs(self, batch: int) -> list[TensorSlot]:
            return [TensorSlot("x", (batch, *self.shape), "float32")]

        def run(self, model, path, x, *, probes=None, noise=None, y=None, low_res=None) -> SampleResult:
            t = torch.zeros(x.shape[0])
            return SampleResult(x + (self.end - self.start) * model(x, t), 1)

        def output_values(self, res, x):
            return (res.x,)

    run = load_run(runs["mlp"])
    sampler = EagerSampler.from_run(run, InferenceSettings(solver="euler", steps=1))
    assert sampler.plan().kind == "onejump" and sampler.plan().nfe == 1
    res = sampler.sample(5, progress=False)
    x0 = sampler.plan().draw(run.path, 5, torch.Generator().manual_seed(0), "cpu")["x0"]
    assert res.nfe == 1 and res.x.shape == (5, 2) and torch.isfinite(res.x).all() and x0.shape == (5, 2)
    assert EagerSampler.from_run(run, InferenceSettings(solver="euler", steps=2)).plan().kind == "ode"


def test_run_meta_round_trips_and_names_what_is_wrong(runs: dict[str, Path]) -> None:
    obj = json.loads((runs["unet_sr"] / META).read_text())
    obj["data"].setdefault("args", {})  # as the trainer writes it
    meta = RunMeta.from_json(obj)
    assert meta.to_json() == obj and RunMeta.from_json(meta.to_json()) == meta  # saved and loaded unchanged
    assert meta.low_res_shape == (1, 4, 4) and meta.shape == (1, 8, 8)
    assert meta.num_classes is None and meta.data.num_classes == 10  # labelled data, an unconditional model
    images, labels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2, 3])
    cond = meta.conditioning(images, labels)
    assert set(cond) == {"low_res"} and cond["low_res"].shape == (3, 1, 4, 4)
    conditional = replace(meta, model={**meta.model, "num_classes": 10})
    assert set(conditional.conditioning(images, labels)) == {"y", "low_res"}
    torch.testing.assert_close(cond["low_res"][0, 0, 0, 0], images[0, 0, :2, :2].mean())
    for change, needle in [
        (lambda d: d.pop("target"), "lacks ['target']"),
        (lambda d: d["data"].update(shape=[0]), "data.shape must be a list of positive integers"),
        (lambda d: d["data"].update(kind="audio"), "data.kind must be one of"),
        (lambda d: d.update(superres=-1), "superres must be 0 or a factor"),
        (lambda d: d["path"].pop("name"), "lacks 'path.name'"),
    ]:
        bad = json.loads(json.dumps(obj))
        change(bad)
        with pytest.raises(MetaError, match=re.escape(needle)):
            RunMeta.from_json(bad)


def test_the_readme_python_api_runs(toy_run, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's Python API block, on a trained run: every import it names exists and the calls run."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S)
    assert code is not None
    scope: dict[str, Any] = {}
    exec(compile(code.group(1).replace('"runs/default"', repr(str(toy_run.dir))), "README.md", "exec"), scope)
    assert scope["x"].shape == (100, 2) and bool(torch.isfinite(scope["logp"]).all())
    assert scope["report"]["nfe"] == 32 and scope["report"]["solver"] == "rk4"
