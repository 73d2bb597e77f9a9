"""Training state: SIGKILL at an arbitrary step + --resume ends bitwise equal to an uninterrupted run;
the NaN/Inf guard skips bad steps and stops after too many in a row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastfm.training import trainer as train_mod
from fastfm.training import objectives as objectives_mod
from fastfm.run.checkpoint import load_training_state
from fastfm.training.config import TrainConfig

ARGS = ["--data", "moons", "--batch-size", "64", "--model-args", "hidden=32", "depth=2", "--eval-n", "20",
        "--n-samples", "20", "--eval-steps", "2", "--device", "cpu", "--log-every", "50", "--lr-schedule", "cosine",
        "--warmup", "20"]


def _run(out, *extra, wait=True):
    cmd = [sys.executable, "-m", "fastfm.train", *ARGS, "--out", str(out), *extra]
    if wait:
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        return None
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
    steps = "400"
    _run(tmp_path / "full", "--steps", steps)
    proc = _run(tmp_path / "killed", "--steps", steps, "--ckpt-every", "7", wait=False)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_training_state(ckpt)["step"]
    assert 0 < killed_at < int(steps), "the run was not interrupted mid-way; make it longer"
    _run(tmp_path / "killed", "--steps", steps, "--ckpt-every", "7", "--resume")
    full, resumed = load_training_state(tmp_path / "full" / "checkpoint.pt"), load_training_state(ckpt)
    assert resumed["step"] == full["step"] == int(steps)
    for part in ("model", "ema"):
        for k, v in full[part].items():
            assert torch.equal(v, resumed[part][k]), f"{part}.{k} differs after resume from step {killed_at}"


def test_resume_with_changed_options_is_an_error(tmp_path):
    _run(tmp_path, "--steps", "3")
    with pytest.raises(ValueError, match="differ from the checkpoint"):
        train_mod.train(TrainConfig(data="moons", steps=5, batch_size=32, lr=0.5, out=str(tmp_path), resume=True,
                                    device="cpu").validate())


def _nan_on(steps_bad):
    real = objectives_mod.cfm_loss
    calls = {"n": 0}

    def loss(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in steps_bad:
            out.per_sample = out.per_sample * float("nan")
        return out
    return loss


def _tiny(tmp_path, steps, max_bad=3):
    return TrainConfig(data="moons", steps=steps, batch_size=32, out=str(tmp_path), device="cpu", log_every=1,
                       eval_n=10, n_samples=10, eval_steps=2, max_bad_steps=max_bad,
                       model_args={"hidden": 16, "depth": 1}).validate()


def test_nan_guard_skips_bad_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(objectives_mod, "cfm_loss", _nan_on({3, 4}))
    train_mod.train(_tiny(tmp_path, 6))
    state = load_training_state(tmp_path / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    import json

    recs = [r for r in map(json.loads, lines) if "loss" in r]
    assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 2, 2, 2]
    assert [r["loss"] is None for r in recs] == [False, False, True, True, False, False]  # mean of steps taken


def test_nan_guard_stops_after_too_many_in_a_row(tmp_path, monkeypatch):
    monkeypatch.setattr(objectives_mod, "cfm_loss", _nan_on(set(range(2, 100))))
    with pytest.raises(train_mod.TrainingDiverged, match="3 non-finite steps in a row"):
        train_mod.train(_tiny(tmp_path, 20))
