"""CUDA tests: the compiled training step and every engine kind on a GPU (skipped without one).

On a GPU machine: ``pytest tests/test_cuda.py`` (``benchmarks/gpu/check.sh`` runs it with the other
CUDA checks). What the CPU can see of the same bugs is in tests/test_devices.py.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_training
from test_export import DIGITS, MLP, TOL, UNET, VECTOR, _call, inputs, make_run, reference, runs  # noqa: F401
from test_models import perturb_
from test_sit import OPTIONS, SIT_RUNS

from fastfm.export import EngineRequest, export_engine, load
from fastfm.kernels.rng import philox_state
from fastfm.models import build_model
from fastfm.path.affine import get_path
from fastfm.training.objectives import get_objective
from fastfm.training.timesteps import UniformTime
from fastfm.training.trainer import LossStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = {  # model config, data shape, class-conditional, superres, objective
    "mlp": ({"name": "mlp", "dim": 2, "hidden": 64, "depth": 3}, (2,), False, 0, "cfm"),
    "unet_cond": ({"name": "unet", "in_channels": 1, "image_size": 8, "model_channels": 16, "channel_mult": [1, 2],
                   "num_res_blocks": 1, "num_classes": 10}, (1, 8, 8), True, 0, "cfm"),
    "unet_sr": ({"name": "unet", "in_channels": 1, "image_size": 8, "model_channels": 16, "channel_mult": [1],
                 "num_res_blocks": 1, "low_res_channels": 1}, (1, 8, 8), False, 2, "cfm"),
    # flow maps: MeanFlow's JVP through the compiled model (the UNet's attention included), shortcut's extra calls
    "mlp_meanflow": ({"name": "mlp", "dim": 2, "hidden": 64, "depth": 3, "flow_map": True}, (2,), False, 0,
                     "meanflow"),
    "unet_meanflow": ({"name": "unet", "in_channels": 1, "image_size": 8, "model_channels": 16,
                       "channel_mult": [1, 2], "num_res_blocks": 1, "num_classes": 10, "flow_map": True}, (1, 8, 8),
                      True, 0, "meanflow"),
    "mlp_shortcut": ({"name": "mlp", "dim": 2, "hidden": 64, "depth": 3, "flow_map": True}, (2,), False, 0,
                     "shortcut"),
    # SiT: flash attention in the compiled bf16 step; MeanFlow's JVP through RoPE and qk-norm
    "sit_cond": ({"name": "sit", "in_channels": 1, "image_size": 8, "depth": 2, "hidden_size": 64, "num_heads": 2,
                  "num_classes": 10}, (1, 8, 8), True, 0, "cfm"),
    "sit_meanflow_options": ({"name": "sit", "in_channels": 1, "image_size": 8, "depth": 2, "hidden_size": 64,
                              "num_heads": 2, "num_classes": 10, "flow_map": True, **OPTIONS}, (1, 8, 8), True, 0,
                             "meanflow"),
}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(STEPS))
def test_compiled_training_step_matches_eager(name: str, bf16: bool):
    """inductor's step (Triton path and loss kernels inside) against the eager step, same weights, data and
    noise state, for 3 optimizer steps: finite losses equal to bf16 tolerance, one graph for every seed."""
    from fastfm.compat import dynamo_counters
    counters = dynamo_counters()

    config, shape, cond, superres, name_of_objective = STEPS[name]
    objective = get_objective(name_of_objective)
    torch.manual_seed(0)
    model = build_model(config).cuda()
    twin = copy.deepcopy(model)
    path = get_path("condot")
    compiled = torch.compile(LossStep(model, path, objective, "velocity", "squared", superres, bf16), fullgraph=True)
    eager = LossStep(twin, path, objective, "velocity", "squared", superres, bf16)
    opts = [torch.optim.SGD(m.parameters(), lr=1e-2) for m in (model, twin)]
    torch.compiler.reset()
    counters.clear()
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-4, atol=1e-5)
    g = torch.Generator(device="cuda").manual_seed(1)
    host = torch.Generator().manual_seed(1)
    for i in range(3):
        x1 = torch.randn(16, *shape, device="cuda", generator=g)
        t, h = (v if v is None else v.cuda() for v in objective.draw(16, UniformTime(), host, 16))
        y = torch.randint(0, 10, (16,), device="cuda", generator=g) if cond else None
        rng = philox_state(2**40 + 7 * i, 16 * i, "cuda")
        losses = [step(None, x1, t, h, y, rng) for step in (compiled, eager)]
        for loss, opt in zip(losses, opts):
            assert torch.isfinite(loss)
            loss.backward()
        torch.testing.assert_close(losses[0], losses[1], **tol)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=tol["rtol"] * 5, atol=tol["atol"] * 5)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    assert counters["stats"]["unique_graphs"] == 1


TRAIN_RUNS = {
    "default": ["--data", "checkerboard"],
    "accum": ["--data", "moons", "--grad-accum", "2"],
    "unet_cond": ["--data", "digits", "--class-cond", "--model-args", "model_channels=8", "channel_mult=[1]",
                  "num_res_blocks=1"],
    "unet_sr": ["--data", "digits", "--superres", "2", "--model-args", "model_channels=8", "channel_mult=[1]",
                "num_res_blocks=1"],
    "meanflow_guided": ["--data", "digits", "--class-cond", "--objective", "meanflow", "--objective-args",
                        "guidance=2", "kappa=0.5", "--model-args", "model_channels=8", "channel_mult=[1]",
                        "num_res_blocks=1"],
    "shortcut": ["--data", "checkerboard", "--objective", "shortcut"],
    "sit_cond": ["--data", "digits", "--class-cond", "--model", "sit", "--model-args", "depth=2", "hidden_size=64",
                 "num_heads=2", "rope=true", "qk_norm=true"],
}


@pytest.mark.parametrize("variant", list(TRAIN_RUNS))
def test_train_compile_bf16_on_cuda(tmp_path: Path, variant: str):
    """``python -m fastfm.train --compile --bf16 --device cuda``: the README's main job and its variants."""
    run = run_training(tmp_path / variant, "--compile", "--bf16", "--device", "cuda", "--log-every", "2",
                       *TRAIN_RUNS[variant], steps=6)
    assert run.summary["skipped_steps"] == 0
    assert torch.isfinite(torch.tensor(run.summary["last"]["loss"]))
    if run.summary["test"] is not None:  # a flow map has no likelihood: its summary has sample quality instead
        assert torch.isfinite(torch.tensor(run.summary["test"]["nll_nats"]))
    else:
        assert TRAIN_RUNS[variant][TRAIN_RUNS[variant].index("--objective") + 1] in ("meanflow", "shortcut")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _ort_cuda() -> bool:
    if not _has("onnxruntime"):
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


BACKENDS = ["aoti", "cudagraph",
            pytest.param("onnx", marks=pytest.mark.skipif(not _ort_cuda(), reason="no onnxruntime CUDA provider")),
            pytest.param("tensorrt", marks=pytest.mark.skipif(not _has("torch_tensorrt"), reason="no torch-tensorrt"))]
ENGINES = {  # run, spec: sampling and likelihood, MLP and UNet, every dtype, guided and super-resolution
    "mlp-sample-loglik": ("mlp", dict(task="sample", solver="midpoint", steps=2, batch=8, log_likelihood=True)),
    "mlp-likelihood": ("mlp", dict(task="likelihood", solver="heun", steps=2, batch=8)),
    "mlp-sample-bf16": ("mlp", dict(task="sample", solver="rk4", steps=2, batch=8, dtype="bf16")),
    "mlp-guided-label": ("mlp_cond", dict(task="sample", solver="midpoint", steps=2, batch=8, guidance=2.0,
                                          class_label=1)),
    "unet-likelihood-hutchinson": ("unet", dict(task="likelihood", solver="euler", steps=2, batch=4,
                                                divergence="hutchinson", probes=2)),
    "unet-guided-fp16": ("unet_cond", dict(task="sample", solver="midpoint", steps=2, batch=4, guidance=1.5,
                                           dtype="fp16")),
    "unet-superres": ("unet_sr", dict(task="sample", solver="euler", steps=2, batch=4)),
    "mlp-flowmap-1": ("mlp_flowmap", dict(task="sample", steps=1, batch=8)),
    "unet-flowmap-2-label": ("unet_flowmap", dict(task="sample", steps=2, batch=4, class_label=3)),
    "sit-guided": ("sit_cond", dict(task="sample", solver="midpoint", steps=2, batch=4, guidance=1.5)),
    "sit-options-likelihood": ("sit_options_sr", dict(task="likelihood", solver="euler", steps=1, batch=4)),
}


@pytest.fixture(scope="module")
def engine_runs(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    """test_export's runs, two flow maps (models of two times) and test_sit's SiTs."""
    root = tmp_path_factory.mktemp("flow_map_runs")
    maps = {"mlp_flowmap": ({**MLP, "flow_map": True}, VECTOR, 0),
            "unet_flowmap": ({**UNET, "num_classes": 10, "flow_map": True}, DIGITS, 0), **SIT_RUNS}
    return {**runs, **{name: make_run(root / name, *args) for name, args in maps.items()}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ENGINES))
def test_cuda_engine_matches_eager(engine_runs: dict[str, Path], tmp_path: Path, case: str, backend: str):
    runs = engine_runs
    run, spec = ENGINES[case]
    out = tmp_path / f"{case}-{backend}"
    export_engine(runs[run], EngineRequest.of(backend=backend, **spec), out, device="cuda")
    engine = load(out)
    assert engine.device.type == "cuda"
    given = inputs(engine)
    got = _call(engine, {k: v.cuda() for k, v in given.items()})
    ref = reference(runs[run], engine, given)
    tol = dict(TOL[engine.spec.dtype])
    tol["atol"] = max(tol["atol"], 1e-3)  # GPU GEMMs (TF32 off, other reduction orders) against the CPU
    torch.testing.assert_close(got.x.cpu(), ref["x"], **tol)
    if ref["log_prob"] is not None:
        torch.testing.assert_close(got.log_prob.cpu(), ref["log_prob"], **tol)


@pytest.mark.parametrize("noise", [True, False], ids=["seeded", "x0-given"])
def test_cuda_kernel_backend_probe(noise: bool):
    """The trainer's kernel probe on CUDA tensors: Triton and the reference timed, both agreeing, one chosen."""
    from fastfm.kernels import ops, select

    try:
        record = select.choose((1024, 3, 7), torch.float32, torch.device("cuda"), noise)
        assert record["rule"] == "measured" and set(record["seconds"]) == {"triton", "reference"}
        assert "rejected" not in record and ops.backend_for(torch.device("cuda")) == record["backend"]
    finally:
        ops.set_auto_backend("cuda", None)


def test_cuda_auto_engine(runs, tmp_path: Path):  # noqa: F811 (fixture)
    """--backend auto --dtype auto on the GPU: cudagraph and aoti (and bf16 from sm_80) built, timed, one kept."""
    from fastfm import hardware

    spec = EngineRequest.of(task="sample", solver="midpoint", steps=2, batch=8, backend="auto", dtype="auto")
    info = export_engine(runs["mlp"], spec, tmp_path / "auto", device="cuda")
    tried = set(info.selection["seconds_per_call"]) | set(info.selection.get("failed", {}))
    assert {"cudagraph/fp32", "aoti/fp32"} <= tried
    assert ("cudagraph/bf16" in tried) == hardware.capabilities("cuda").bf16_native
    assert info.hardware["machine_class"].startswith("cuda-sm") and load(tmp_path / "auto").device.type == "cuda"


@pytest.mark.parametrize("options", [{}, OPTIONS], ids=["dit", "lightningdit-options"])
def test_sit_flash_attention_matches_the_math_backend(options: dict):
    """A SiT (head size 64) under bf16 autocast with SDPA's flash kernel forced: the same output as the math kernel
    (to bf16 rounding) and a finite backward pass, so RoPE and qk-norm hand flash one dtype."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    config = {"name": "sit", "in_channels": 4, "image_size": 16, "depth": 2, "hidden_size": 128, "num_heads": 2,
              "num_classes": 10, **options}
    model = perturb_(build_model(config), std=0.05).cuda()
    g = torch.Generator(device="cuda").manual_seed(1)
    x, t = torch.randn(8, 4, 16, 16, device="cuda", generator=g), torch.rand(8, device="cuda", generator=g)
    y = torch.arange(8, device="cuda") % 11
    out = {}
    for kernel in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(kernel), torch.autocast("cuda", dtype=torch.bfloat16):
            out[kernel] = model(x, t, y=y)
    assert out[SDPBackend.FLASH_ATTENTION].dtype == torch.bfloat16
    torch.testing.assert_close(out[SDPBackend.FLASH_ATTENTION].float(), out[SDPBackend.MATH].float(), rtol=2e-2,
                               atol=2e-2)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, t, y=y).float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("model", ["sit", "unet"])
def test_fsdp_compile_bf16_on_cuda_resumes_in_one_process(tmp_path: Path, model: str):
    """torchrun (NCCL, one GPU) --fsdp --compile --bf16: the regionally compiled blocks under the bf16 parameter
    policy train, and the sharded checkpoint resumes in one process without --fsdp."""
    args = {"sit": ["--model", "sit", "--model-args", "depth=2", "hidden_size=64", "num_heads=2"],
            "unet": ["--model-args", "model_channels=8", "channel_mult=[1]", "num_res_blocks=1"]}[model]
    common = ["-m", "fastfm.train", "--data", "digits", "--class-cond", "--batch-size", "32", "--device", "cuda",
              "--bf16", "--log-every", "1", "--ckpt-every", "2", "--eval-n", "8", "--n-samples", "8",
              "--out", str(tmp_path / "run"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sharded = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                              *common, "--steps", "4", "--fsdp", "--compile"], capture_output=True, text=True,
                             env=env, timeout=600)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert (tmp_path / "run" / "shards").is_dir()
    single = subprocess.run([sys.executable, *common, "--steps", "6", "--resume"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(v)) for v in losses)
