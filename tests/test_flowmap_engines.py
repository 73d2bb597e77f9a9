"""Flow maps at inference: the ``flowmap`` plan, ``python -m fastfm.sample`` / ``evaluate`` / ``export`` on a model
of two times, its engines against the eager plan, and every request a flow map cannot serve refused alike.

Runs: test_export's MLPs built with ``flow_map=true`` (perturbed random weights, saved like a run: ``FLOW_MAP_RUNS``,
also traced by tests/test_devices.py's device guard) for what needs no training, and two tiny trained runs (MeanFlow on
the checkerboard, a class-conditional shortcut model on the labelled gmm) for the trainer's summary and the sampling
command. The plan is checked against a closed form: the linear interpolant between two isotropic Gaussians has an
affine flow map, so any grid of its exact average velocity lands on X_{0->1}(x0). AOTInductor compiles take about
20 s each on 2 busy cores (ONNX about 3 s): ONNX builds 1, 2 and 4 steps, AOTI 2 steps; every engine is built once per
module through ``python -m fastfm.export`` and checked on inputs its own parity probe did not use.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from conftest import Run, call, last_json, run_training
from test_export import DIGITS, MLP, TOL, UNET, VECTOR, make_run
from test_solve_plan import _cli
from torch import Tensor, nn

from fastfm import evaluate, sample, seeding
from fastfm.commands import export as export_cli
from fastfm.commands.train import summary_line
from fastfm.export import ENGINE_BACKENDS, Engine, ExportError, load
from fastfm.export.backends import check_available
from fastfm.export.graph import ModelInDtype
from fastfm.export.parity import probe_inputs
from fastfm.export.spec import EngineRequest, resolve
from fastfm.models import build_model
from fastfm.path import get_path
from fastfm.run import RunMeta, load_run
from fastfm.solve import EagerSampler, InferenceSettings, plan_solve
from fastfm.solve.flowmap import flow_map_sample
from fastfm.solve.ode import draw_prior
from fastfm.solve.plan import SolvePlan
from fastfm.solve.solvers import FLOW_MAP, FLOW_MAP_STEPS

FLOW_MAP_RUNS: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {  # model config, data, superres
    "mlp_fm": ({**MLP, "flow_map": True}, VECTOR, 0),
    "mlp_cond_fm": ({**MLP, "num_classes": 3, "flow_map": True}, VECTOR, 0),
    "unet_cond_fm": ({**UNET, "num_classes": 10, "flow_map": True}, DIGITS, 0),
}
"""test_export's runs as models of two times (``u(x, t, h)``)."""
TRAINED = {  # 20 steps each; --eval-steps 0: the trainer's evaluation samples with the solver's default steps
    "meanflow": ["--objective", "meanflow", "--data", "checkerboard"],
    "shortcut": ["--objective", "shortcut", "--data", "gmm", "--class-cond"],
}
ROWS = 11  # not a multiple of the engines' batch 8
UNSEEN = 20261207  # seed of engine inputs: not the parity probe's stream


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The vector flow maps of FLOW_MAP_RUNS and a velocity model (test_export's "mlp", one time)."""
    root = tmp_path_factory.mktemp("flowmap_runs")
    runs = {name: make_run(root / name, *FLOW_MAP_RUNS[name]) for name in ("mlp_fm", "mlp_cond_fm")}
    return {**runs, "mlp": make_run(root / "mlp", MLP, VECTOR, 0)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Run]:
    """trained(name) -> the TRAINED run, trained once per module when first asked for."""
    root = tmp_path_factory.mktemp("flowmap_trained")
    cache: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in cache:
            cache[name] = run_training(root / name, *TRAINED[name], "--eval-steps", "0", "--eval-budget", "0",
                                       steps=20)
        return cache[name]

    return get


def _grid(steps: int) -> Tensor:
    return torch.linspace(0.0, 1.0, steps + 1)


def _labels(n: int, num_classes: int | None) -> Tensor | None:
    """The labels a command gives n samples of a conditional model: cycling through the classes."""
    return None if num_classes is None else torch.arange(n) % num_classes


def _eager_samples(run_dir: Path, grid: Tensor, n: int, seed: int) -> Tensor:
    """``flow_map_sample`` over ``grid`` from the x0 that the sampling stream of ``seed`` draws (``plan.draw``),
    labels cycling."""
    run = load_run(run_dir)
    plan = plan_solve(InferenceSettings(), run.meta, run.path)
    x0 = plan.draw(run.path, n, seeding.generator(seed, seeding.SAMPLE), "cpu")["x0"]
    with torch.no_grad():
        return flow_map_sample(run.model, x0, grid, y=_labels(n, run.meta.num_classes)).x


# ------------------------------------------------------------------------- the plan


class ExactGaussianMap(nn.Module):
    """The exact average velocity of the linear interpolant x_t = (1 - t) x0 + t x1 from N(0, I) to N(m, c^2 I):
    p_t = N(t m, s_t^2 I) with s_t^2 = (1 - t)^2 + c^2 t^2, whose flow is X_{s->t}(x) = t m + (s_t / s_s)(x - s m),
    so u(x, s, h) = (X_{s->s+h}(x) - x) / h (h > 0, what sampling asks)."""

    m: Tensor

    def __init__(self, m: Tensor, c: float) -> None:
        super().__init__()
        self.register_buffer("m", m)
        self.c = c

    def _std(self, t: Tensor) -> Tensor:
        return ((1 - t) ** 2 + self.c ** 2 * t ** 2).sqrt()[:, None]

    def forward(self, x: Tensor, s: Tensor, h: Tensor) -> Tensor:
        t = s + h
        moved = t[:, None] * self.m + self._std(t) / self._std(s) * (x - s[:, None] * self.m)
        return (moved - x) / h[:, None]


@pytest.mark.parametrize("settings", [InferenceSettings(), InferenceSettings(steps=1), InferenceSettings(steps=2),
                                      InferenceSettings(steps=5), InferenceSettings(grid=(0.0, 0.1, 0.25, 0.9, 1.0))],
                         ids=["default", "1", "2", "5", "grid"])
def test_any_grid_of_the_exact_map_lands_on_the_flow(settings: InferenceSettings) -> None:
    """``plan.run`` (k steps, or a user grid: each step from t_i by h = t_{i+1} - t_i) of the exact map gives
    X_{0->1}(x0) = m + c x0 and equals ``flow_map_sample`` on the plan's grid."""
    m, c = torch.tensor([1.5, -0.5, 2.0]), 0.3
    model, path = ExactGaussianMap(m, c), get_path("linear")
    plan = plan_solve(settings, RunMeta.bare((3,), flow_map=True), path)
    x0 = torch.randn(9, 3, generator=torch.Generator().manual_seed(0))
    res = plan.run(model, path, x0)
    k = len(settings.grid) - 1 if settings.grid else settings.steps or FLOW_MAP_STEPS
    assert res.nfe == plan.nfe == k
    torch.testing.assert_close(res.x, m + c * x0, atol=1e-5, rtol=1e-5)
    grid = torch.tensor(settings.grid) if settings.grid else _grid(k)
    assert torch.equal(res.x, flow_map_sample(model, x0, grid).x)


def test_eager_sampler_runs_a_closed_form_map() -> None:
    """``EagerSampler`` on a field of one's own (``RunMeta.bare``): a closed-form map, which holds no parameters,
    sampled on the prior draws of the seed's sampling stream."""
    m, c = torch.tensor([1.5, -0.5, 2.0]), 0.3
    model, path, meta = ExactGaussianMap(m, c), get_path("linear"), RunMeta.bare((3,), flow_map=True)
    sampler = EagerSampler(model, path, meta, InferenceSettings(steps=3))
    got = sampler.sample(6, seed=4, progress=False)
    drawn = sampler.plan().draw(path, 6, seeding.generator(4, seeding.SAMPLE), "cpu")["x0"]
    assert got.nfe == 3
    torch.testing.assert_close(got.x, m + c * drawn, atol=1e-5, rtol=1e-5)


def _superres(meta: RunMeta) -> RunMeta:
    """``meta`` (8x8 images) of a super-resolution model (low-res input 1x4x4)."""
    return replace(meta, superres=2, model={**meta.model, "low_res_channels": 1})


IMAGE = (1, 8, 8)
SIGNATURES = [  # meta, settings, the inputs' names
    (RunMeta.bare((2,), flow_map=True), InferenceSettings(), ["x0"]),
    (RunMeta.bare((2,), num_classes=3, flow_map=True), InferenceSettings(steps=2), ["x0", "y"]),
    (RunMeta.bare((2,), num_classes=3, flow_map=True), InferenceSettings(steps=2, class_label=1), ["x0"]),
    (_superres(RunMeta.bare(IMAGE, kind="image", flow_map=True)), InferenceSettings(steps=4), ["x0", "low_res"]),
    (_superres(RunMeta.bare(IMAGE, kind="image", num_classes=10, flow_map=True)),
     InferenceSettings(steps=2, guidance=2.0), ["x0", "y", "low_res"]),
    (RunMeta.bare((2,), flow_map=True), InferenceSettings(steps=3, divergence="hutchinson", probes=4), ["x0"]),
]


@pytest.mark.parametrize("meta, settings, names", SIGNATURES,
                         ids=["plain", "labels", "baked-label", "superres", "labels-superres", "hutchinson-asked"])
def test_the_flow_map_plan_resolves_what_runs(meta: RunMeta, settings: InferenceSettings, names: list[str]) -> None:
    """kind flowmap, NFE = model calls = steps (default FLOW_MAP_STEPS), describe, the signature x0 [, y] [, low_res]
    -> x, and draws of x0 alone (no probes or noise, whatever else the settings ask)."""
    path = get_path("condot")
    plan = plan_solve(settings, meta, path)
    k = settings.steps or FLOW_MAP_STEPS
    assert (plan.kind, plan.task, plan.solver, plan.start, plan.end, plan.denoise) == ("flowmap", "sample", FLOW_MAP,
                                                                                       0.0, 1.0, False)
    assert plan.nfe == plan.calls == plan.steps == k and plan.divergence == "none"
    assert plan.describe() == {"solver": FLOW_MAP, "steps": k}
    shapes = {"x0": (5, *meta.shape), "y": (5,), "low_res": (5, 1, 4, 4)}
    assert [(s.name, s.shape) for s in plan.inputs(5)] == [(name, shapes[name]) for name in names]
    assert [(s.name, s.shape, s.dtype) for s in plan.outputs(5)] == [("x", (5, *meta.shape), "float32")]
    draws = plan.draw(path, 5, torch.Generator().manual_seed(1), "cpu")
    assert list(draws) == ["x0"]
    assert torch.equal(draws["x0"], draw_prior(path, 5, meta.shape, torch.Generator().manual_seed(1)))
    torch.testing.assert_close(plan.times(), _grid(k))


# ------------------------------------------------------------------------- sample and evaluate


@pytest.mark.parametrize("name, steps", [("meanflow", None), ("meanflow", 1), ("meanflow", 2), ("meanflow", 4),
                                         ("shortcut", 3)])
def test_sample_command_runs_the_maps_steps(trained, tmp_path: Path, name: str, steps: int | None) -> None:
    """``python -m fastfm.sample --checkpoint RUN [--steps k]`` on a trained flow map: NFE k, solver flowmap (default
    FLOW_MAP_STEPS steps), and the samples ``flow_map_sample`` gives on the same prior draws (labels cycling)."""
    run = trained(name)
    argv = [] if steps is None else ["--steps", str(steps)]
    out = last_json(call(sample.main, ["--checkpoint", str(run.dir), "--n", "13", "--seed", "5", "--device", "cpu",
                                       "--out", str(tmp_path), *argv]))
    k = FLOW_MAP_STEPS if steps is None else steps
    assert (out["nfe"], out["solver"], out["steps"], out["n"]) == (k, FLOW_MAP, k, 13)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "samples.npy")),
                               _eager_samples(run.dir, _grid(k), 13, 5), atol=1e-6, rtol=1e-6)


def test_sample_command_runs_a_user_grid_on_a_flow_map(made, tmp_path: Path) -> None:
    """``--grid 1,0.7,0.2,0`` (given from data to noise) runs the map's 3 steps over the user's times from noise to
    data, not over the uniform grid of 3 steps."""
    out = last_json(call(sample.main, ["--checkpoint", str(made["mlp_cond_fm"]), "--grid", "1,0.7,0.2,0", "--n", "7",
                                       "--device", "cpu", "--out", str(tmp_path)]))
    assert (out["nfe"], out["solver"], out["steps"]) == (3, FLOW_MAP, 3)
    want = _eager_samples(made["mlp_cond_fm"], torch.tensor([0.0, 0.2, 0.7, 1.0]), 7, 0)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "samples.npy")), want, atol=1e-6, rtol=1e-6)
    assert (want - _eager_samples(made["mlp_cond_fm"], _grid(3), 7, 0)).abs().max() > 1e-3  # not the uniform grid


def test_evaluate_reports_sample_quality_and_why_no_nll(made, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m fastfm.evaluate`` on a flow map: the quality of its samples (what drew them beside it), no test
    NLL or transport, and one line on stderr saying why."""
    out = last_json(call(evaluate.main, ["--checkpoint", str(made["mlp_fm"]), "--steps", "2", "--n", "20",
                                         "--n-samples", "30", "--device", "cpu"]))
    err = capsys.readouterr().err
    assert "evaluate: no test NLL: this sampler can sample (a flow map has no density without the ODE" in err, err
    assert "test" not in out and "transport" not in out
    quality = out["quality"]
    assert (quality["nfe"], quality["solver"], quality["steps"], quality["n"]) == (2, FLOW_MAP, 2, 30)
    assert math.isfinite(quality["energy_distance"]) and math.isfinite(quality["sliced_wasserstein"])


@pytest.mark.parametrize("name", list(TRAINED))
def test_trainer_summary_of_a_flow_map(trained, name: str) -> None:
    """The run is recorded as a flow map; its evaluation samples the map with its default step (NFE 1), measures
    sample quality and has no test NLL or transport."""
    run = trained(name)
    assert load_run(run.dir).meta.flow_map
    s = run.summary
    assert s["test"] is None and s["transport"] is None and s["sample_nfe"] == FLOW_MAP_STEPS == 1
    assert math.isfinite(s["quality"]["energy_distance"]) and "nll_points" not in s["eval_plan"]


def test_trainer_done_line_gives_the_flow_maps_reason(trained) -> None:
    """A flow map's source is Gaussian: the line must not blame a missing source density for the missing NLL."""
    line = summary_line(trained("meanflow").summary)
    assert "no source density" not in line and "flow map" in line, line


# ------------------------------------------------------------------------- requests a flow map cannot serve


@dataclass(frozen=True)
class Refusal:
    """A request refused with ``message`` by the Python API (the eager sampler and, unless ``transport``, an engine
    request) and by ``commands`` with ``argv``."""

    run: str
    message: str
    commands: tuple[str, ...]
    argv: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    task: str = "sample"
    log_likelihood: bool = False
    transport: bool = False


ODE = ("a flow-map model samples with its map (--solver flowmap, one call per step; --steps 1, 2, 4, ...): "
       "--solver {} integrates an ODE, which a model of two times does not define")
NEEDS_ODE = ("{} needs the ODE of the instantaneous velocity; a flow map's samples come from its steps alone "
             "(sample without it, or use a velocity model)")
REFUSALS = {
    "flowmap-on-velocity-model": Refusal(
        "mlp", "--solver flowmap steps a flow map, a model of two times (train one with --objective meanflow or "
        "shortcut); this model has one time: sample it with an ODE solver", ("sample", "evaluate", "export"),
        ["--solver", "flowmap"], {"solver": FLOW_MAP}),
    **{f"{s}-on-flow-map": Refusal("mlp_fm", ODE.format(s), ("sample", "evaluate", "export"), ["--solver", s],
                                   {"solver": s}) for s in ("dopri5", "rk4", "midpoint")},
    "sde": Refusal("mlp_fm", NEEDS_ODE.format("an SDE diffusion"), ("sample", "export"), ["--sde"],
                   {"diffusion": "1"}),
    "log-likelihood": Refusal("mlp_fm", NEEDS_ODE.format("a log-likelihood"), ("sample", "export"),
                              ["--log-likelihood"], log_likelihood=True),
    "likelihood": Refusal("mlp_fm", "a flow map has no likelihood: its density needs the ODE of the instantaneous "
                          "velocity, which the map only approximates at zero step", ("export",),
                          ["--task", "likelihood"], task="likelihood"),
    "transport": Refusal("mlp_cond_fm", NEEDS_ODE.format("transport diagnostics"), (), [], transport=True),
}


@pytest.mark.parametrize("case", list(REFUSALS.values()), ids=list(REFUSALS))
def test_what_a_flow_map_cannot_do_is_one_error_everywhere(made, tmp_path: Path, case: Refusal) -> None:
    run = load_run(made[case.run])
    settings = InferenceSettings(**case.settings)
    match = re.escape(case.message)
    if case.task == "likelihood" or case.log_likelihood or case.transport:
        sampler = EagerSampler.from_run(run, settings)  # sampling itself is fine
        with pytest.raises(ValueError, match=match):
            if case.task == "likelihood":
                sampler.log_likelihood(torch.zeros(3, 2), progress=False)
            else:
                sampler.sample(3, log_likelihood=case.log_likelihood, transport=case.transport, progress=False)
    else:
        with pytest.raises(ValueError, match=match):  # at construction, before anything runs
            EagerSampler.from_run(run, settings)
    if not case.transport:
        with pytest.raises(ExportError, match=match):
            resolve(EngineRequest.of(case.task, log_likelihood=case.log_likelihood, **case.settings), run.meta,
                    run.path)
    for command in case.commands:
        msg = _cli(command, made[case.run], tmp_path, case.argv)
        assert msg.startswith(f"error: {case.message}") and "\n" not in msg, (command, msg)
    assert not (tmp_path / "e").exists() and not (tmp_path / "s").exists()


def test_eager_flow_map_sampler_can_only_sample(made) -> None:
    assert EagerSampler.from_run(load_run(made["mlp_fm"])).capabilities == {"sample"}
    assert EagerSampler.from_run(load_run(made["mlp"])).capabilities == {"sample", "likelihood", "transport"}


# ------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def engines(made, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[dict[str, Any], Engine]]:
    """engines(run, backend, steps, *argv) -> (what ``python -m fastfm.export`` printed, the loaded engine), built
    once per module: a sampling engine of batch 8, fp32, no --solver given (a flow map's is flowmap)."""
    root = tmp_path_factory.mktemp("flowmap_engines")
    cache: dict[tuple, tuple[dict[str, Any], Engine]] = {}

    def get(run: str, backend: str, steps: int, *argv: str) -> tuple[dict[str, Any], Engine]:
        key = (run, backend, steps, argv)
        if key not in cache:
            out = root / f"engine{len(cache)}"
            printed = call(export_cli.main, ["--checkpoint", str(made[run]), "--task", "sample", "--steps", str(steps),
                                             "--backend", backend, "--dtype", "fp32", "--batch", "8", "--device",
                                             "cpu", "--out", str(out), *argv])
            cache[key] = (json.loads(printed), load(out, checkpoint=made[run]))
        return cache[key]

    return get


def _builds_on_cpu(backend: str) -> bool:
    try:
        check_available(backend, torch.device("cpu"))
    except ExportError:
        return False
    return True


def _on_cpu(backend: str, *values: Any) -> Any:
    """A parameter set of ``backend``'s, skipped where it does not build on the CPU (CUDA-only, or no package)."""
    return pytest.param(*values, marks=pytest.mark.skipif(not _builds_on_cpu(backend),
                                                          reason=f"backend {backend} does not build on the CPU here"))


ENGINE_STEPS = [_on_cpu(b, b, k) for b in ENGINE_BACKENDS for k in ((1, 2, 4) if b == "onnx" else (2,))]
"""ONNX (the cheapest build) at 1, 2 and 4 steps, every other backend at 2 steps."""


def _unseen(engine: Engine, run_dir: Path, rows: int = ROWS) -> Tensor:
    """x0 of ``rows`` rows none of which is a row of the engine's parity probe batch."""
    x0 = torch.randn(rows, *engine.meta.shape, generator=torch.Generator().manual_seed(UNSEEN))
    probe = probe_inputs(load_run(run_dir), engine.spec)["x0"]
    assert not torch.isclose(x0[:, None], probe[None]).all(-1).any()
    return x0


def _plan_run(run_dir: Path, plan: SolvePlan, x0: Tensor, **cond: Tensor) -> Tensor:
    """The eager fp32 ``plan.run`` the engine traced."""
    run = load_run(run_dir)
    with torch.no_grad():
        return plan.run(run.model, run.path, x0, **cond).x


@pytest.mark.parametrize("backend, steps", ENGINE_STEPS)
def test_flow_map_engine_matches_the_eager_plan_on_unseen_inputs(made, engines, backend: str, steps: int) -> None:
    """A k-step engine (``export --task sample --steps k``, no --solver: the map's): what export prints and the
    manifest say (solver flowmap, NFE k, the uniform grid), and its samples of unseen x0 (11 rows: chunks of the
    batch 8, the last one padded) are the eager plan's within the fp32 tolerance."""
    printed, engine = engines("mlp_fm", backend, steps)
    assert {k: printed[k] for k in ("solver", "steps", "nfe", "backend")} == {"solver": FLOW_MAP, "steps": steps,
                                                                              "nfe": steps, "backend": backend}
    body = json.loads((engine.directory / "manifest.json").read_text())
    assert body["nfe"] == engine.nfe == steps and body["spec"]["solver"] == FLOW_MAP and body["parity"]["ok"]
    assert body["grid"] == pytest.approx(_grid(steps).tolist())
    assert engine.spec.plan.kind == "flowmap" and engine.input_names == ["x0"]
    x0 = _unseen(engine, made["mlp_fm"])
    got = engine(x0)
    assert got.nfe == steps and got.log_prob is None and got.x.shape == (ROWS, 2)
    torch.testing.assert_close(got.x, _plan_run(made["mlp_fm"], engine.spec.plan, x0), **TOL["fp32"])


def test_conditional_flow_map_engine_takes_labels(made, engines) -> None:
    _, engine = engines("mlp_cond_fm", "onnx", 2)
    assert engine.input_names == ["x0", "y"] and engine.nfe == 2
    x0 = _unseen(engine, made["mlp_cond_fm"])
    y = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 0, 0, 1])
    got = engine(x0, y=y).x
    torch.testing.assert_close(got, _plan_run(made["mlp_cond_fm"], engine.spec.plan, x0, y=y), **TOL["fp32"])
    assert (engine(x0, y=(y + 1) % 3).x - got).abs().max() > 1e-3  # the labels are really used


def test_flow_map_engine_with_a_baked_class_label_and_guidance(made, engines) -> None:
    printed, engine = engines("mlp_cond_fm", "onnx", 1, "--class-label", "2", "--guidance", "2")
    assert engine.input_names == ["x0"] and printed["nfe"] == 1
    assert (engine.spec.plan.class_label, engine.spec.plan.guidance) == (2, 2.0)
    x0 = _unseen(engine, made["mlp_cond_fm"])
    got = engine(x0).x
    run = load_run(made["mlp_cond_fm"])
    label = torch.full((ROWS,), 2)
    with torch.no_grad():
        want = flow_map_sample(run.model, x0, _grid(1), y=label, guidance=2.0).x
        unguided = flow_map_sample(run.model, x0, _grid(1), y=label).x
    torch.testing.assert_close(got, want, **TOL["fp32"])
    assert (got - unguided).abs().max() > 1e-3  # the guidance scale is baked in
    with pytest.raises(ExportError, match="takes no y"):
        engine(x0, y=label)


@pytest.mark.parametrize("run, backend", [_on_cpu("aoti", "mlp_fm", "aoti"), _on_cpu("onnx", "mlp_cond_fm", "onnx")])
def test_flow_map_engine_through_sample_and_evaluate(made, engines, tmp_path: Path, capsys, run: str,
                                                     backend: str) -> None:
    """``sample --engine`` draws what ``sample --checkpoint --steps 2`` does (same seed: same x0, labels cycling);
    ``evaluate --engine`` measures its samples' quality; the engine's plan is fixed."""
    _, engine = engines(run, backend, 2)
    directory = str(engine.directory)
    s = last_json(call(sample.main, ["--engine", directory, "--n", "21", "--seed", "3", "--out", str(tmp_path / "e")]))
    e = last_json(call(sample.main, ["--checkpoint", str(made[run]), "--steps", "2", "--n", "21", "--seed", "3",
                                     "--device", "cpu", "--out", str(tmp_path / "g")]))
    assert s["nfe"] == e["nfe"] == 2 and s["solver"] == e["solver"] == FLOW_MAP and s["backend"] == backend
    np.testing.assert_allclose(np.load(tmp_path / "e" / "samples.npy"), np.load(tmp_path / "g" / "samples.npy"),
                               atol=2e-4)
    report = last_json(call(evaluate.main, ["--engine", directory, "--checkpoint", str(made[run]), "--n-samples",
                                            "30"]))
    assert "test" not in report and (report["quality"]["nfe"], report["quality"]["solver"]) == (2, FLOW_MAP)
    assert "no test NLL" in capsys.readouterr().err
    for argv, message in [(["--steps", "4"], "--steps 4 conflicts with the engine (2)"),
                          (["--solver", "euler"], "--solver euler conflicts with the engine (flowmap)")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            call(sample.main, ["--engine", directory, *argv])


def test_flow_map_engine_refuses_a_log_likelihood_with_the_plans_reason(engines, tmp_path: Path) -> None:
    """Asked for log p, a flow-map engine gives the flow map's reason (the one eager sampling and export give), not
    advice to re-export with --log-likelihood, which export refuses for a flow map."""
    _, engine = engines("mlp_fm", "onnx", 2)
    with pytest.raises(SystemExit) as e:
        call(sample.main, ["--engine", str(engine.directory), "--log-likelihood", "--out", str(tmp_path / "s")])
    assert str(e.value.code).startswith(f"error: {NEEDS_ODE.format('a log-likelihood')}"), e.value.code
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_engines_keep_the_step_in_fp32(dtype: torch.dtype) -> None:
    """A bf16/fp16 engine casts the model's weights, not its times: the step h reaches the step embedding as the
    fp32 value it was given, like t (1/3, a step of 3, is no bf16 or fp16 number; the sinusoidal features scale
    h by 1000, so bf16's 0.33398 turns the fastest feature by 0.65 rad)."""
    wrapped = ModelInDtype(build_model({**MLP, "flow_map": True}), dtype)
    seen: list[Tensor] = []
    wrapped.model.cond.sinusoidal.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    t, h = torch.full((4,), 1 / 3), torch.full((4,), 1 / 3)
    wrapped(torch.zeros(4, 2), t, h=h)
    assert [s.dtype for s in seen] == [torch.float32, torch.float32]
    assert torch.equal(seen[0], t) and torch.equal(seen[1], h)
