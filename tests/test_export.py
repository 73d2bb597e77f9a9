"""Engines from ``python -m fastfm.export`` against the eager sampler and likelihood.

Models are random-initialised and perturbed (so no zero-initialised layer hides a bug), saved like
a training run (ema.safetensors + model.json). Each engine is built once per module; every
parity test recomputes its eager reference here, on rows that are not a multiple of the
engine's static batch (so chunking and padding are exercised). AOTInductor compiles take
seconds on 2 cores, so every solver is covered with ONNX and AOTI gets one build per task.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from conftest import call, gpu_bench_script, last_json
from fastfm.export import Engine, EngineSampler, EngineRequest, ExportError, ManifestError, export_engine, load, \
    manifest, parity
from fastfm.commands import export as export_cli
from fastfm.export.backends import backend, check_available
from fastfm.export.graph import build_program, example_inputs, trace, trace_aten
from fastfm.export.spec import resolve

import fastfm
from fastfm import evaluate, sample
from fastfm.run.load import load_run
from fastfm.run.checkpoint import save_inference
from fastfm.solve.likelihood import bits_per_dim, ode_likelihood
from fastfm.solve.flowmap import flow_map_sample
from fastfm.models import build_model
from fastfm.solve.ode import ode_sample as eager_sample

MLP = {"name": "mlp", "dim": 2, "hidden": 32, "depth": 2}
UNET = {"name": "unet", "in_channels": 1, "image_size": 8, "model_channels": 8, "channel_mult": [1],
        "num_res_blocks": 1}
VECTOR = {"name": "checkerboard", "shape": [2], "kind": "vector", "levels": None, "num_classes": None}
DIGITS = {"name": "digits", "shape": [1, 8, 8], "kind": "image", "levels": 17, "num_classes": 10}
RUNS: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {  # model config, data, superres factor
    "mlp": (MLP, VECTOR, 0),
    "mlp_gelu": ({**MLP, "activation": "gelu"}, VECTOR, 0),
    "mlp_cond": ({**MLP, "num_classes": 3}, VECTOR, 0),
    "unet": (UNET, DIGITS, 0),
    "unet_cond": ({**UNET, "num_classes": 10}, DIGITS, 0),
    "unet_sr": ({**UNET, "low_res_channels": 1}, DIGITS, 2),
}
TOL = {"fp32": dict(atol=2e-4, rtol=1e-4), "fp16": dict(atol=5e-2, rtol=2e-2), "bf16": dict(atol=2e-1, rtol=5e-2)}
ROWS = 11  # not a multiple of the engines' batch 8 (MLP) or 4 (UNet)


def make_run(out: Path, config: dict[str, Any], data: dict[str, Any], superres: int, seed: int = 0) -> Path:
    """A run directory with perturbed random weights and run_meta-style metadata."""
    model = build_model(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    meta = {"fastfm_version": fastfm.__version__, "model": model.config, "path": {"name": "condot", "args": {}},
            "source": "gaussian", "seed": 0, "target": "velocity", "superres": superres, "data": data}
    save_inference(out, model.state_dict(), meta)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export_runs")
    return {name: make_run(root / name, *args) for name, args in RUNS.items()}


@pytest.fixture(scope="module")
def build(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Engine]:
    """build(run, **spec) -> the loaded engine, built once per module."""
    root = tmp_path_factory.mktemp("engines")
    cache: dict[tuple, Engine] = {}

    def get(run: str, **spec: Any) -> Engine:
        key = (run, tuple(sorted(spec.items())))
        if key not in cache:
            spec.setdefault("batch", 4 if run.startswith("unet") else 8)
            out = root / f"engine{len(cache)}"
            export_engine(runs[run], EngineRequest.of(**spec), out, device="cpu")
            cache[key] = load(out)
        return cache[key]

    return get


def inputs(engine: Engine, rows: int = ROWS, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random engine inputs for ``rows`` rows (labels cycling, Rademacher probes)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for spec in engine.info.inputs:
        shape = (rows, *spec.shape[1:]) if spec.name != "probes" else (spec.shape[0], rows, *spec.shape[2:])
        if spec.name == "y":
            out["y"] = torch.arange(rows) % engine.meta.num_classes
        elif spec.name == "probes":
            out["probes"] = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
        else:
            out[spec.name] = torch.randn(shape, generator=gen)
    return out


def reference(run_dir: Path, engine: Engine, given: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The eager fp32 outputs for the same inputs, through fastfm.solve.ode / fastfm.solve.likelihood."""
    run = load_run(run_dir)
    spec = engine.spec.plan
    cond = dict(given)
    x = cond.pop("x0", None) if spec.task == "sample" else cond.pop("x1")
    if spec.class_label is not None:
        cond["y"] = torch.full((x.shape[0],), spec.class_label)
    opts = dict(solver=spec.solver, steps=spec.steps, target=run.meta.target, **cond)
    with torch.no_grad():
        if spec.kind == "flowmap":
            return {"x": flow_map_sample(run.model, x, spec.times(), guidance=spec.guidance, **cond).x,
                    "log_prob": None}
        if spec.task == "sample":
            res = eager_sample(run.model, run.path, x, guidance=spec.guidance, log_likelihood=spec.log_likelihood,
                               **opts)
            return {"x": res.x, "log_prob": res.log_prob}
        lik = ode_likelihood(run.model, run.path, x, **opts)
        return {"x": lik.x0, "log_prob": lik.log_prob}


def assert_parity(run_dir: Path, engine: Engine, rows: int = ROWS) -> dict[str, torch.Tensor]:
    given = inputs(engine, rows)
    got = _call(engine, given)
    ref = reference(run_dir, engine, given)
    tol = TOL[engine.spec.dtype]
    assert got.x.shape == ref["x"].shape and got.nfe == engine.spec.nfe
    torch.testing.assert_close(got.x, ref["x"], **tol)
    if ref["log_prob"] is not None:
        torch.testing.assert_close(got.log_prob, ref["log_prob"], **tol)
    else:
        assert got.log_prob is None
    return {"x": got.x, "log_prob": got.log_prob, "bits_per_dim": got.bits_per_dim}


def _call(engine: Engine, given: dict[str, torch.Tensor]):
    given = dict(given)
    x = given.pop("x0") if engine.spec.task == "sample" else given.pop("x1")
    return engine(x, **given)


# ------------------------------------------------------------------------- parity with eager


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun", "rk4"])
def test_onnx_sampler_with_log_likelihood_every_solver(build, runs, solver: str) -> None:
    engine = build("mlp", task="sample", solver=solver, steps=2, backend="onnx", log_likelihood=True)
    assert engine.spec.plan.divergence == "exact" and engine.input_names == ["x0"]
    out = assert_parity(runs["mlp"], engine)
    assert torch.isfinite(out["log_prob"]).all()


@pytest.mark.parametrize("backend", ["onnx", "aoti"])
def test_exact_likelihood(build, runs, backend: str) -> None:
    engine = build("mlp", task="likelihood", solver="heun", steps=2, backend=backend)
    out = assert_parity(runs["mlp"], engine)
    assert out["bits_per_dim"] is None  # vector data: nats only


def test_aoti_sampler(build, runs) -> None:
    engine = build("mlp", task="sample", solver="midpoint", steps=3, backend="aoti")
    assert engine.info.engine_file.suffix == ".pt2"
    out = assert_parity(runs["mlp"], engine)
    assert out["log_prob"] is None


def test_hutchinson_likelihood_takes_probes(build, runs) -> None:
    engine = build("mlp", task="likelihood", solver="midpoint", steps=2, backend="onnx", divergence="hutchinson",
                   probes=3)
    assert engine.input_names == ["x1", "probes"] and engine.info.inputs[1].shape == (3, 8, 2)
    assert_parity(runs["mlp"], engine)
    given = inputs(engine)
    other = dict(given, probes=given["probes"].roll(1, dims=1))  # each row gets another row's probes
    assert not torch.allclose(_call(engine, given).log_prob, _call(engine, other).log_prob)


def test_gelu_jvp_decomposes_for_onnx(build, runs) -> None:
    assert_parity(runs["mlp_gelu"], build("mlp_gelu", task="likelihood", solver="euler", steps=2, backend="onnx"))


def test_unet_aoti_sampler(build, runs) -> None:
    assert_parity(runs["unet"], build("unet", task="sample", solver="euler", steps=2, backend="aoti"), rows=5)


def test_unet_hutchinson_likelihood_with_bits_per_dim(build, runs) -> None:
    engine = build("unet", task="likelihood", solver="midpoint", steps=1, backend="onnx")
    assert engine.spec.plan.divergence == "hutchinson" and engine.spec.plan.probes == 1  # auto: 64 dims > 16
    out = assert_parity(runs["unet"], engine, rows=5)
    torch.testing.assert_close(out["bits_per_dim"], bits_per_dim(out["log_prob"], 64, 17))


def test_guided_conditional_sampler(build, runs) -> None:
    engine = build("unet_cond", task="sample", solver="midpoint", steps=1, backend="onnx", guidance=3.0)
    assert engine.input_names == ["x0", "y"]
    out = assert_parity(runs["unet_cond"], engine, rows=5)
    given = inputs(engine, rows=5)
    run = load_run(runs["unet_cond"])
    with torch.no_grad():
        unguided = eager_sample(run.model, run.path, given["x0"], solver="midpoint", steps=1, y=given["y"]).x
    assert (out["x"] - unguided).abs().max() > 1e-3  # the guidance scale is really baked in


def test_conditional_likelihood_takes_labels(build, runs) -> None:
    engine = build("mlp_cond", task="likelihood", solver="rk4", steps=1, backend="onnx")
    assert engine.input_names == ["x1", "y"]
    assert_parity(runs["mlp_cond"], engine)
    x, y = torch.zeros(3, 2), torch.tensor([0, 1, 2])
    classes = load_run(runs["mlp_cond"]).meta.num_classes
    with pytest.raises(ExportError, match=rf"'y' must hold class labels in 0..{classes - 1}, got values in 0..{classes}"):
        engine(x, y=torch.tensor([0, 1, classes]))
    with pytest.raises(ExportError, match=r"'y' must hold class labels in .*got values in -1..1"):
        engine(x, y=torch.tensor([-1, 0, 1]))
    with pytest.raises(ExportError, match="'y' must hold integer class labels, got torch.float32"):
        engine(x, y=y.float())
    with pytest.raises(ExportError, match="'x1' contains NaN or Inf"):
        engine(torch.tensor([[0.0, float("nan")], [0.0, 0.0], [1.0, 1.0]]), y=y)
    with pytest.raises(ExportError, match="'x1' contains NaN or Inf"):
        engine(torch.full((3, 2), float("inf")), y=y)
    assert torch.isfinite(engine(x, y=y).log_prob).all()


def test_baked_class_label(build, runs) -> None:
    engine = build("mlp_cond", task="sample", solver="euler", steps=2, backend="onnx", class_label=2)
    assert engine.input_names == ["x0"]
    assert_parity(runs["mlp_cond"], engine)
    with pytest.raises(ExportError, match="takes no y"):
        engine(torch.zeros(3, 2), y=torch.zeros(3, dtype=torch.long))


def test_superres_engine_takes_low_res(build, runs) -> None:
    engine = build("unet_sr", task="sample", solver="heun", steps=1, backend="onnx")
    assert engine.input_names == ["x0", "low_res"] and engine.info.inputs[1].shape == (4, 1, 4, 4)
    assert_parity(runs["unet_sr"], engine, rows=5)
    with pytest.raises(ExportError, match="needs 'low_res'"):
        engine(torch.zeros(2, 1, 8, 8))


def test_bf16_engine(build, runs) -> None:
    engine = build("mlp", task="sample", solver="midpoint", steps=2, backend="aoti", dtype="bf16",
                   log_likelihood=True)
    assert engine.info.parity["tolerance"] == vars(parity.TOLERANCES["bf16"])
    assert_parity(runs["mlp"], engine)


def test_fp16_onnx_engine(build, runs) -> None:
    assert_parity(runs["mlp"], build("mlp", task="sample", solver="midpoint", steps=2, backend="onnx", dtype="fp16"))


def test_bf16_graph_keeps_time_state_and_outputs_fp32(runs) -> None:
    run = load_run(runs["mlp"])
    spec = resolve(EngineRequest.of(task="sample", solver="euler", steps=1, batch=64, dtype="bf16",
                               log_likelihood=True), run.meta, run.path)
    ins, _ = spec.signature()
    program, example = build_program(run, spec), example_inputs(ins)
    dtypes = {}
    for n in trace_aten(program, example).graph.nodes:  # before the time features are precomputed
        if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor):
            dtypes.setdefault(n.target._schema.name.split("::")[-1], set()).add(n.meta["val"].dtype)
    assert dtypes["cos"] == dtypes["sin"] == {torch.float32}  # sinusoidal time features
    assert dtypes["addmm"] == {torch.bfloat16}  # every layer of the model
    outs = [a.meta["val"] for a in trace(program, example).graph.output_node().args[0]]
    assert [o.dtype for o in outs] == [torch.float32, torch.float32]


def test_traced_jvps_drop_zero_tangents_and_repeated_primals(runs) -> None:
    """Exact 2D divergence: per evaluation one primal pass plus two tangent passes, no more GEMMs."""
    run = load_run(runs["mlp"])

    def gemms(task: str) -> int:
        spec = resolve(EngineRequest.of(task=task, solver="euler", steps=1, batch=2), run.meta, run.path)
        ep = trace(build_program(run, spec), example_inputs(spec.signature()[0]))
        return sum(str(n.target) in ("aten.mm.default", "aten.addmm.default") for n in ep.graph.nodes)

    assert gemms("sample") == 3  # one evaluation of the model's 3 layers on x (the time MLP is precomputed)
    # + one tangent pass per coordinate through the 2 layers after the first (the first layer's tangent
    # e_i W is a constant); 12 without zero folding (x dW products), 11 without merging the JVPs'
    # primal passes, 9 without splitting [x, e(t)] W
    assert gemms("likelihood") == 3 + 2 * 2


@pytest.mark.parametrize("batch", [1, 4096])
def test_time_features_of_the_first_layer_are_precomputed(runs, batch: int) -> None:
    """[x, e(t)] W = x W_x + e(t) W_e with e(t) W_e a constant per stage (a row expanded over a large batch):
    the first layer multiplies only the 2 coordinates of x, and no time features are left to compute."""
    run = load_run(runs["mlp"])
    spec = resolve(EngineRequest.of(task="sample", solver="midpoint", steps=2, batch=batch), run.meta, run.path)
    ep = trace(build_program(run, spec), example_inputs(spec.signature()[0]))
    names = [n.target._schema.name.split("::")[-1] for n in ep.graph.nodes if n.op == "call_function"]
    assert {"cat", "cos", "sin"}.isdisjoint(names)
    first = [n for n in ep.graph.nodes if str(n.target) == "aten.addmm.default"][0]
    assert tuple(first.args[1].meta["val"].shape) == (batch, 2)
    consts = [v for k, v in ep.state_dict.items()] + list(ep.constants.values())
    assert max(c.numel() for c in consts) < 4096 * 64  # broadcast constants are kept as one row


def test_split_and_fold_keep_values() -> None:
    """The simplifications against the plain graph on odd sizes: a product with [x, c, 0, x^2]
    (constant and zero blocks), constants broadcast over the batch, a large non-broadcast constant."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fastfm.export.simplify import simplify

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3 + 5 + 4 + 3, 7))
            self.b = torch.nn.Parameter(torch.randn(7))
            self.c = torch.nn.Parameter(torch.randn(1, 5))
            self.big = torch.nn.Parameter(torch.randn(300, 300))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            parts = [x, torch.sin(self.c).expand(n, 5), torch.zeros(n, 4), x * x]
            h = torch.addmm(self.b, torch.cat(parts, -1), self.w)
            rows = torch.cos(self.c.expand(n, 5)).view(-1)  # a view of a broadcast row (held compact while folding)
            return (h.sum() + (self.big @ self.big).sum() + torch.cat([torch.zeros(n, 3), x], -1).mm(self.w[:6]).sum()
                    + rows.sum())

    net = Net().eval()
    x = torch.randn(70001, 3)
    with torch.no_grad():
        gm = simplify(make_fx(net, tracing_mode="fake", _allow_non_fake_inputs=True)(x))
        torch.testing.assert_close(gm(x), net(x), rtol=1e-4, atol=1e-2)
    names = [str(n.target) for n in gm.graph.nodes]
    assert "aten.cat.default" not in names and "aten.sin.default" not in names
    # x and x^2 blocks, the x block of the second product, and big @ big: a large constant that is not
    # a broadcast row stays computed at run time
    assert names.count("aten.addmm.default") == 2 and names.count("aten.mm.default") == 2
    assert max(b.numel() for b in gm.buffers()) < 70001  # the 70001-row constants are kept as one row


# ------------------------------------------------------------------------- engine calls


def test_engine_call_errors(build) -> None:
    engine = build("mlp", task="likelihood", solver="heun", steps=2, backend="onnx")
    with pytest.raises(ExportError, match=r"'x1' must have shape \(5, 2\)"):
        engine(torch.zeros(5, 3))
    with pytest.raises(ExportError, match=r"^'x1' has 0 rows, shape \(0, 2\): need at least one row \(rows, 2\)$"):
        engine(torch.zeros(0, 2))
    with pytest.raises(ExportError, match=r"^'x1' must be 2-D \(rows, 2\), got 1-D \(2,\)$"):
        engine(torch.zeros(2))
    with pytest.raises(ExportError, match=r"^'x1' must be 2-D \(rows, 2\), got 0-D \(\)$"):
        engine(torch.zeros(()))
    with pytest.raises(ExportError, match="takes no probes"):
        engine(torch.zeros(5, 2), probes=torch.zeros(1, 5, 2))
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(engine(x[:3]).log_prob, engine(x).log_prob[:3])  # rows never mix, padded or not


# ------------------------------------------------------------------------- manifests


@pytest.fixture
def engine_copy(build, tmp_path: Path) -> Path:
    engine = build("mlp", task="sample", solver="euler", steps=2, backend="onnx", log_likelihood=True)
    return Path(shutil.copytree(engine.directory, tmp_path / "engine"))


def _edit(directory: Path, change: Callable[[dict], None]) -> None:
    body = json.loads((directory / "manifest.json").read_text())
    change(body)
    (directory / "manifest.json").write_text(json.dumps(body))


def test_manifest_contents(engine_copy: Path, runs) -> None:
    body = json.loads((engine_copy / "manifest.json").read_text())
    assert body["spec"]["task"] == "sample" and body["nfe"] == 2 and body["spec"]["batch"] == 8
    assert body["inputs"] == [{"name": "x0", "shape": [8, 2], "dtype": "float32"}]
    assert [o["name"] for o in body["outputs"]] == ["x", "log_prob"]
    assert set(body["versions"]) >= {"torch", "onnx", "onnxruntime"}
    assert body["parity"]["ok"] and body["parity"]["outputs"]["x"]["cosine"] > 0.99999
    assert len(body["checkpoint"]["sha256"]) == 64 and body["grid"] == [0.0, 0.5, 1.0]
    load(engine_copy, checkpoint=runs["mlp"])  # the same weights: accepted


@pytest.mark.parametrize("corruption, message", [
    (lambda d: (d / "manifest.json").write_text("{not json"), "corrupt"),
    (lambda d: _edit(d, lambda b: b.pop("parity")), r"lacks \['parity'\]"),
    (lambda d: _edit(d, lambda b: b.update(schema=99)), "schema 99"),
    (lambda d: _edit(d, lambda b: b["spec"].update(backend="tflite")), "unknown backend 'tflite'"),
    (lambda d: _edit(d, lambda b: b["inputs"][0].update(shape=[4, 2])), "do not follow from its spec"),
    (lambda d: _edit(d, lambda b: b.update(nfe=7)), "nfe 7"),
    (lambda d: (d / "engine.onnx").write_bytes((d / "engine.onnx").read_bytes() + b"x"), "sha256"),
    (lambda d: (d / "engine.onnx").unlink(), "missing"),
    (lambda d: (d / "manifest.json").unlink(), "not an engine directory"),
], ids=["json", "missing-key", "schema", "backend", "inputs", "nfe", "sha256", "engine-file", "no-manifest"])
def test_corrupt_manifest(engine_copy: Path, corruption, message: str) -> None:
    corruption(engine_copy)
    with pytest.raises(ManifestError, match=message):
        load(engine_copy)


def test_engine_from_other_weights(engine_copy: Path, runs) -> None:
    with pytest.raises(ManifestError, match="other weights"):
        load(engine_copy, checkpoint=runs["mlp_gelu"])


def test_aoti_engine_carries_its_spec(build, tmp_path: Path) -> None:
    """A consistent edit of steps, nfe and grid (digest recomputed) against the AOTInductor package's stamp."""
    engine = build("mlp", task="sample", solver="midpoint", steps=3, backend="aoti")
    copy = Path(shutil.copytree(engine.directory, tmp_path / "engine"))
    body = json.loads((copy / "manifest.json").read_text())
    body["spec"]["steps"], body["nfe"], body["grid"] = 4, 8, [0.0, 0.25, 0.5, 0.75, 1.0]
    manifest.write(copy, body)
    with pytest.raises(ManifestError, match=r"does not describe its engine file engine\.pt2: grid: manifest "
                                            r"\[0\.0, 0\.25, 0\.5, 0\.75, 1\.0\], engine file \[0\.0, 0\.333.*\]; "
                                            r"nfe: manifest 8, engine file 6; spec\.steps: manifest 4, engine file 3;"):
        load(copy)


def test_exported_program_engines_carry_their_stamp(tmp_path: Path) -> None:
    """cudagraph and tensorrt engines are torch.export archives: the stamp is an extra file in them."""
    from fastfm.export.backends import _load_exported

    x = torch.randn(3, 2)
    ep = torch.export.export(torch.nn.Linear(2, 2), (x,))
    backend("cudagraph").build(ep, [x], tmp_path / "program.pt2", ["x0", "x"], '{"spec": 1}')
    module, stamp = _load_exported(tmp_path / "program.pt2")
    assert stamp == '{"spec": 1}'
    torch.export.save(ep, tmp_path / "bare.pt2")
    assert _load_exported(tmp_path / "bare.pt2")[1] is None


# ------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("run, spec, message", [
    ("mlp", dict(solver="dopri5"), "fixed-step solver"),
    ("mlp", dict(solver="rk45"), "unknown solver 'rk45'"),
    ("mlp", dict(grid=(0.0, 1.0)), "--grid does not apply"),
    ("mlp", dict(backend="tflite"), "unknown backend"),
    ("mlp", dict(dtype="int8"), "unknown dtype"),
    ("mlp", dict(steps=0), "--steps must be >= 1"),
    ("mlp", dict(batch=0), "batch must be >= 1"),
    ("mlp", dict(guidance=2.0), "needs a class-conditional model"),
    ("mlp", dict(class_label=0), "class label 0 invalid: the model has no classes"),
    ("mlp_cond", dict(class_label=3), r"classes 0\.\.2"),
    ("mlp_cond", dict(task="likelihood", guidance=2.0), "guidance 2 applies to sampling"),
    ("mlp_cond", dict(task="likelihood", class_label=1), "class label 1 applies to sampling"),
    ("mlp", dict(task="likelihood", log_likelihood=True), "always returns log p"),
    ("mlp", dict(divergence="hutchinson"), "needs a likelihood"),
    ("mlp", dict(backend="cudagraph"), "needs a CUDA GPU"),
    ("mlp", dict(backend="onnx", dtype="bf16"), "no bf16 kernels"),
])
def test_bad_requests_fail_before_building(runs, tmp_path: Path, run: str, spec: dict, message: str) -> None:
    out = tmp_path / "engine"
    full = {"task": "sample", "solver": "euler", "steps": 1, "batch": 2, **spec}
    with pytest.raises(ValueError, match=message):  # the settings' own errors, or ExportError
        export_engine(runs[run], EngineRequest.of(**full), out, device="cpu")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is not None, reason="torch-tensorrt is installed")
def test_tensorrt_missing_is_named() -> None:
    with pytest.raises(ExportError, match=r"needs the torch-tensorrt package \(pip install torch-tensorrt\)"):
        check_available("tensorrt", torch.device("cpu"))


def test_exact_divergence_of_images_warns(runs) -> None:
    run = load_run(runs["unet"])
    with pytest.warns(UserWarning, match="64 JVPs per evaluation"):
        spec = resolve(EngineRequest.of(task="likelihood", solver="euler", steps=1, batch=1, divergence="exact"),
                       run.meta, run.path)
    assert spec.plan.divergence == "exact" and spec.signature()[0][-1].name == "x1"  # no probes input


def test_low_res_for_plain_model_and_existing_out(runs, tmp_path: Path) -> None:
    spec = EngineRequest.of(task="sample", solver="euler", steps=1, batch=2)
    with pytest.raises(ExportError, match="not trained for super-resolution"):
        export_engine(runs["unet"], spec, tmp_path / "a", device="cpu", low_res=torch.zeros(2, 1, 4, 4))
    with pytest.raises(ExportError, match=r"low-res inputs: expected shape \(N, 1, 4, 4\) with N >= 1 \(the 8x8 images "
                                          r"pooled by 2\), got \(2, 1, 3, 3\)"):
        export_engine(runs["unet_sr"], spec, tmp_path / "b", device="cpu", low_res=torch.zeros(2, 1, 3, 3))
    with pytest.raises(ExportError, match=r"low-res inputs: expected shape \(N, 1, 4, 4\) with N >= 1"):
        export_engine(runs["unet_sr"], spec, tmp_path / "b", device="cpu", low_res=torch.zeros(0, 1, 4, 4))
    (tmp_path / "c").mkdir()
    with pytest.raises(ExportError, match="exists; pass force"):
        export_engine(runs["mlp"], spec, tmp_path / "c", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_failed_parity_writes_nothing(runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(parity.TOLERANCES, "fp32", parity.Tolerance(atol=0.0, rtol=0.0, min_cosine=2.0))
    out = tmp_path / "engine"
    with pytest.raises(ExportError, match="parity check failed, engine not written"):
        export_engine(runs["mlp"], EngineRequest.of(task="sample", solver="euler", steps=1, batch=2, backend="onnx"), out,
                      device="cpu")
    assert list(tmp_path.iterdir()) == []  # no engine, no temporary directory


def test_engine_file_that_drops_its_stamp_is_not_written(runs, tmp_path: Path, monkeypatch) -> None:
    """A backend whose file does not keep the stamp (e.g. a torch-tensorrt that ignores extra_files) fails the
    build instead of publishing an engine that no load accepts."""
    from dataclasses import replace

    from fastfm.export import build

    onnx = backend("onnx")
    dropping = replace(onnx, build=lambda ep, example, path, names, stamp: onnx.build(ep, example, path, names, ""))
    monkeypatch.setattr(build, "backend", lambda name: dropping)
    with pytest.raises(ExportError, match="onnx fp32 engine file engine.onnx did not keep its stamp"):
        export_engine(runs["mlp"], EngineRequest.of(task="sample", solver="euler", steps=1, batch=2, backend="onnx"),
                      tmp_path / "engine", device="cpu")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- command lines


def test_cli_export_sample_evaluate(runs, tmp_path: Path) -> None:
    out = tmp_path / "lik"
    summary = json.loads(call(export_cli.main, ["--checkpoint", str(runs["mlp"]), "--task", "likelihood",
                                                "--solver", "midpoint", "--steps", "2", "--batch", "16",
                                                "--backend", "onnx", "--device", "cpu", "--out", str(out)]))
    assert summary["nfe"] == 4 and summary["divergence"] == "exact" and (out / "manifest.json").is_file()
    via_engine = last_json(call(evaluate.main, ["--engine", str(out), "--checkpoint", str(runs["mlp"]),
                                                "--n", "40"]))
    eager = last_json(call(evaluate.main, ["--checkpoint", str(runs["mlp"]), "--solver", "midpoint", "--steps", "2",
                                           "--n", "40", "--n-samples", "10", "--device", "cpu"]))
    assert via_engine["test"]["nll_nats"] == pytest.approx(eager["test"]["nll_nats"], abs=1e-4)
    assert via_engine["test"]["nfe"] == eager["test"]["nfe"] == 4 and "quality" not in via_engine
    with pytest.raises(SystemExit, match="--steps 3 conflicts with the engine"):
        call(evaluate.main, ["--engine", str(out), "--steps", "3"])
    with pytest.raises(SystemExit, match="likelihood engine; this command needs a sample engine"):
        call(sample.main, ["--engine", str(out)])


def test_engine_likelihood_shows_a_progress_bar(build, capsys: pytest.CaptureFixture[str]) -> None:
    """Like the eager sampler's, over the engine's calls: 20 points in batches of 8."""
    engine = build("mlp", task="likelihood", solver="heun", steps=2, backend="onnx")
    EngineSampler(engine).log_likelihood(torch.randn(20, 2))
    err = capsys.readouterr().err
    assert "test NLL (20 points, exact):" in err and " 0/3 [" in err and "batch/s" in err, err


def test_cli_sample_with_engine_matches_eager(build, runs, tmp_path: Path) -> None:
    engine = build("mlp", task="sample", solver="euler", steps=2, backend="onnx", log_likelihood=True)
    s = last_json(call(sample.main, ["--engine", str(engine.directory), "--n", "21", "--log-likelihood",
                                     "--out", str(tmp_path / "e")]))
    e = last_json(call(sample.main, ["--checkpoint", str(runs["mlp"]), "--solver", "euler", "--steps", "2", "--n", "21",
                                     "--log-likelihood", "--device", "cpu", "--out", str(tmp_path / "g")]))
    assert s["nfe"] == e["nfe"] == 2 and s["backend"] == "onnx"
    np.testing.assert_allclose(np.load(tmp_path / "e" / "samples.npy"), np.load(tmp_path / "g" / "samples.npy"),
                               atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "e" / "log_prob.npy"), np.load(tmp_path / "g" / "log_prob.npy"),
                               atol=1e-4)


def test_cli_errors(runs, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    for argv, message in [(["--checkpoint", str(runs["mlp"]), "--steps", "0"], "steps must be >= 1"),
                          (["--checkpoint", str(runs["mlp"]), "--backend", "cudagraph"], "needs a CUDA GPU"),
                          (["--checkpoint", str(tmp_path / "no-run")], "no checkpoint at")]:
        with pytest.raises(SystemExit) as e:
            export_cli.main(["--task", "sample", "--out", str(out), "--device", "cpu", *argv])
        assert str(e.value.code).startswith("error: ") and message in str(e.value.code)
    assert list(tmp_path.iterdir()) == []


def test_gpu_benchmark_script_runs_on_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu/bench_export.py, minus its CUDA-only backends, on tiny models."""
    bench = gpu_bench_script("bench_export")
    assert "cudagraph" not in bench.implementations("cpu") and "aoti" in bench.implementations("cpu")
    out = tmp_path / "gpu.json"
    result = bench.main([str(out), "--device", "cpu", "--quick", "--impls", "flow_matching,eager,onnx",
                         "--rounds", "2"])
    assert json.loads(out.read_text()) == result
    rows = result["results"]
    assert [r for r in rows if "error" in r] == []
    assert {(r["model"], r["task"], r["impl"]) for r in rows} == {
        (m, t, i) for m, t in [("mlp", "sample"), ("mlp", "likelihood"), ("unet", "sample")]
        for i in ("flow_matching", "eager", "onnx")}
    assert all(r["speedup_vs_flow_matching"] > 0 and r["max_abs_vs_eager"] < 1e-2 for r in rows)


@pytest.mark.parametrize("native", [False, True], ids=["avx2", "avx512-bf16"])
def test_auto_engine_is_the_fastest_correct_candidate(runs, tmp_path: Path, monkeypatch, native: bool):
    """backend/dtype 'auto': every candidate this machine class offers is built, parity-checked and timed, the
    fastest is published alone, and the manifest records the machine and every candidate's time. bf16 is a
    candidate only where it is native (mocked capabilities: an AVX2 and an AVX512-BF16 CPU)."""
    from fastfm import hardware

    flags = {"avx", "avx2", "avx512_f", "avx512_bw", "avx512_bf16"} if native else {"avx", "avx2"}
    caps = hardware.Capabilities("cpu", hardware.cpu_info(flags=flags, env={}, aten="AVX2"))
    monkeypatch.setattr(hardware, "capabilities", lambda device="cpu": caps)
    backend, expect = ("aoti", {"aoti/fp32", "aoti/bf16"}) if native else ("auto", {"aoti/fp32", "onnx/fp32"})
    spec = EngineRequest.of(task="sample", solver="euler", steps=2, batch=8, backend=backend, dtype="auto")
    info = export_engine(runs["mlp"], spec, tmp_path / "e", device="cpu")
    chosen, seconds = info.selection["chosen"], info.selection["seconds_per_call"]
    assert info.selection["rule"] == "measured" and set(seconds) == expect
    assert chosen == min(seconds, key=seconds.get) == f"{info.spec.backend}/{info.spec.dtype}"
    assert info.hardware["machine_class"] == caps.machine_class
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == sorted(["manifest.json", info.engine_file.name])
    assert torch.isfinite(load(tmp_path / "e")(torch.randn(8, 2)).x).all()
