"""What the hardware does natively, and the choices that follow from it (issue 24): the capability record,
bf16 autocast only where bf16 is native (one warning and fp32 elsewhere, unless forced), the kernel backend and
the engine backend/dtype chosen by measurement, with mocked capabilities of several machine classes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import run_training

from fastfm import hardware
from fastfm.training.config import ConfigError, TrainConfig
from fastfm.training.distributed import DistEnv
from fastfm.hardware import Capabilities, CudaInfo, PrecisionWarning, autocast_precision, cpu_info
from fastfm.kernels import ops, select
from fastfm.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
AVX2 = {"avx", "avx2", "sse4_1"}
AVX512 = AVX2 | {"avx512_f", "avx512_bw", "avx512_vnni"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
AMX = AVX512_BF16 | {"amx_tile", "amx_bf16", "avx512_fp16"}
X86 = pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 ISA classes")


def caps_of(flags: set[str], env: dict[str, str] | None = None, aten: str = "AVX512",
            cuda: tuple[int, int] | None = None) -> Capabilities:
    info = cpu_info(flags=flags, env=env or {}, aten=aten)
    gpu = None if cuda is None else CudaInfo(f"GPU sm_{cuda[0]}{cuda[1]}", cuda, 80.0, 132)
    return Capabilities("cpu" if cuda is None else "cuda:0", info, gpu)


@pytest.fixture(autouse=True)
def _fresh_choices():
    """Every test starts from the untimed kernel rule and an empty warning memory."""
    hardware._warned.clear()
    yield
    for device_type in ("cpu", "cuda"):
        ops.set_auto_backend(device_type, None)
    hardware._warned.clear()


# ---------------------------------------------------------------- the capability record


@X86
@pytest.mark.parametrize("flags, env, aten, cls, bf16, fp16", [
    (AVX2, {}, "AVX2", "cpu-avx2", False, False),
    (AVX512, {}, "AVX512", "cpu-avx512", False, False),
    (AVX512_BF16, {}, "AVX512", "cpu-avx512-bf16", True, False),
    (AMX, {}, "AVX512", "cpu-amx", True, True),
    (AVX512_BF16, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "AVX2", "cpu-avx2", False, False),  # one machine, lower class
    (AMX, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "AVX512", "cpu-avx512-bf16", True, False),
    (AMX, {"ONEDNN_MAX_CPU_ISA": "avx512_core"}, "AVX512", "cpu-avx512", False, False),
])
def test_cpu_classes_and_native_precisions(flags, env, aten, cls, bf16, fp16):
    info = cpu_info(flags=flags, env=env, aten=aten)
    assert (info.machine_class, info.bf16_native, info.fp16_native) == (cls, bf16, fp16)
    assert info.onednn_cap == (env.get("ONEDNN_MAX_CPU_ISA"))


@pytest.mark.parametrize("cc, bf16, fp8, flash", [((7, 5), False, False, False), ((8, 0), True, False, True),
                                                  ((8, 9), True, True, True), ((9, 0), True, True, True)])
def test_cuda_capabilities(cc, bf16, fp8, flash):
    caps = caps_of(AVX2, cuda=cc)
    assert caps.machine_class == f"cuda-sm{cc[0]}{cc[1]}"
    assert (caps.bf16_native, caps.fp8_native, caps.cuda.flash_attention, caps.fp16_native) == (bf16, fp8, flash, True)
    record = caps.to_json()
    assert record["cuda"]["capability"] == list(cc) and record["bf16_native"] is bf16
    json.dumps(record)


def test_this_machine_is_recorded():
    record = hardware.capabilities("cpu").to_json()
    assert record["machine_class"].startswith("cpu-")
    assert record["cpu"]["threads"] == torch.get_num_threads()
    assert record["cpu"]["aten_isa"] == torch.backends.cpu.get_cpu_capability()
    out = subprocess.run([sys.executable, "-m", "fastfm.hardware", "cpu"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["machine_class"] == record["machine_class"]


@X86
def test_levels_a_machine_can_be_measured_at():
    assert hardware.levels(cpu_info(flags=AVX2, env={}, aten="AVX2")) == {"cpu-avx2": {}}
    both = hardware.levels(cpu_info(flags=AVX512_BF16, env={}, aten="AVX512"))
    assert both == {"cpu-avx512-bf16": {}, "cpu-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


@X86
def test_the_lower_level_environment_is_seen_as_avx2():
    """What `make bench` sets for the lower class makes this process see an AVX2 machine, whatever the CPU."""
    env = {**os.environ, **hardware.LOWER_LEVEL_ENV}
    code = "import json; from fastfm import hardware; print(json.dumps(hardware.capabilities().to_json()))"
    record = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                       check=True).stdout)
    assert record["machine_class"] == "cpu-avx2" and not record["bf16_native"]
    assert record["cpu"]["aten_isa"] == "AVX2"


# ---------------------------------------------------------------- precision


def test_bf16_where_native_fp32_with_one_warning_elsewhere():
    native, emulated = caps_of(AVX512_BF16), caps_of(AVX2, aten="AVX2")
    assert autocast_precision(False, emulated) == hardware.Precision(False, False, "fp32 requested")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert autocast_precision(True, native).bf16
        assert autocast_precision(True, caps_of(AVX2, cuda=(9, 0))).bf16
        assert autocast_precision(True, emulated, force=True).bf16  # forced: as asked, no warning
    with pytest.warns(PrecisionWarning, match="not native on this cpu-avx2 machine.*--force-bf16"):
        choice = autocast_precision(True, emulated)
    assert not choice.bf16 and choice.to_json()["compute"] == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process, not one per call
        assert not autocast_precision(True, emulated).bf16
    with pytest.warns(PrecisionWarning, match="compute capability is below 8.0"):
        assert not autocast_precision(True, caps_of(AVX2, cuda=(7, 5))).bf16


def test_force_bf16_needs_bf16():
    with pytest.raises(ConfigError, match="--force-bf16 .* add --bf16"):
        TrainConfig(force_bf16=True).validate()


@pytest.mark.parametrize("native", [True, False])
def test_trainer_autocasts_only_where_bf16_is_native(monkeypatch, tmp_path, native):
    caps = caps_of(AVX512_BF16 if native else AVX2, aten="AVX2")
    monkeypatch.setattr(hardware, "capabilities", lambda device="cpu": caps)
    cfg = TrainConfig(steps=1, batch_size=16, bf16=True, out=str(tmp_path), model_args={"hidden": 8}).validate()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer = Trainer(cfg, DistEnv())
    assert trainer.step_fn.bf16 is native
    assert any(issubclass(w.category, PrecisionWarning) for w in seen) is not native
    header = trainer.header(None)
    assert header["precision"]["compute"] == ("bf16" if native else "fp32")
    assert header["hardware"]["machine_class"] == caps.machine_class


@X86
def test_bf16_training_under_a_forced_avx2_isa_warns_and_runs_fp32(tmp_path: Path):
    """The README's `--bf16` on an AVX2 machine (made one with oneDNN's and ATen's ISA caps): one warning on
    stderr and fp32 compute, recorded in the metrics header beside the machine class."""
    env = {**os.environ, **hardware.LOWER_LEVEL_ENV}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fastfm.train", "--bf16", "--steps", "3", "--batch-size", "64",
                           "--model-args", "hidden=16", "--eval-n", "8", "--n-samples", "8", "--eval-steps", "1",
                           "--eval-budget", "0", "--out", str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("PrecisionWarning") == 1 and "cpu-avx2" in proc.stderr
    header = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["header"]
    assert header["hardware"]["machine_class"] == "cpu-avx2"
    assert header["precision"] == {"requested": "bf16", "compute": "fp32", "reason": header["precision"]["reason"]}


def test_metrics_header_opens_every_start_and_resume(tmp_path: Path):
    run = run_training(tmp_path / "r", "--ckpt-every", "2", steps=4)
    rows = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert "header" in rows[0] and rows[0]["header"]["resumed_at"] is None
    assert rows[0]["header"]["kernels"]["backend"] in ops.candidates(torch.device("cpu"))
    assert rows[-1].keys() == {"final"}


# ---------------------------------------------------------------- the kernel backend


def test_kernel_backend_is_measured_and_checked():
    record = select.choose((1024, 2), torch.float32, torch.device("cpu"), noise=True)
    names = ops.candidates(torch.device("cpu"))
    assert record["rule"] == "measured" and set(record["seconds"]) == set(names)
    assert ops.backend_for(torch.device("cpu")) == record["backend"]


def test_kernel_backend_choice_rules(monkeypatch):
    cpu = torch.device("cpu")
    if ops.candidates(cpu) != ["cpp", "reference"]:
        pytest.skip("needs the C++ extension")

    def timed(seconds):
        monkeypatch.setattr(select, "fastest", lambda cands, **kw: (min(seconds, key=seconds.get), seconds))

    timed({"cpp": 1.0, "reference": 0.5})  # the reference clearly faster: taken
    assert select.choose((64, 3), torch.float32, cpu, noise=False)["backend"] == "reference"
    timed({"cpp": 1.0, "reference": 0.9})  # within the margin: the compiled backend stays
    assert select.choose((64, 3), torch.float32, cpu, noise=False)["backend"] == "cpp"
    monkeypatch.setenv("FASTFM_KERNELS", "reference")  # forced: no probe
    assert select.choose((64, 3), torch.float32, cpu, noise=True) == {"backend": "reference",
                                                                      "rule": "FASTFM_KERNELS=reference"}


def test_a_wrong_backend_is_never_chosen(monkeypatch):
    cpu = torch.device("cpu")
    if "cpp" not in ops.candidates(cpu):
        pytest.skip("needs the C++ extension")
    from fastfm.kernels import cpu as cpp

    real = cpp.cfm_loss
    monkeypatch.setattr(cpp, "cfm_loss", lambda *a: real(*a) + 1.0)  # a broken build
    record = select.choose((256, 5), torch.float32, cpu, noise=False)
    assert record["backend"] == "reference" and "cpp" in record["rejected"]


# ---------------------------------------------------------------- engines: backend and dtype


@pytest.mark.parametrize("device, caps, expect", [
    ("cpu", caps_of(AVX2, aten="AVX2"), [("aoti", "fp32"), ("onnx", "fp32")]),
    ("cpu", caps_of(AVX512_BF16), [("aoti", "fp32"), ("onnx", "fp32"), ("aoti", "bf16")]),
    ("cuda", caps_of(AVX2, cuda=(7, 5)), [("cudagraph", "fp32"), ("aoti", "fp32")]),
    ("cuda", caps_of(AVX2, cuda=(9, 0)), [("cudagraph", "fp32"), ("aoti", "fp32"), ("cudagraph", "bf16"),
                                         ("aoti", "bf16")]),
])
def test_engine_candidates_per_machine(device, caps, expect):
    pytest.importorskip("onnxruntime")
    from fastfm.export.choose import candidates
    from fastfm.export.spec import EngineRequest

    spec = EngineRequest.of(task="sample", solver="euler", steps=2, batch=4, backend="auto", dtype="auto")
    got = [(c.backend, c.dtype) for c in candidates(spec, torch.device(device), caps)]
    assert got == [e for e in expect if e[0] != "tensorrt"]
    for backend in ("aoti", "onnx") if device == "cpu" else ("aoti",):  # a named backend: auto's dtypes it has
        named = candidates(EngineRequest.of(task="sample", solver="euler", steps=2, batch=4, backend=backend,
                                      dtype="auto"), torch.device(device), caps)
        assert [c.dtype for c in named] == [d for b, d in expect if b == backend]


def test_a_bf16_engine_on_emulating_hardware_warns():
    from fastfm.export.choose import candidates
    from fastfm.export.spec import EngineRequest

    spec = EngineRequest.of(task="sample", solver="euler", steps=2, batch=4, backend="aoti", dtype="bf16")
    with pytest.warns(PrecisionWarning, match="emulates bf16"):
        candidates(spec, torch.device("cpu"), caps_of(AVX2, aten="AVX2"))


def test_a_backend_that_fails_is_not_a_candidate(monkeypatch):
    cpu = torch.device("cpu")
    if "cpp" not in ops.candidates(cpu):
        pytest.skip("needs the C++ extension")
    from fastfm.kernels import cpu as cpp

    def broken(*args):
        raise RuntimeError("illegal instruction")

    monkeypatch.setattr(cpp, "cfm_loss", broken)
    record = select.choose((256, 5), torch.float32, cpu, noise=True)
    assert record["backend"] == "reference" and "illegal instruction" in record["rejected"]["cpp"]
