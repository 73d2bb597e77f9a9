"""CPU guards for GPU bugs: programs traced on a device that is not the CPU, kernels compiled for sm_90.

Code that is only ever traced with CPU tensors hides every tensor it makes on the CPU by default (a
time grid, a label, a constant): on a GPU they meet CUDA tensors and the trace fails ("found two
different devices cpu, cuda:0"). Here the same programs run on the ``meta`` device, where such a
tensor fails the same way ("Tensor on device cpu is not on the expected device meta"), and the
exported graphs are audited for any tensor off the inputs' device. (Fake CUDA tensors would be closer,
but a CPU-only torch cannot index them or autocast on them.) The Triton kernels, which the CPU tests
otherwise run in the interpreter, are compiled for an H100/H200 (sm_90) by Triton's real compiler.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_export import RUNS, make_run
from test_flowmap_engines import FLOW_MAP_RUNS
from test_sit import ONE_BLOCK, SIT_RUNS

from fastfm.run.checkpoint import load_inference, save_inference
from fastfm.run.load import load_run
from fastfm.export import ExportError
from fastfm.export.graph import build_program, example_inputs, off_device, trace
from fastfm.export.spec import EngineRequest, resolve
from fastfm.kernels.rng import philox_state
from fastfm.models import build_model
from fastfm.path.affine import get_path
from fastfm.training.objectives import get_objective
from fastfm.training.trainer import LossStep

META = torch.device("meta")

ENGINES = [  # (run, spec): every task, solver, dtype, conditioning and divergence kind
    ("mlp", dict(task="sample", solver="euler", steps=2, batch=4)),
    ("mlp", dict(task="sample", solver="rk4", steps=2, batch=4, log_likelihood=True)),
    ("mlp", dict(task="likelihood", solver="heun", steps=2, batch=4)),
    ("mlp", dict(task="likelihood", solver="midpoint", steps=2, batch=4, divergence="hutchinson", probes=2)),
    ("mlp", dict(task="sample", solver="midpoint", steps=2, batch=4, dtype="bf16")),
    ("mlp_cond", dict(task="sample", solver="midpoint", steps=2, batch=4, guidance=2.0)),
    ("mlp_cond", dict(task="sample", solver="midpoint", steps=2, batch=4, class_label=1, guidance=1.5)),
    ("unet", dict(task="likelihood", solver="euler", steps=1, batch=2)),
    ("unet", dict(task="sample", solver="midpoint", steps=2, batch=2, dtype="fp16")),
    ("unet_cond", dict(task="sample", solver="euler", steps=2, batch=2, class_label=3, guidance=2.0)),
    ("unet_cond", dict(task="likelihood", solver="euler", steps=1, batch=2, dtype="bf16")),
    ("unet_sr", dict(task="sample", solver="heun", steps=1, batch=2)),
    ("unet_sr", dict(task="likelihood", solver="euler", steps=1, batch=2)),
    ("mlp_gmm", dict(task="likelihood", solver="midpoint", steps=2, batch=4)),  # base density's parameters
    ("mlp_vp_x1", dict(task="sample", solver="heun", steps=2, batch=4)),  # ODE ending with the jump
    ("mlp_vp_x1", dict(task="sample", solver="euler", steps=2, batch=4, diffusion="1")),  # SDE ending with it
    ("mlp", dict(task="sample", solver="euler", steps=3, batch=4, diffusion="sin2:2")),  # SDE: noise input
    ("unet_cond", dict(task="sample", solver="euler", steps=2, batch=2, diffusion="1", guidance=2.0)),
    ("mlp_fm", dict(task="sample", steps=1, batch=4)),  # flow maps: the step h made on the input's device
    ("mlp_fm", dict(task="sample", steps=2, batch=4, dtype="bf16")),
    ("mlp_cond_fm", dict(task="sample", steps=2, batch=4)),
    ("mlp_cond_fm", dict(task="sample", steps=1, batch=4, class_label=1, guidance=2.0)),
    ("unet_cond_fm", dict(task="sample", steps=2, batch=2, guidance=1.5)),
    ("sit_cond", dict(task="sample", solver="euler", steps=2, batch=2, diffusion="1", guidance=2.0)),
    ("sit_options_sr", dict(task="likelihood", solver="euler", steps=1, batch=2)),  # JVPs through RoPE, qk-norm
    ("sit_options_sr", dict(task="sample", solver="midpoint", steps=1, batch=2, dtype="bf16")),
    ("sit_cond_fm", dict(task="sample", steps=2, batch=2, class_label=3)),
]


MLP_VARIANTS = {  # run -> model.json entries that replace test_export's "mlp" run's
    "mlp_gmm": {"source": "gmm", "path": {"name": "linear", "args": {}}},
    "mlp_vp_x1": {"path": {"name": "vp", "args": {}}, "target": "x1"},
}
"""``mlp_gmm``: a linear interpolant from a Gaussian-mixture base, whose log-density (CPU parameters moved to the
input's device) the likelihood engine evaluates; ``mlp_vp_x1``: an x1 predictor on VP, whose solves stop short of
t = 1 and end with the jump to E[x1 | x_t]."""


def _make(root: Path, name: str) -> Path:
    """A run of test_export's RUNS or test_flowmap_engines' FLOW_MAP_RUNS, or an MLP_VARIANTS one (re-committed with
    its edited model.json)."""
    if name not in MLP_VARIANTS:
        return make_run(root / name, *{**RUNS, **FLOW_MAP_RUNS, **SIT_RUNS}[name])
    out = make_run(root / name, *RUNS["mlp"])
    weights, meta = load_inference(out)
    save_inference(out, weights, {**meta, **MLP_VARIANTS[name]})
    return out


@pytest.fixture(scope="module")
def meta_runs(tmp_path_factory: pytest.TempPathFactory):
    """Loaded runs with their models moved to the meta device (weights gone, shapes and dtypes kept)."""
    root = tmp_path_factory.mktemp("meta_runs")
    runs = {}
    for name in {r for r, _ in ENGINES}:
        run = load_run(_make(root, name))
        run.model.to(META)
        runs[name] = run
    return runs


@pytest.mark.parametrize("name,spec", ENGINES, ids=[f"{r}-{'-'.join(map(str, s.values()))}" for r, s in ENGINES])
def test_engine_programs_trace_on_the_inputs_device(meta_runs, name, spec):
    """The engine program (model, solver, grid, labels, divergence, folded constants) is made on the
    device of its inputs: traced, simplified and exported on meta, nothing of it is on the CPU.
    (On commit f3b4950 every case failed here: the time grid was a CPU buffer.)"""
    run = meta_runs[name]
    spec = resolve(EngineRequest.of(**spec), run.meta, run.path)
    assert spec.plan.denoise or name != "mlp_vp_x1"  # its cases trace the jump
    inputs, _ = spec.signature()
    ep = trace(build_program(run, spec), example_inputs(inputs, META))
    assert off_device(ep, META) == []
    assert {v.device for v in ep.state_dict.values()} <= {META}


def test_gmm_base_likelihood_engine_matches_eager(tmp_path: Path):
    """The same Gaussian-mixture-base likelihood engine built for real on the CPU: its folded density
    parameters give the eager log-likelihood (and the unread CPU originals are not in the engine)."""
    from fastfm.export import export_engine, load
    from fastfm.solve.likelihood import ode_likelihood

    run_dir = _make(tmp_path, "mlp_gmm")
    export_engine(run_dir, EngineRequest.of(task="likelihood", solver="midpoint", steps=2, batch=8), tmp_path / "e",
                  device="cpu")
    x = torch.randn(11, 2, generator=torch.Generator().manual_seed(0))
    got = load(tmp_path / "e")(x)
    run = load_run(run_dir)
    with torch.no_grad():
        ref = ode_likelihood(run.model, run.path, x, solver="midpoint", steps=2)
    torch.testing.assert_close(got.log_prob, ref.log_prob, atol=2e-4, rtol=1e-4)


def test_off_device_audit_names_stray_tensors():
    """A 0-d CPU tensor mixes with device tensors in eager PyTorch and in tracing, but becomes a CPU
    constant of the engine (a host copy per call): ``trace`` refuses it, naming it."""

    class Stray(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (x * torch.tensor(2.0),)

    with pytest.raises(ExportError, match=r"off its device meta: .*\(cpu\)"):
        trace(Stray(), [torch.zeros(3, device=META)])
    ep = trace(Stray(), [torch.zeros(3)])  # on the CPU the same constant is where it belongs
    assert off_device(ep, torch.device("cpu")) == []


TRAIN_STEPS = {  # (model config, data shape, path, target, class-conditional, superres, objective)
    "mlp": ({"name": "mlp", "dim": 2, "hidden": 32, "depth": 2}, (2,), "condot", "velocity", False, 0, "cfm"),
    "mlp_vp_x1": ({"name": "mlp", "dim": 2, "hidden": 32, "depth": 2}, (2,), "vp", "x1", False, 0, "cfm"),
    "unet_cond": ({"name": "unet", "in_channels": 1, "image_size": 8, "model_channels": 8, "channel_mult": [1],
                   "num_res_blocks": 1, "num_classes": 10}, (1, 8, 8), "condot", "velocity", True, 0, "cfm"),
    "unet_sr": ({"name": "unet", "in_channels": 1, "image_size": 8, "model_channels": 8, "channel_mult": [1],
                 "num_res_blocks": 1, "low_res_channels": 1}, (1, 8, 8), "trig", "x0", False, 2, "cfm"),
    "mlp_meanflow": ({"name": "mlp", "dim": 2, "hidden": 32, "depth": 2, "flow_map": True}, (2,), "condot",
                     "velocity", False, 0, "meanflow"),
    "unet_meanflow_cond": ({"name": "unet", "in_channels": 1, "image_size": 8, "model_channels": 8,
                            "channel_mult": [1], "num_res_blocks": 1, "num_classes": 10, "flow_map": True},
                           (1, 8, 8), "condot", "velocity", True, 0, "meanflow"),
    "mlp_shortcut": ({"name": "mlp", "dim": 2, "hidden": 32, "depth": 2, "flow_map": True}, (2,), "vp",
                     "velocity", False, 0, "shortcut"),
    "sit_cond": ({**ONE_BLOCK, "num_classes": 10}, (1, 8, 8), "condot", "velocity", True, 0, "cfm"),
    "sit_sr_options": ({**ONE_BLOCK, "low_res_channels": 1, "norm": "rms", "mlp": "swiglu", "rope": True,
                        "qk_norm": True}, (1, 8, 8), "trig", "x0", False, 2, "cfm"),
    "sit_meanflow_options": ({**ONE_BLOCK, "num_classes": 10, "flow_map": True, "rope": True, "qk_norm": True},
                             (1, 8, 8), "condot", "velocity", True, 0, "meanflow"),
}


@pytest.mark.parametrize("name", list(TRAIN_STEPS))
def test_compiled_training_step_runs_on_the_inputs_device(name):
    """The compiled loss step (path op, model, the objective's loss: CFM's fused backward, MeanFlow's JVP,
    shortcut's extra calls) on meta tensors, fullgraph: no CPU tensor meets the device's, and a new noise state
    per step (seed and offset, a device tensor) never recompiles. (bf16 autocast does not exist on meta;
    tests/test_cuda.py runs it on a GPU.)"""
    from fastfm.compat import dynamo_counters
    counters = dynamo_counters()

    config, shape, path, target, cond, superres, objective = TRAIN_STEPS[name]
    torch.manual_seed(0)
    model = build_model(config).to(META)
    step = torch.compile(LossStep(model, get_path(path), get_objective(objective), target, "squared", superres,
                                  bf16=False), fullgraph=True, backend="aot_eager")
    torch.compiler.reset()
    counters.clear()
    b = 4
    flow_map = config.get("flow_map", False)
    for i in range(3):
        x1, t = torch.empty(b, *shape, device=META), torch.empty(b, device=META)
        h = torch.empty(b, device=META) if flow_map else None
        y = torch.zeros(b, dtype=torch.int64, device=META) if cond else None
        loss = step(None, x1, t, h, y, philox_state(1000 + i, i * b, META))
        loss.backward()
        assert loss.device == META and loss.shape == ()
        assert all(p.grad is not None and p.grad.device == META for p in model.parameters())
        model.zero_grad()
    assert counters["stats"]["unique_graphs"] == 1


def test_scalar_launch_arguments_must_fit_int32():
    """The rule the sm_90 check applies to every launch: a Python int above int32 (a seed) is refused."""
    pytest.importorskip("triton")
    from fastfm.kernels import targets

    assert targets._type_of("N", 2**31 - 1) == "i32"
    assert targets._type_of("std", 0.5) == "fp32"
    assert targets._type_of("rng_ptr", torch.empty(2, dtype=torch.int64, device=META)) == "*i64"
    with pytest.raises(ValueError, match="rng tensor"):
        targets._type_of("seed", 2**40)


def test_kernel_variants_compile_for_sm90(tmp_path: Path):
    """Every launch the Triton ops make (3 dtypes, x0 given or drawn, target or not, every tile shape),
    recorded on meta tensors for two different seeds and offsets (identical launches: the state
    is a tensor), compiled by Triton for sm_90 to a cubin with no register spills. Runs without the
    interpreter, in a subprocess. (On commit f3b4950 this failed: the seed was a scalar launch argument.)"""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "targets.json"
    proc = subprocess.run([sys.executable, "-m", "fastfm.kernels.targets", "--arch", "90", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    variants = report["variants"]
    seen = {(v["kernel"], v["signature"]["x1_ptr"] if "x1_ptr" in v["signature"] else v["signature"]["v_ptr"],
             v["constexprs"]["HAS_X0"]) for v in variants}
    for kernel in ("_affine_path_kernel", "_cfm_loss_partial_kernel", "_cfm_loss_grad_kernel"):
        for dtype in ("*fp32", "*bf16", "*fp16"):
            for has_x0 in (True, False):
                assert (kernel, dtype, has_x0) in seen, (kernel, dtype, has_x0)
    tiles = {(v["constexprs"]["ROWS"], v["constexprs"]["COLS"]) for v in variants}
    assert {(1024, 4), (4, 1024), (1, 4096)} <= tiles  # many rows per tile, a few, one row in column blocks
    for v in variants:
        access = {op: {int(bits) for bits in widths} for op, widths in v["global_access_bits"].items()}  # JSON keys
        if v["scalars"]["D"] % 16 == 0:  # rows 16-aligned: every data access a 128-bit vector
            data_stores = {128} if v["kernel"] != "_cfm_loss_partial_kernel" else {32}
            assert access["st"] == data_stores and 128 in access["ld"], v
        if not v["constexprs"]["HAS_X0"] and v["signature"]["x1_ptr"] == "*fp32" and v["scalars"]["D"] == 12288:
            # in-kernel noise: one Philox call per four elements and polynomial log/sincos (no libdevice
            # slow paths), 16 elements per thread; the per-element kernel of f3b4950 took 238 PTX instructions
            # per element (1909 for 8)
            per_element = v["ptx_instructions"] / (4096 / (32 * v["num_warps"]))
            assert per_element < 120, (v["kernel"], per_element)
    for v in variants:
        assert v["signature"]["rng_ptr"] == "*i64" or v["constexprs"]["HAS_X0"], v
        assert all(t != "i64" for t in v["signature"].values()), v  # no 64-bit scalar: nothing seed-like
        assert v["LOCAL"] == 0 and v["REG"] <= 255, v  # no spills
        assert v["ptx_bytes"] > 0


@pytest.mark.parametrize("name,target", [("condot", "velocity"), ("vp", "x0"), ("trig", "x1")])
def test_sde_sampler_runs_on_the_inputs_device(name, target):
    """The SDE sampler (grid, diffusion, score, noise, denoising jump) on a meta model and prior: every
    tensor it makes follows its input, with the noise drawn from a CPU generator and moved."""
    from fastfm.solve.sde import parse_diffusion, sde_sample

    model = build_model({"name": "mlp", "dim": 2, "hidden": 16, "depth": 2}).to(META)
    x0 = torch.empty(4, 2, device=META)
    res = sde_sample(model, get_path(name), x0, diffusion=parse_diffusion("sin2:2"), steps=3, target=target,
                     generator=torch.Generator().manual_seed(0))
    assert res.x.device == META and res.x.shape == (4, 2) and res.nfe == 4
