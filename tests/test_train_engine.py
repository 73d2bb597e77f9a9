"""The training engine: torchrun DDP (gloo) equal to one process on the same global batch, gradient
accumulation, global-batch OT coupling, --compile --bf16 without recompiles after warm-up,
periodic evaluation, telemetry, channels_last, and bad distributed configurations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastfm import seeding
from fastfm.training import trainer as train_mod
from fastfm.run.checkpoint import load_training_state
from fastfm.training.config import ConfigError, TrainConfig
from fastfm.training.distributed import DistEnv

from conftest import TINY_UNET, gpu_bench_script

BASE = dict(data="moons", batch_size=64, steps=5, warmup=2, device="cpu", log_every=1, eval_n=20, n_samples=20,
            eval_steps=2, model_args={"hidden": 32, "depth": 2})


def _flags(opts: dict) -> list[str]:
    out: list[str] = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, dict):
            out += [flag, *(f"{a}={json.dumps(b)}" for a, b in v.items())]
        else:
            out += [flag, str(v)]
    return out


def _torchrun(out: Path, nproc: int = 2, **opts) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fastfm.train", *_flags({**BASE, **opts, "out": str(out)})]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _one(out: Path, **opts) -> dict:
    return train_mod.train(TrainConfig(**{**BASE, **opts, "out": str(out)}).validate(), DistEnv())


def _params(out: Path) -> dict[str, torch.Tensor]:
    return load_training_state(out / "checkpoint.pt")["model"]


def _max_diff(a: Path, b: Path) -> float:
    pa, pb = _params(a), _params(b)
    return max((pa[k] - pb[k]).abs().max().item() for k in pa)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    _one(out)
    return out


def test_two_process_ddp_equals_one_process(single, tmp_path):
    """In-kernel noise at each rank's stream offset: 2 gloo ranks see exactly the one-process batch."""
    _torchrun(tmp_path / "ddp")
    assert _max_diff(single, tmp_path / "ddp") < 1e-5
    state = load_training_state(tmp_path / "ddp" / "checkpoint.pt")
    assert state["world"] == 2 and state["torch_rng"].shape[0] == 2  # every rank's RNG state
    steps = [r["step"] for r in _records(tmp_path / "ddp") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]  # rank 0 alone writes metrics
    # the same run in one process with another seed moves the parameters: the comparison can fail
    _one(tmp_path / "other", seed=1)
    assert _max_diff(single, tmp_path / "other") > 1e-3


def test_ddp_with_compile_and_grad_accumulation_equals_one_process(single, tmp_path):
    """2 ranks x 2 micro-batches (no_sync on the first), compiled before the DDP wrap."""
    _torchrun(tmp_path / "ddp", grad_accum=2, compile=True)
    assert _max_diff(single, tmp_path / "ddp") < 1e-4


def test_grad_accumulation_in_one_process(single, tmp_path):
    _one(tmp_path / "acc", grad_accum=4)
    assert _max_diff(single, tmp_path / "acc") < 1e-5


def test_global_ot_coupling_gathers_solves_scatters(tmp_path):
    """OT over the global batch on 2 ranks = OT over the batch in one process; per-rank OT differs."""
    _one(tmp_path / "one", coupling="ot")
    _torchrun(tmp_path / "global", coupling="ot", coupling_scope="global")
    assert _max_diff(tmp_path / "one", tmp_path / "global") < 1e-5
    _torchrun(tmp_path / "rank", coupling="ot", coupling_scope="rank")
    assert _max_diff(tmp_path / "one", tmp_path / "rank") > 1e-4


def test_resume_with_another_world_size_reseeds_the_rank_streams(single, tmp_path, capsys):
    """The global batches do not depend on the world size; each rank's own stream (dropout) is derived anew."""
    state = load_training_state(single / "checkpoint.pt")
    assert state["world"] == 1
    trainer = train_mod.Trainer(TrainConfig(**{**BASE, "out": str(single), "resume": True}).validate(), DistEnv())
    trainer.env = DistEnv(rank=1, world=2)  # as if launched on 2 ranks (no process group needed to restore)
    assert trainer.restore(state) == BASE["steps"]
    assert "per-rank random streams (dropout) are drawn anew" not in capsys.readouterr().out  # said by rank 0 only
    fresh = torch.Generator().manual_seed(seeding.derive(0, seeding.RANK, 1, BASE["steps"])).get_state()
    assert torch.equal(torch.get_rng_state(), fresh)
    trainer.env = DistEnv(rank=0, world=1)
    trainer.restore(state)  # the same world: the saved state
    assert torch.equal(torch.get_rng_state(), state["torch_rng"][0])


def test_compile_bf16_never_recompiles(tmp_path):
    """The per-step noise seed is a device tensor: the first step's graph serves every later one."""
    summary = _one(tmp_path, compile=True, bf16=True, steps=8)
    recs = [r for r in _records(tmp_path) if "loss" in r]
    graphs = [r["compiled_graphs"] for r in recs]
    assert len(recs) >= 4 and graphs == [graphs[0]] * len(graphs), f"recompiled: {graphs}"
    assert all(r["loss"] is not None and r["loss"] == r["loss"] for r in recs)
    assert summary["last"]["skipped_steps"] == 0


def test_metrics_periodic_eval_and_summary(single):
    recs = _records(single)
    step = [r for r in recs if "loss" in r]
    for key in ("step", "loss", "grad_norm", "lr", "samples_per_s", "sec_per_kimg", "peak_mem_mb", "tflops"):
        assert all(key in r for r in step), key
    assert all(r["samples_per_s"] > 0 and r["peak_mem_mb"] > 0 and r["tflops"] > 0 for r in step)
    assert "mfu" not in step[0]  # no peak FLOP/s known for a CPU
    final = recs[-1]["final"]
    assert final["steps"] == 5 and final["world"] == 1 and final["last"]["step"] == 5


def test_periodic_evaluation_writes_nll_and_png(tmp_path):
    _one(tmp_path, eval_every=2)
    evals = [r for r in _records(tmp_path) if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["eval"]["test"]["nfe"] == 4 and Path(r["eval"]["samples_png"]).is_file()


def test_channels_last_unet_trains_and_evaluates(tmp_path):
    model_args = dict(a.split("=", 1) for a in TINY_UNET[1:])
    opts = {**BASE, "data": "digits", "batch_size": 16, "steps": 2, "memory_format": "channels_last",
            "model_args": {k: json.loads(v) for k, v in model_args.items()}}
    trainer = train_mod.Trainer(TrainConfig(**{**opts, "out": str(tmp_path)}).validate(), DistEnv())
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    summary = trainer.fit()
    assert summary["test"]["bits_per_dim"] == summary["test"]["bits_per_dim"]  # finite NLL through JVPs


@pytest.mark.parametrize("opts,match", [
    ({"grad_accum": 0}, "grad_accum must be >= 1"),
    ({"grad_accum": 3}, "divisible by grad_accum"),
    ({"coupling_scope": "node"}, "unknown coupling_scope"),
    ({"memory_format": "nhwc"}, "unknown memory_format"),
    ({"eval_every": -1}, "eval_every must be >= 0"),
])
def test_bad_engine_configs(opts, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**{**BASE, **opts}).validate()


def test_batch_not_divisible_by_world_and_accum(tmp_path):
    cfg = TrainConfig(**{**BASE, "batch_size": 60, "grad_accum": 4, "out": str(tmp_path)}).validate()
    with pytest.raises(ConfigError, match="divisible by world size x grad_accum = 8 x 4"):
        train_mod.Trainer(cfg, DistEnv(rank=0, world=8))


def test_gpu_training_benchmark_script_runs_on_cpu(tmp_path):
    """benchmarks/gpu/bench_train.py on the CPU: tiny UNet, eager in this process and under one-rank torchrun DDP."""
    bench = gpu_bench_script("bench_train")
    out = tmp_path / "gpu_train.json"
    result = bench.main([str(out), "--device", "cpu", "--quick", "--modes", "eager"])
    assert json.loads(out.read_text()) == result
    rows = result["results"]
    assert [r["mode"] for r in rows] == ["eager", "ddp-1rank-eager"], rows
    for r in rows:
        assert r["img_per_s"] > 0 and r["flops_per_img"] > 0 and r["mfu"] is None and r["loss"] == r["loss"]
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-5)  # DDP on one rank trains the same steps
    with pytest.raises(SystemExit):
        bench.main([str(out), "--device", "cpu", "--modes", "eager,fast"])
