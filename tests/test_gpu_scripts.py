"""The GPU benchmark scripts (benchmarks/gpu/) on the CPU: quick modes write valid JSON with the keys the
GPU run is read by, goal checks, budgets, the compile checks (a row that ran eager is never reported as
compiled), the rows a device cannot run skipped with the reason (mocked capabilities: sm_75, sm_80,
sm_90, CPUs with and without native bf16), check.sh's plumbing and its dry run end to end. (tests/
test_train_engine.py and tests/test_export.py also run bench_train.py and bench_export.py's quick modes;
these tests cover what those do not.)"""

from __future__ import annotations

import argparse
import functools
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import gpu_bench_script

from fastfm.hardware import Capabilities, CpuInfo, CudaInfo
from fastfm.models.sit import SiT

ROOT = Path(__file__).resolve().parents[1]
CHECK_SH = ROOT / "benchmarks" / "gpu" / "check.sh"
ENV_KEYS = {"device", "device_type", "dry", "python", "torch", "cuda", "triton", "flow_matching", "started",
            "hardware", "unsupported", "complete"}
STAGES = ["install", "wheels", "train", "engines", "tests", "bench_kernels", "bench_train", "bench_export",
          "bench_sit"]
BENCHES = ("kernels", "train", "export", "sit")
NO_BF16 = "bf16 is not native on this CPU (cpu-avx2, oneDNN ISA AVX2)"


def cpu(bf16: bool = False) -> CpuInfo:
    """An AVX2 CPU, or an AVX512-BF16 one."""
    if bf16:
        return CpuInfo("xeon", "x86_64", 8, ("avx2", "avx512_bf16", "avx512_bw"), "AVX512_CORE_BF16", None,
                       "AVX512", True, False)
    return CpuInfo("epyc", "x86_64", 2, ("avx", "avx2"), "AVX2", None, "AVX2", False, False)


def gpu(capability: tuple[int, int]) -> Capabilities:
    return Capabilities("cuda", cpu(), CudaInfo(f"sm{capability[0]}{capability[1]}", capability, 16.0, 40))


def use_caps(monkeypatch, bench, caps: Capabilities) -> None:
    """``bench`` (a loaded script) sees the device as ``caps``."""
    monkeypatch.setattr(bench, "capabilities", lambda device: caps)


@pytest.fixture(scope="module")
def common():
    return gpu_bench_script("common")


@pytest.fixture(scope="module")
def kernels():
    return gpu_bench_script("bench_kernels")


# ----------------------------------------------------------------------------- common


def test_dry_flag_is_the_cpu_at_quick_sizes(common) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    common.add_common_args(p)
    args = common.parse_args(p, ["--dry", "--device", "cuda"])
    assert (args.device, args.quick, args.dry) == ("cpu", True, True)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            common.parse_args(p, [])


def test_results_are_written_after_every_row(common, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "r.json"
    res = common.Results(path, device="cpu")
    assert json.loads(path.read_text()) == {"device": "cpu", "complete": False}
    res.append("rows", {"a": 1})
    assert json.loads(path.read_text())["rows"] == [{"a": 1}]
    res["x"] = 2
    assert json.loads(path.read_text())["x"] == 2 and not json.loads(path.read_text())["complete"]
    assert res.finish()["complete"] and json.loads(path.read_text())["complete"]
    assert not list(path.parent.glob("*.tmp"))


def test_budget_and_time_limit(common) -> None:
    b = common.Budget(None)
    assert b.allows(1e9) and b.left() == float("inf")
    b = common.Budget(0.0)
    assert not b.allows() and "time budget of 0 s spent" in b.skipped({})["skipped"]
    started = time.monotonic()
    with pytest.raises(common.TimeLimitExceeded):
        with common.time_limit(0.2):
            time.sleep(5)
    assert time.monotonic() - started < 2
    with common.time_limit(None) as enforced:  # no limit: nothing raised, nothing enforced
        assert not enforced


# the scripts' row labels (dtypes, bench_train modes and peers, bench_export implementations) -> what they need
ROW_NEEDS = {"fp32": None, "bf16": "bf16", "fp16": "fp16", "compile-bf16": "bf16", "fm-compile-bf16": "bf16",
             "aoti_bf16": "bf16", "cudagraph_bf16": "bf16", "eager": None, "cudagraph": None, "fp8": "fp8",
             "flash_attention": "flash_attention"}


@pytest.mark.parametrize("caps, skipped", [
    (gpu((7, 5)), {"bf16": "bf16 needs compute capability >= 8.0; this device is sm_75",
                   "fp8": "fp8 needs compute capability >= 8.9; this device is sm_75",
                   "flash_attention": "flash attention needs compute capability >= 8.0; this device is sm_75"}),
    (gpu((8, 0)), {"fp8": "fp8 needs compute capability >= 8.9; this device is sm_80"}),
    (gpu((9, 0)), {}),
    (Capabilities("cpu", cpu()), {
        "bf16": NO_BF16, "fp16": "fp16 is not native on this CPU (cpu-avx2, oneDNN ISA AVX2)",
        "fp8": "fp8 needs a CUDA GPU of compute capability >= 8.9; this device is cpu-avx2",
        "flash_attention": "flash attention needs a CUDA GPU of compute capability >= 8.0; this device is cpu-avx2"}),
    (Capabilities("cpu", cpu(bf16=True)), {
        "fp16": "fp16 is not native on this CPU (cpu-avx512-bf16, oneDNN ISA AVX512_CORE_BF16)",
        "fp8": "fp8 needs a CUDA GPU of compute capability >= 8.9; this device is cpu-avx512-bf16",
        "flash_attention": "flash attention needs a CUDA GPU of compute capability >= 8.0; this device is "
                           "cpu-avx512-bf16"}),
], ids=["sm75", "sm80", "sm90-fp8", "cpu-avx2", "cpu-avx512-bf16"])
def test_unsupported_rows_by_device(common, caps: Capabilities, skipped: dict[str, str]) -> None:
    """Each row label is skipped with the message of the need it names that the device lacks, and only then."""
    assert common.unsupported_needs(caps) == skipped
    assert {label: common.unsupported(caps, label) for label in ROW_NEEDS} == {
        label: skipped.get(need) for label, need in ROW_NEEDS.items()}


def test_kernel_summary_of_a_trace(common) -> None:
    events = [{"ph": "X", "cat": "kernel", "ts": 0, "dur": 10}, {"ph": "X", "cat": "kernel", "ts": 5, "dur": 10},
              {"ph": "X", "cat": "gpu_memcpy", "ts": 100, "dur": 4}, {"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 999},
              {"ph": "i", "cat": "kernel", "ts": 0}]
    s = common.kernel_summary(events, calls=2)
    assert s["kernels_per_call"] == 1.5
    assert s["kernel_sum_ms"] == pytest.approx(24 / 2 / 1e3) and s["gpu_busy_ms"] == pytest.approx(19 / 2 / 1e3)
    assert common.kernel_time(lambda: None, "cpu")["available"] is False


def test_time_kernel_on_cpu(common) -> None:
    t = common.time_kernel(lambda: torch.ones(10).sum(), "cpu", target_ms=1.0)
    assert t["method"] == "wall" and t["ms"] > 0 and t["calls"] >= 1


def _f(x):
    return x * 2 + 1


def test_compile_checked_compiles_and_counts(common) -> None:
    x = torch.randn(8)
    cc, info = common.compile_checked(_f, (x,), backend="eager")
    assert info["compiled"] and info["graphs"] == 1 and "reason" not in info
    with common.timed(cc, info):
        for _ in range(3):
            cc(x)
    assert info["compiled"]


def test_recompile_limit_fallback_is_marked_not_compiled(common) -> None:
    """A call that hits dynamo's recompile limit runs eager: the row says so instead of timing eager code."""
    x, xb = torch.randn(8), torch.randn(8, dtype=torch.bfloat16)
    cfg = torch._dynamo.config
    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    with cfg.patch(**{limit: 1}):
        # silent eager fallback (no fullgraph, no fail switch): detected by the count of compiled-graph calls
        cc = common.CheckedCompile(_f, "eager", fullgraph=False)
        torch.compiler.reset()
        cc(x)
        cc.reset_count()
        with cfg.patch(**{k: False for k in ("fail_on_recompile_limit_hit",) if hasattr(cfg, k)}):
            cc(xb)
        ok, reason = cc.status()
        assert not ok and "ran eager" in reason
        # the same function compiled again without a reset, for the other dtype: never reported as compiled
        torch.compiler.reset()
        cc, info = common.compile_checked(_f, (x,), backend="eager")
        assert info["compiled"]
        cc2, info2 = common.compile_checked(_f, (xb,), backend="eager", fresh=False, fullgraph=False)
        assert cc2 is None and info2["compiled"] is False and info2["reason"]
        # a recompile while a compiled row is being timed marks it too
        info = {"compiled": True}
        with pytest.raises(Exception):
            with common.timed(cc, info):
                cc(xb)
        assert info["compiled"] is False and "recompile" in info["reason"]
    torch.compiler.reset()


def test_compile_time_limit_is_recorded(common) -> None:
    def slow_backend(gm, example_inputs):
        time.sleep(5)
        return gm.forward

    started = time.monotonic()
    cc, info = common.compile_checked(_f, (torch.randn(4),), backend=slow_backend, time_limit_s=0.3)
    assert cc is None and not info["compiled"] and "did not finish in 0.3 s" in info["reason"]
    assert time.monotonic() - started < 3
    torch.compiler.reset()


# ----------------------------------------------------------------------------- bench_kernels


def test_bench_kernels_quick_on_cpu(kernels, tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    res = kernels.main([str(out), "--device", "cpu", "--quick", "--compile-backend", "aot_eager", "--dtypes", "fp32",
                        "--seeded-compile-limit", "10", "--target-ms", "0.5"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert ENV_KEYS <= res.keys() and res["complete"] and res["checks_ok"] and res["triton_interpreter"]
    rows = res["bench"]
    assert [r for r in rows if "error" in r or "skipped" in r] == []
    got = {(r["impl"], r["op"], r["noise"], r["dtype"]) for r in rows}
    want = {("copy", "copy", None, "fp32")}
    for d in ("fp32",):
        for op in kernels.OPS:
            want |= {("triton", op, n, d) for n in kernels.NOISES}
            want |= {("compile", op, "x0", d), ("compile", op, "seed", d), ("compile_randn", op, "seed", d)}
    assert got == want
    for r in rows:
        assert r["gb_per_s"] > 0 and r["ms"] > 0 and r["copy_gb_per_s"] > 0 and r["pct_of_copy"] > 0
        if r["impl"].startswith("compile"):
            assert r["compiled"] is True and r["compile"]["graphs"] == 1
        if r["impl"] == "compile" and r["noise"] == "x0":
            assert r["max_abs_vs_triton"] < 0.05
    assert len(res["cases"]) == len(kernels.OPS) * len(kernels.NOISES)
    assert all(c["speedup_vs_inductor"] > 0 and c["pct_of_copy"] > 0 for c in res["cases"])
    goals = res["goals"]
    for name in ("pct_of_copy_ge_85_at_256mb", "speedup_vs_inductor_ge_1_2_from_1m"):
        assert goals[name]["met"] is None and goals[name]["cases"] == 0  # quick sizes: below both thresholds


def test_bench_kernels_budget_skips_rows(kernels, tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    res = kernels.main([str(out), "--device", "cpu", "--quick", "--budget", "0", "--sizes", "2^20",
                        "--dtypes", "fp32", "--ops", "path"])
    rows = res["bench"]
    assert rows and all("skipped" in r for r in rows if r.get("compiled") is not False)
    assert {r["impl"] for r in rows} == {"triton", "compile", "compile_randn"} and "checks" not in res
    assert res["goals"]["speedup_vs_inductor_ge_1_2_from_1m"] == {
        "met": None, "cases": 2, "measured": 0, "failing": [], "unmeasured": ["path/x0/fp32/1048576",
                                                                              "path/seed/fp32/1048576"]}


def test_bench_kernels_skips_dtypes_the_device_cannot_run(kernels, tmp_path: Path, monkeypatch) -> None:
    caps = Capabilities("cpu", cpu())
    use_caps(monkeypatch, kernels, caps)
    res = kernels.main([str(tmp_path / "k.json"), "--device", "cpu", "--quick", "--budget", "0", "--dtypes",
                        "fp32,bf16", "--ops", "path"])
    assert res["unsupported"]["bf16"] == NO_BF16 and res["hardware"]["machine_class"] == "cpu-avx2"
    assert [r for r in res["bench"] if r["impl"] == "all"] == [{"dtype": "bf16", "impl": "all", "skipped": NO_BF16}]
    assert {r["dtype"] for r in res["bench"] if r["impl"] != "all"} == {"fp32"}
    assert {c["dtype"] for c in res["cases"]} == {"fp32"}  # no goal case of a dtype the device cannot run
    checks = kernels.check(caps, quick=True)
    assert [c for c in checks if "skipped" in c] == [
        {"dtype": "torch.bfloat16", "skipped": NO_BF16},
        {"dtype": "torch.float16", "skipped": "fp16 is not native on this CPU (cpu-avx2, oneDNN ISA AVX2)"}]
    assert {c["dtype"] for c in checks if c.get("ok")} == {"torch.float32"} and len(checks) == 2 + 4


def test_bench_kernels_goals(kernels) -> None:
    big, small = 2**27, 2**20

    def rows(op, noise, numel, triton, inductor, copy=1000.0, compiled=True):
        base = {"op": op, "noise": noise, "dtype": "fp32", "numel": numel, "tensor_mb": numel * 4 / 2**20}
        return [{**base, "impl": "triton", "gb_per_s": triton, "pct_of_copy": 100 * triton / copy},
                {**base, "impl": "compile", "gb_per_s": inductor, "compiled": compiled},
                {**base, "impl": "compile_randn", "gb_per_s": inductor / 2, "compiled": True}]

    ok = rows("path", "x0", big, 900, 700) + rows("path", "x0", small, 600, 400)
    cases, goals = kernels.summarize(ok)
    assert goals["pct_of_copy_ge_85_at_256mb"]["met"] is True
    assert goals["speedup_vs_inductor_ge_1_2_from_1m"]["met"] is True
    assert {c["inductor_impl"] for c in cases} == {"compile"}
    # too slow against copy at 128M; a compile row that ran eager is not inductor (the randn row is used)
    bad = rows("loss_fwd", "x0", big, 800, 500) + rows("loss_bwd", "seed", small, 600, 1000, compiled=False)
    cases, goals = kernels.summarize(ok + bad)
    assert goals["pct_of_copy_ge_85_at_256mb"] == {"met": False, "cases": 2, "measured": 2,
                                                   "failing": ["loss_fwd/x0/fp32/134217728"], "unmeasured": []}
    assert goals["speedup_vs_inductor_ge_1_2_from_1m"]["met"] is True
    slow = next(c for c in cases if c["op"] == "loss_bwd")
    assert slow["inductor_impl"] == "compile_randn" and slow["speedup_vs_inductor"] == pytest.approx(1.2)


def test_sizes_parse(kernels) -> None:
    assert [kernels._count(s) for s in ("1048576", "2^20", "2**27")] == [2**20, 2**20, 2**27]


# ----------------------------------------------------------------------------- bench_train


def test_bench_train_peers_and_large_batch_on_cpu(tmp_path: Path) -> None:
    bench = gpu_bench_script("bench_train")
    out = tmp_path / "t.json"
    res = bench.main([str(out), "--device", "cpu", "--quick", "--modes", "eager", "--no-ddp"])
    assert json.loads(out.read_text()) == res and res["complete"] and ENV_KEYS <= res.keys()
    assert res["missing"] == [] and res["peers"] == ["fm-eager"]
    (ours,), (peer,), (large,) = res["results"], res["peer_results"], res["large_batch"]
    assert (ours["loop"], ours["mode"], peer["loop"], peer["mode"]) == ("fastfm", "eager", "flow_matching", "fm-eager")
    assert large["batch"] == bench.QUICK["large_batch"] and large["mode"] == "eager"
    for r in (ours, peer, large):
        assert r["img_per_s"] > 0 and r["flops_per_img"] > 0 and r["mfu"] is None and r["loss"] == r["loss"]
    assert peer["params"] == ours["params"] and peer["flops_per_img"] == ours["flops_per_img"]  # the same model
    assert ours["speedup_vs_flow_matching"] == pytest.approx(ours["img_per_s"] / peer["img_per_s"])
    assert set(res["goals"]) == {"compile_bf16_vs_fm_compile_bf16", "mfu_compile_bf16_large_batch"}
    assert all(g["met"] is None for g in res["goals"].values())  # no compile-bf16 rows asked for


@pytest.mark.parametrize("bf16", [True, False], ids=["avx512-bf16", "avx2"])
def test_bench_train_missing_peer_and_budget(tmp_path: Path, monkeypatch, bf16: bool) -> None:
    """Rows past the budget are skipped; without native bf16 the compile-bf16 row is skipped with the reason
    and the batch 512 and DDP rows fall back to the last mode the device runs (mocked CPUs)."""
    bench = gpu_bench_script("bench_train")
    monkeypatch.setattr(bench, "missing", lambda packages: ["flow_matching"])
    use_caps(monkeypatch, bench, Capabilities("cpu", cpu(bf16)))
    res = bench.main([str(tmp_path / "t.json"), "--device", "cpu", "--quick", "--modes", "eager,compile-bf16",
                      "--budget", "0"])
    assert res["missing"] == ["flow_matching"] and res["complete"] and res["hardware"]["bf16_native"] is bf16
    assert {r["mode"]: r["missing"] for r in res["peer_results"]} == {
        "fm-eager": "flow_matching is not installed", "fm-compile-bf16": "flow_matching is not installed"}
    last = "compile-bf16" if bf16 else "eager"
    assert [r["mode"] for r in res["results"]] == ["eager", "compile-bf16", f"ddp-1rank-{last}"]
    not_budget = [r for r in res["results"] + res["large_batch"] if not r["skipped"].startswith("time budget")]
    assert not_budget == ([] if bf16 else [{"loop": "fastfm", "mode": "compile-bf16", "batch": 4, "skipped": NO_BF16}])
    assert res["large_batch"][0]["mode"] == last and res["large_batch"][0]["batch"] == 8


def test_bench_train_goals() -> None:
    bench = gpu_bench_script("bench_train")
    g = bench._goals([{"mode": "compile-bf16", "img_per_s": 4000.0}], [{"mode": "fm-compile-bf16", "img_per_s": 3000.0}],
                     [{"mode": "compile-bf16", "batch": 512, "img_per_s": 1.0, "mfu": 0.31}])
    assert g["compile_bf16_vs_fm_compile_bf16"]["ratio"] == pytest.approx(4 / 3)
    assert g["compile_bf16_vs_fm_compile_bf16"]["met"] and g["mfu_compile_bf16_large_batch"]["met"]
    g = bench._goals([{"mode": "compile-bf16", "img_per_s": 3500.0}], [{"mode": "fm-compile-bf16", "img_per_s": 3000.0}],
                     [])
    assert g["compile_bf16_vs_fm_compile_bf16"]["met"] is False and g["mfu_compile_bf16_large_batch"]["met"] is None


def test_bench_train_sit_rows_on_cpu(tmp_path: Path, monkeypatch) -> None:
    """--model sit on tiny SiTs: fastfm and its diffusers peer eager and compiled by blocks (dynamo with the eager
    backend, so no inductor build), then fastfm under one-rank FSDP (torchrun, gloo) in the last mode asked for,
    which trains the same steps as the eager row."""
    bench = gpu_bench_script("bench_train")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    out = tmp_path / "s.json"
    res = bench.main([str(out), "--device", "cpu", "--quick", "--model", "sit", "--sit-sizes", "S",
                      "--modes", "compile,eager"])
    assert json.loads(out.read_text()) == res and res["complete"] and ENV_KEYS <= res.keys()
    assert res["missing"] == [] and res["peers"] == ["diffusers"] and res["diffusers"]
    rows = res["results"]
    assert [(r["model"], r["loop"], r["mode"]) for r in rows] == [
        ("sit-S/2", "fastfm", "eager"), ("sit-S/2", "diffusers", "eager"), ("sit-S/2", "fastfm", "compile"),
        ("sit-S/2", "diffusers", "compile"), ("sit-S/2", "fastfm", "fsdp-1rank-eager")], rows
    eager, peer, compiled, peer_compiled, fsdp = rows
    for r in rows:
        assert r["img_per_s"] > 0 and r["flops_per_img"] > 0 and r["mfu"] is None and r["loss"] == r["loss"], r
    for r in (compiled, peer_compiled):
        assert r["compiled_ok"] and r["dynamo"]["graphs"] >= 1, r  # the blocks' graph
    assert peer["params_counted_once"] == eager["params"] < peer["params"]  # diffusers repeats the embedder
    assert eager["speedup_vs_diffusers"] == pytest.approx(eager["img_per_s"] / peer["img_per_s"])
    assert fsdp["loss"] == pytest.approx(eager["loss"], rel=1e-5)  # FSDP on one rank trains the same steps
    assert res["goals"]["compile_bf16_vs_diffusers"] == {"model": "sit-XL/2", "ratio": None, "goal": 1.3, "met": None}


def test_bench_train_sit_missing_peer_budget_and_bf16(tmp_path: Path, monkeypatch) -> None:
    """Without diffusers its rows say so; without native bf16 the compile-bf16 rows are skipped with the reason and
    FSDP runs the last mode the device runs; past the budget the rest are skipped, in the documented order."""
    bench = gpu_bench_script("bench_train")
    monkeypatch.setattr(bench, "missing", lambda packages: list(packages))
    use_caps(monkeypatch, bench, Capabilities("cpu", cpu()))
    res = bench.main([str(tmp_path / "s.json"), "--device", "cpu", "--quick", "--model", "sit",
                      "--modes", "eager,compile-bf16", "--budget", "0"])
    assert res["missing"] == ["diffusers"] and res["complete"]
    got = [(r["model"], r["loop"], r["mode"], r.get("skipped", r.get("missing", ""))[:11]) for r in res["results"]]
    assert got == [(f"sit-{size}/2", loop, mode, why) for size in ("B", "XL") for mode, loop, why in [
        ("compile-bf16", "fastfm", NO_BF16[:11]), ("compile-bf16", "diffusers", "diffusers i"),
        ("eager", "fastfm", "time budget"), ("eager", "diffusers", "diffusers i")]] + [
        (f"sit-{size}/2", "fastfm", "fsdp-1rank-eager", "time budget") for size in ("B", "XL")]
    assert all(g["met"] is None for g in res["goals"].values())
    for bad in (["--peers", "fm-eager"], ["--sit-sizes", "B,M"]):
        with pytest.raises(SystemExit):
            bench.main([str(tmp_path / "s.json"), "--device", "cpu", "--quick", "--model", "sit", *bad])


def test_sit_goals_and_peer_size() -> None:
    """The SiT goals at XL; diffusers' DiT of each SiT size counts SiT's parameters once its per-block copies of the
    conditioning embedder are set aside (the DiT table: 33M, 130M, 458M, 675M at 32x32x4, 1000 classes)."""
    bench = gpu_bench_script("bench_train")

    def rows(ratio: float, mfu: float) -> list[dict]:
        xl = {"model": "sit-XL/2", "mode": "compile-bf16"}
        return [{**xl, "loop": "fastfm", "img_per_s": 100.0 * ratio, "mfu": mfu},
                {**xl, "loop": "diffusers", "img_per_s": 100.0},
                {"model": "sit-B/2", "loop": "fastfm", "mode": "compile-bf16", "img_per_s": 1e6, "mfu": 0.9}]

    g = bench.sit_goals(rows(1.4, 0.45), "sit-XL/2")
    assert g["compile_bf16_vs_diffusers"]["ratio"] == pytest.approx(1.4) and g["compile_bf16_vs_diffusers"]["met"]
    assert g["mfu_compile_bf16"] == {"model": "sit-XL/2", "mfu": 0.45, "goal": 0.4, "met": True}
    g = bench.sit_goals(rows(1.2, 0.35), "sit-XL/2")
    assert g["compile_bf16_vs_diffusers"]["met"] is False and g["mfu_compile_bf16"]["met"] is False
    assert bench.sit_goals(rows(1.4, 0.45)[2:], "sit-XL/2")["mfu_compile_bf16"]["met"] is None
    for size, millions in {"S": 33, "B": 130, "L": 458, "XL": 675}.items():
        with torch.device("meta"):
            sit = SiT(4, size=size, num_classes=1000)
            dit = bench.dit_like(sit.config)
        assert bench.params_counted_once(dit) == bench.params(sit) and round(bench.params(sit) / 1e6) == millions
        assert bench.params(dit) > bench.params(sit)
    with pytest.raises(ValueError, match="no counterpart"):
        bench.dit_like({**sit.config, "mlp": "swiglu"})


# ----------------------------------------------------------------------------- bench_export


def test_bench_export_goals_and_profiler_fields_on_cpu(tmp_path: Path) -> None:
    bench = gpu_bench_script("bench_export")
    out = tmp_path / "e.json"
    res = bench.main([str(out), "--device", "cpu", "--quick", "--impls", "flow_matching,eager", "--rounds", "2"])
    assert json.loads(out.read_text()) == res and res["complete"] and ENV_KEYS <= res.keys()
    rows = res["results"]
    assert [r for r in rows if "error" in r] == []
    assert [(r["model"], r["task"]) for r in rows[:2]] == [("mlp", "sample")] * 2  # goal rows run first
    assert all(r["kernels"]["available"] is False and "launch_gap_ms" not in r for r in rows)
    assert [g["name"] for g in res["goals"]] == [g["name"] for g in bench.GOALS]
    for g in res["goals"]:
        assert g["flow_matching_ms"] > 0 and g["engines"] == {} and g["met"] is None


def test_bench_export_goal_booleans() -> None:
    bench = gpu_bench_script("bench_export")

    def row(model, task, batch, impl, ms, fm_ms):
        return {"model": model, "task": task, "batch": batch, "impl": impl, "nfe": 32, "median_s": ms / 1e3,
                "speedup_vs_flow_matching": fm_ms / ms, "kernel_sum_ms": ms / 2, "gpu_busy_ms": ms / 2,
                "launch_gap_ms": ms / 2}

    rows = [row("mlp", "sample", 1, "flow_matching", 9.8, 9.8), row("mlp", "sample", 1, "cudagraph", 0.45, 9.8),
            row("mlp", "sample", 1, "eager", 0.1, 9.8),  # eager is not an engine: never counts for a goal
            row("mlp", "likelihood", 1024, "flow_matching", 78.5, 78.5),
            row("mlp", "likelihood", 1024, "aoti", 10.0, 78.5),
            row("unet", "sample", 4096, "flow_matching", 45.1, 45.1),
            row("unet", "sample", 4096, "cudagraph", 10.0, 45.1),  # fp32: not the bf16 goal's engine
            row("unet", "sample", 4096, "cudagraph_bf16", 14.0, 45.1)]
    g = {x["name"]: x for x in bench.goals(rows, quick=False)}
    assert g["sample_mlp_batch1"]["met"] is True and g["sample_mlp_batch1"]["best"] == "cudagraph"
    assert g["sample_mlp_batch1"]["engines"]["cudagraph"]["launch_gap_ms"] == pytest.approx(0.225)
    assert g["likelihood_mlp_batch1024"]["met"] is False  # 7.85x < 10x
    assert g["sample_unet_bf16_batch4096"]["met"] is True and list(g["sample_unet_bf16_batch4096"]["engines"]) == [
        "cudagraph_bf16"]
    slow = [dict(r, median_s=0.6e-3, speedup_vs_flow_matching=9.8 / 0.6) if r["impl"] == "cudagraph" else r
            for r in rows]
    assert bench.goals(slow, quick=False)[0]["met"] is False  # 16x and over 0.5 ms


def test_bench_export_skips_bf16_engines_without_native_bf16(tmp_path: Path, monkeypatch) -> None:
    bench = gpu_bench_script("bench_export")
    use_caps(monkeypatch, bench, Capabilities("cpu", cpu()))
    res = bench.main([str(tmp_path / "e.json"), "--device", "cpu", "--quick", "--impls", "eager,aoti_bf16",
                      "--budget", "0"])
    assert res["unsupported"]["bf16"] == NO_BF16 and res["hardware"]["machine_class"] == "cpu-avx2"
    skipped = {(r["impl"], r["skipped"] == NO_BF16) for r in res["results"]}
    assert skipped == {("eager", False), ("aoti_bf16", True)} and len(res["results"]) == 6


def test_bench_export_budget_skips(tmp_path: Path) -> None:
    bench = gpu_bench_script("bench_export")
    res = bench.main([str(tmp_path / "e.json"), "--device", "cpu", "--quick", "--impls", "flow_matching,eager",
                      "--budget", "0"])
    assert res["results"] and all("skipped" in r for r in res["results"])
    assert all(g["met"] is None for g in res["goals"])


# ----------------------------------------------------------------------------- check.sh


def test_check_sh_plumbing_without_gpu(tmp_path: Path) -> None:
    """check.sh end to end on a CPU machine, pip and pytest stubbed: the carried wheels are installed, every CUDA
    stage fails fast, each bench stage gets a limit from the deadline (bench_sit the reserve CHECK_SIT_SECONDS at
    its end) and a --budget, and check.json still lists stages, versions and goals."""
    wrapper = tmp_path / "py"
    wrapper.write_text(f'#!/bin/sh\ncase "$1 $2" in "-m pip"|"-m pytest") echo "stub $*"; exit 0;; esac\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "peer-1.0-py3-none-any.whl").write_bytes(b"")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(wrapper), "CHECK_SECONDS": "300", "CHECK_SIT_SECONDS": "100",
           "CHECK_WHEELS": str(wheels)}
    proc = subprocess.run(["bash", str(CHECK_SH), str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "check.json").read_text())
    assert list(report["stages"]) == STAGES and report["dry"] is False
    assert {report["stages"][k]["status"] for k in ("install", "wheels", "tests")} == {"ok"}
    log = (out / "check.log").read_text()
    assert "--no-index --no-deps --no-compile --no-cache-dir --target" in log and f"{wheels}/peer-1.0" in log
    assert "hardware" in report or report["hardware_error"].startswith("cuda: ")  # no CUDA device to describe
    for name in ("bench_kernels", "bench_train", "bench_export", "bench_sit"):
        assert report["stages"][name]["status"] == "failed (1)"  # --device cuda without CUDA: a clean error
    limits = {}
    for line in log.splitlines():
        if line.startswith("=== bench_") and "(limit" in line:
            name, limit = line.split()[1], int(line.split("(limit ")[1].split("s)")[0])
            assert f"--budget {limit - 15}" in line
            limits[name] = limit
    assert set(limits) == {"bench_kernels", "bench_train", "bench_export", "bench_sit"}
    # each limit is a share of the time left when its stage starts: to 100 s before the deadline (300 s here), and
    # bench_sit's to the deadline
    assert limits["bench_kernels"] <= 200 * 3 // 10 and limits["bench_train"] <= 200 * 4 // 7
    assert limits["bench_export"] <= 200 and limits["bench_train"] > limits["bench_kernels"]
    assert 100 <= limits["bench_sit"] <= 300
    assert "--model sit --modes compile-bf16 --budget" in log
    assert set(report["goals"]) == set(BENCHES)


def test_check_sh_dry_run(tmp_path: Path) -> None:
    """CHECK_DRY=1: every stage of check.sh runs on the CPU at tiny sizes and is recorded as ok (install as
    skipped, with the reason); each benchmark JSON is complete, marked dry and holds the device's capabilities;
    what this CPU cannot do is skipped with the reason, in the JSONs and in the stages' messages."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "CHECK_DRY": "1", "CHECK_WHEELS": str(tmp_path / "no-wheels")}
    started = time.monotonic()
    proc = subprocess.run(["bash", str(CHECK_SH), str(out)], env=env, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "check.json").read_text())
    stages = report["stages"]
    assert list(stages) == STAGES and report["dry"] is True, (out / "check.log").read_text()[-5000:]
    assert stages["install"]["status"].startswith("skipped (dry): ")
    assert stages["wheels"]["status"] == f"skipped: no wheels in {tmp_path / 'no-wheels'} (make gpu-wheels " \
                                         "downloads the peers' wheels there)"
    assert {k: v["status"] for k, v in stages.items() if k not in ("install", "wheels")} == {
        k: "ok" for k in STAGES[2:]}, (out / "check.log").read_text()[-5000:]
    caps = report["hardware"]
    assert caps["device"] == "cpu" and caps["machine_class"].startswith("cpu-") and caps["cuda"] is None
    assert report["unsupported"]["flash_attention"].startswith("flash attention needs a CUDA GPU")
    assert report["train"]["precision"]["requested"] == "bf16" and report["train"]["test"]["nll_nats"] > 0
    assert report["tests"]["failures"] == report["tests"]["errors"] == 0 and stages["tests"]["message"]
    assert report["engine_eval"]["test"]["backend"] == "aoti"
    for name in BENCHES:
        bench = json.loads((out / f"gpu_{name}.json").read_text())
        assert bench["dry"] is True and bench["complete"] and bench["device_type"] == "cpu", name
        assert bench["hardware"] == caps and report["goals"][name]["dry"] is True
        assert not [r for v in bench.values() if isinstance(v, list) for r in v if isinstance(r, dict) and "error" in r]
    if not caps["bf16_native"]:  # the bf16 rows and the trainer's bf16 say why they did not run
        assert report["train"]["precision"]["compute"] == "fp32"
        for name in ("bench_kernels", "bench_train", "bench_export", "bench_sit"):
            assert report["unsupported"]["bf16"] in stages[name]["message"], name
    print(f"dry run: {seconds:.0f} s", {k: v["seconds"] for k, v in stages.items()})
