"""SDE sampling engines (``--task sample --sde``): the noise is an engine input, and the engine's output
for given noise equals the eager Euler-Maruyama sampler's; the SDE compiles with fullgraph=True."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import call, cli_error, last_json
from test_export import DIGITS, MLP, UNET, VECTOR, make_run

from fastfm import sample as sample_cli
from fastfm.run.load import load_run, path_of
from fastfm.export import EngineRequest, ExportError, export_engine, load
from fastfm.commands import export as export_cli
from fastfm.export.spec import resolve
from fastfm.solve.sde import parse_diffusion, sde_sample
from fastfm.solve import SolvePlan


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sde_runs")
    return {"mlp": make_run(root / "mlp", MLP, VECTOR, 0),
            "unet_cond": make_run(root / "unet_cond", {**UNET, "num_classes": 10}, DIGITS, 0)}


def _eager(run_dir: Path, spec: SolvePlan, x0: torch.Tensor, noise: torch.Tensor, **cond: torch.Tensor):
    run = load_run(run_dir)
    with torch.no_grad():
        return sde_sample(run.model, run.path, x0, diffusion=parse_diffusion(spec.diffusion), steps=spec.steps,
                          target=run.meta.target, noise=noise, guidance=spec.guidance, **cond).x


@pytest.mark.parametrize("run,backend,diffusion,guidance", [
    ("mlp", "aoti", "sin2:2", 1.0), ("mlp", "onnx", "0.5", 1.0), ("unet_cond", "aoti", "1", 2.0)])
def test_sde_engine_equals_eager_for_the_same_noise(runs, tmp_path, run, backend, diffusion, guidance):
    batch, rows = (8, 11) if run == "mlp" else (4, 5)  # rows not a multiple of the batch: chunked calls
    spec = EngineRequest.of(task="sample", solver="euler", steps=6, batch=batch, backend=backend, diffusion=diffusion,
                      guidance=guidance)
    info = export_engine(runs[run], spec, tmp_path / "e", device="cpu")
    assert info.parity["ok"] and info.spec.plan.denoise  # CondOT with sigma_min 0: the score interval stops short of 1
    engine = load(tmp_path / "e")
    assert engine.nfe == 7 and [i.name for i in engine.info.inputs][-1] == "noise"
    gen = torch.Generator().manual_seed(5)
    shape = engine.meta.shape
    x0, noise = torch.randn(rows, *shape, generator=gen), torch.randn(6, rows, *shape, generator=gen)
    cond = {"y": torch.arange(rows) % 10} if run == "unet_cond" else {}
    got = engine(x0, noise=noise, **cond).x
    want = _eager(runs[run], engine.spec.plan, x0, noise, **cond)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    other = engine(x0, noise=torch.randn(6, rows, *shape, generator=gen), **cond).x
    assert (other - got).abs().max() > 1e-2  # the noise input is really used


def test_sde_compiles_fullgraph(runs):
    run = load_run(runs["mlp"])
    diffusion = parse_diffusion("sin2:3")

    def fn(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return sde_sample(run.model, run.path, x0, diffusion=diffusion, steps=4, noise=noise).x

    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(9, 2, generator=gen), torch.randn(4, 9, 2, generator=gen)
    with torch.no_grad():
        compiled = torch.compile(fn, fullgraph=True)
        torch.testing.assert_close(compiled(x0, noise), fn(x0, noise), atol=1e-5, rtol=1e-5)


def test_zero_diffusion_engine_ignores_its_noise(runs, tmp_path):
    """eps = 0: the engine is the Euler ODE over the score interval plus the denoising jump (tests/test_sde.py
    checks that eagerly against the ODE sampler): its output does not depend on the noise input."""
    export_engine(runs["mlp"], EngineRequest.of(task="sample", solver="euler", steps=5, batch=8, diffusion="0"),
                  tmp_path / "e", device="cpu")
    engine = load(tmp_path / "e")
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    a = engine(x0, noise=torch.randn(5, 8, 2)).x
    torch.testing.assert_close(a, engine(x0, noise=torch.zeros(5, 8, 2)).x, atol=1e-6, rtol=0)
    torch.testing.assert_close(a, _eager(runs["mlp"], engine.spec.plan, x0, torch.zeros(5, 8, 2)), atol=2e-4, rtol=1e-4)


def test_sde_requests_are_checked(runs):
    run = load_run(runs["mlp"])
    base = dict(task="sample", solver="euler", steps=4, batch=2)
    for spec, message in [
        (dict(base, task="likelihood", diffusion="1"), "applies to sampling"),
        (dict(base, solver="midpoint", diffusion="1"), "Euler-Maruyama"),
        (dict(base, log_likelihood=True, diffusion="1"), "no --log-likelihood"),
    ]:
        with pytest.raises(ExportError, match=message):
            resolve(EngineRequest.of(**spec), run.meta, run.path)
    for diffusion in ("cos:1", "-1"):
        with pytest.raises(ValueError, match="expected C or sin2:C"):
            EngineRequest.of(**base, diffusion=diffusion)
    gmm = replace(run.meta, source="gmm", path="linear", path_args={})
    with pytest.raises(ExportError, match="Gaussian base"):
        resolve(EngineRequest.of(**base, diffusion="1"), gmm, path_of(gmm))
    spec = resolve(EngineRequest.of(**base, diffusion="sin2:2.50"), run.meta, run.path)
    assert spec.plan.diffusion == "sin2:2.5" and spec.nfe == 5
    names = [(i.name, i.shape) for i in spec.signature()[0]]
    assert names == [("x0", (2, 2)), ("noise", (4, 2, 2))]


def test_export_and_sample_cli(runs, tmp_path):
    out = tmp_path / "e"
    summary = last_json(call(export_cli.main, ["--checkpoint", str(runs["mlp"]), "--task", "sample", "--sde",
                                               "--diffusion", "sin2:1", "--steps", "4", "--batch", "8",
                                               "--device", "cpu", "--out", str(out)]))
    assert summary["solver"] == "euler" and summary["diffusion"] == "sin2:1" and summary["nfe"] == 5
    res = last_json(call(sample_cli.main, ["--engine", str(out), "--n", "20", "--out", str(tmp_path / "s")]))
    assert res["diffusion"] == "sin2:1" and res["solver"] == "euler-maruyama" and res["nfe"] == 5
    err = cli_error(sample_cli.main, ["--engine", str(out), "--sde", "--diffusion", "2", "--n", "4"])
    assert "the engine has diffusion sin2:1" in err


def test_strided_row_slices_reach_the_runner_dense(runs, tmp_path):
    """Inputs whose rows are dimension 1 (noise, Hutchinson probes with k > 1) are sliced into strided views
    when a call spans several engine batches, and the compiled runner reads dense buffers: before the
    fix the rows past the first batch (and a strided input given directly) came out wrong."""
    from fastfm.solve.likelihood import ode_likelihood

    export_engine(runs["mlp"], EngineRequest.of(task="likelihood", solver="midpoint", steps=3, batch=8,
                                          divergence="hutchinson", probes=3), tmp_path / "e", device="cpu")
    engine = load(tmp_path / "e")
    gen = torch.Generator().manual_seed(3)
    x1 = torch.randn(11, 2, generator=gen)
    probes = torch.randint(0, 2, (3, 11, 2), generator=gen).float() * 2 - 1
    run = load_run(runs["mlp"])
    with torch.no_grad():
        want = ode_likelihood(run.model, run.path, x1, solver="midpoint", steps=3, probes=probes).log_prob
    torch.testing.assert_close(engine(x1, probes=probes).log_prob, want, atol=2e-4, rtol=1e-4)
    strided = torch.randn(3, 16, 2, generator=gen)[:, ::2]
    with torch.no_grad():
        want = ode_likelihood(run.model, run.path, x1[:8], solver="midpoint", steps=3, probes=strided).log_prob
    torch.testing.assert_close(engine(x1[:8], probes=strided).log_prob, want, atol=2e-4, rtol=1e-4)
