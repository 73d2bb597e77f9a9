"""What operators do to a training run, and what the run must survive (issue 25): kills at every point of a
checkpoint's commit, --resume of a finished or interrupted run, dropout and multi-rank resumes bitwise equal
to the uninterrupted run, SIGTERM / SIGINT, a second run into a live run's directory, a rank that stops
answering, non-finite weights, full and read-only disks, edited or corrupted files."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fastfm.training import trainer as train_mod
from fastfm.run.checkpoint import (CHECKPOINT, COMMIT, EMA_WEIGHTS, META, UNIT, CheckpointError, committed,
                               load_inference, load_training_state, save_inference, sha256)
from fastfm.training.config import TrainConfig
from fastfm.training.distributed import DistEnv
from fastfm.run.load import load_run

from conftest import TINY_UNET

ROOT = Path(__file__).resolve().parents[1]
MOONS = dict(data="moons", batch_size=32, device="cpu", log_every=1, eval_n=10, n_samples=10, eval_steps=2,
             eval_budget=2.0, model_args={"hidden": 16, "depth": 1})
# a model with dropout: every resume test must see the global RNG's draws restored exactly
DROPOUT = dict(MOONS, data="digits", batch_size=8, n_samples=4, eval_n=4,
               model_args={"model_channels": 8, "channel_mult": [1], "num_res_blocks": 1, "dropout": 0.3})


def _cfg(out: Path, **opts) -> TrainConfig:
    return TrainConfig(**{**MOONS, **opts, "out": str(out)}).validate()


def _train(out: Path, **opts) -> dict:
    return train_mod.train(_cfg(out, **opts), DistEnv())


def _flags(opts: dict) -> list[str]:
    out: list[str] = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out += [flag] if v else []
        elif isinstance(v, dict):
            out += [flag, *(f"{a}={json.dumps(b)}" for a, b in v.items())]
        else:
            out += [flag, str(v)]
    return out


def _same_weights(a: Path, b: Path) -> None:
    sa, sb = load_training_state(a / CHECKPOINT), load_training_state(b / CHECKPOINT)
    assert sa["step"] == sb["step"]
    for part in ("model", "ema"):
        for k, v in sa[part].items():
            assert torch.equal(v, sb[part][k]), f"{part}.{k} differs"


def _consistent(out: Path) -> dict:
    """Every file of the committed unit matches commit.json; no temporaries, no lock left behind."""
    record = committed(out)
    assert record is not None and "pending" not in record
    for name, digest in record["files"].items():
        assert sha256(out / name) == digest, name
    assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists()
    return record


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# A kill at every point of a checkpoint's commit; --resume finishes what is missing
# ---------------------------------------------------------------------------------------------

# Runs training in a child that dies like SIGKILL (os._exit: no clean-up) just before the KILL_AT-th rename of
# the final checkpoint's commit: 1 commit.json (the commit point), 2 checkpoint.pt, 3 ema.safetensors,
# 4 model.json, 5 commit.json without its temporaries; 6: after the commit, before the final summary.
KILLER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import fastfm.run.checkpoint as ckpt
    from fastfm.training import trainer
    from fastfm.training.config import TrainConfig
    from fastfm.training.distributed import DistEnv
    kill_at, renames, real = int(sys.argv[1]), [], os.replace
    unit = set(ckpt.UNIT) | {ckpt.COMMIT}
    def replace(src, dst):
        if Path(dst).name in unit:
            renames.append(dst)
            if len(renames) == 5 + kill_at:  # the step-2 commit made the first five
                os._exit(137)
        return real(src, dst)
    os.replace = replace
    trainer.Trainer.evaluate = lambda self, *a: os._exit(137) if kill_at == 6 else None
    trainer.train(TrainConfig(**json.loads(sys.argv[2])).validate(), DistEnv())
""")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    _train(out, steps=4, ckpt_every=2)
    return out


@pytest.mark.parametrize("kill_at", [1, 2, 3, 6])
def test_kill_during_the_final_checkpoint_then_resume(uninterrupted: Path, tmp_path: Path, kill_at: int) -> None:
    out = tmp_path / "run"
    opts = {**MOONS, "out": str(out), "steps": 4, "ckpt_every": 2}
    child = subprocess.run([sys.executable, "-c", KILLER, str(kill_at), json.dumps(opts)], capture_output=True,
                           text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 137, child.stderr[-2000:]
    # what sample, evaluate and export read: one committed unit, never a step-4 checkpoint beside a step-2 EMA
    record = committed(out)
    assert record is not None and record["step"] == (2 if kill_at == 1 else 4)
    weights, meta = load_inference(out)
    assert load_training_state(out / CHECKPOINT)["step"] == record["step"]
    assert torch.equal(weights[next(iter(weights))], load_training_state(out / CHECKPOINT)["ema"][next(iter(weights))])
    assert load_run(out).meta.to_json() == meta
    # --resume finishes: the same weights as the uninterrupted run, the final summary, no temporaries
    _train(out, steps=4, ckpt_every=2, resume=True)
    _same_weights(out, uninterrupted)
    assert _consistent(out)["step"] == 4
    rows = _rows(out)
    assert sum("final" in r for r in rows) == 1 and "final" in rows[-1]
    # and once finished, there is nothing left to do
    assert _train(out, steps=4, ckpt_every=2, resume=True) == {}


def test_checkpoint_pt_without_ema_weights_is_named_and_resume_rewrites_them(uninterrupted: Path,
                                                                              tmp_path: Path) -> None:
    out = tmp_path / "run"
    _train(out, steps=2)
    (out / EMA_WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=f"{EMA_WEIGHTS} is missing.*--resume"):
        load_run(out)
    assert _train(out, steps=2, resume=True) == {}  # finished, with its summary: only the repair
    assert load_run(out).meta.to_json() == load_training_state(out / CHECKPOINT)["meta"]
    _consistent(out)


# ---------------------------------------------------------------------------------------------
# Resume is bitwise: dropout, and 2 ranks -> 2 ranks stopped by SIGTERM under torchrun
# ---------------------------------------------------------------------------------------------


def test_resume_of_a_model_with_dropout_is_bitwise(tmp_path: Path) -> None:
    """The FLOP count at the start of a (re)start draws its inputs with the RNG state set aside."""
    _train(tmp_path / "full", **DROPOUT, steps=4)
    _train(tmp_path / "split", **DROPOUT, steps=2)
    _train(tmp_path / "split", **DROPOUT, steps=4, resume=True)
    _same_weights(tmp_path / "full", tmp_path / "split")


def _torchrun(out: Path, *extra: str, steps: int, wait: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastfm.train",
           *_flags({**DROPOUT, "steps": steps, "out": str(out)}), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if wait:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    return proc


def _wait_for_row(out: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until metrics.jsonl has a training row (the loop is running)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and any("loss" in r for r in _rows_lenient(out)):
            return
        time.sleep(0.1)
    raise AssertionError(f"no training row in {out} (exit code {proc.poll()})")


def _rows_lenient(out: Path) -> list[dict]:
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def test_two_rank_sigterm_and_two_rank_resume_is_bitwise(tmp_path: Path) -> None:
    steps = 200
    stopped = _torchrun(tmp_path / "stopped", steps=steps, wait=False)
    _wait_for_row(tmp_path / "stopped", stopped)
    stopped.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode != 0
    at = load_training_state(tmp_path / "stopped" / CHECKPOINT)["step"]
    assert 0 < at < steps, "the run was not stopped mid-way"
    assert f"stopped by SIGTERM at step {at}" in err and "--resume" in err, err[-3000:]
    _torchrun(tmp_path / "stopped", "--resume", steps=at + 3)
    _torchrun(tmp_path / "full", steps=at + 3)
    _same_weights(tmp_path / "stopped", tmp_path / "full")


# ---------------------------------------------------------------------------------------------
# SIGINT (Ctrl-C): finish the step, checkpoint, say how to resume, exit 130 without a traceback
# ---------------------------------------------------------------------------------------------


def test_ctrl_c_checkpoints_and_says_how_to_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastfm.train", *_flags({**MOONS, "steps": 100000, "out": str(out)})]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_row(out, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    line = [ln for ln in err.splitlines() if "stopped by SIGINT" in ln]
    assert line and "python -m fastfm.train" in line[0] and "--resume" in line[0], err[-2000:]
    at = load_training_state(out / CHECKPOINT)["step"]
    assert line[0].startswith(f"stopped by SIGINT at step {at}:")
    _consistent(out)


# ---------------------------------------------------------------------------------------------
# One run per directory: a live run's lock refuses a second run (and a --resume); a stale lock does not
# ---------------------------------------------------------------------------------------------


def test_a_live_run_locks_its_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastfm.train", *_flags({**MOONS, "steps": 100000, "out": str(out),
                                                          "ckpt_every": 5})]
    live = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_row(out, live)
        while not (out / CHECKPOINT).exists():
            time.sleep(0.1)
        for extra in ({"force": True}, {"resume": True}):
            with pytest.raises(ValueError, match=f"in use by a live run \\(pid {live.pid} on host "):
                _train(out, steps=100000, ckpt_every=5, **extra)
    finally:
        live.kill()  # SIGKILL: the lock file stays behind, its lock dies with the process
        live.wait()
    assert (out / ".lock").exists()
    _train(out, steps=5, ckpt_every=5, force=True)  # a stale lock does not block
    assert not (out / ".lock").exists()


# ---------------------------------------------------------------------------------------------
# A rank that stops answering: the job stops after --dist-timeout, naming the rank
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_hung_rank_is_named_after_the_collective_timeout(tmp_path: Path) -> None:
    out, port = tmp_path / "run", _free_port()
    ranks = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, "-m", "fastfm.train", *_flags({**MOONS, "steps": 100000, "out": str(out),
                                                              "dist_timeout": 4.0})]
        ranks.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env))
    try:
        _wait_for_row(out, ranks[0])
        os.kill(ranks[1].pid, signal.SIGSTOP)  # rank 1 stops answering
        started = time.time()
        _, err = ranks[0].communicate(timeout=120)
        assert ranks[0].returncode == 1, err[-2000:]
        assert time.time() - started < 60
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: rank(s) 1 did not answer: a collective timed out after --dist-timeout 4 s"), \
            err[-2000:]
        assert "last good checkpoint" in last or "no checkpoint was written" in last
    finally:
        for p in ranks:
            p.kill()
            p.wait()


# ---------------------------------------------------------------------------------------------
# Non-finite weights are never checkpointed; the message names the last good checkpoint
# ---------------------------------------------------------------------------------------------


def test_non_finite_weights_are_never_checkpointed(tmp_path: Path) -> None:
    with pytest.raises(train_mod.TrainingDiverged) as e:
        _train(tmp_path, steps=200, lr=1e38, warmup=0, ckpt_every=10, log_every=10)
    msg = str(e.value)
    record = committed(tmp_path)
    if record is None:
        assert "no checkpoint was written" in msg, msg
    else:
        state = load_training_state(tmp_path / CHECKPOINT)
        assert f"last good checkpoint: {tmp_path / CHECKPOINT} (step {record['step']})" in msg, msg
        for part in ("model", "ema"):
            assert all(torch.isfinite(v).all() for v in state[part].values() if v.is_floating_point())
        assert all(torch.isfinite(v).all() for v in load_inference(tmp_path)[0].values())


def test_weights_that_turn_non_finite_stop_the_run_before_the_checkpoint(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _train(tmp_path, steps=2, ckpt_every=2)
    real = train_mod.Trainer.train_step

    def poisoning(self, step):  # the weights become inf after step 3: finite loss and gradients until then
        out = real(self, step)
        if step == 3:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))
        return out

    monkeypatch.setattr(train_mod.Trainer, "train_step", poisoning)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(train_mod.TrainingDiverged,
                       match=f"not finite .* at step 4: not checkpointed; last good checkpoint: .*step 2\\)"):
        _train(tmp_path, steps=4, ckpt_every=2, resume=True)
    assert (tmp_path / CHECKPOINT).read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Full and read-only disks: one line naming the path and the reason; nothing left that blocks a retry
# ---------------------------------------------------------------------------------------------


def test_a_failed_commit_keeps_the_last_unit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that fills up while a checkpoint is written: one line, the previous unit intact, no temporaries."""
    _train(tmp_path, steps=2, ckpt_every=2)
    before = {name: (tmp_path / name).read_bytes() for name in (*UNIT, COMMIT)}
    real = Path.write_bytes

    def full(self, data):
        if self.name.startswith(f".{EMA_WEIGHTS}."):
            real(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(ValueError, match=f"cannot write {tmp_path / EMA_WEIGHTS}: No space left on device"):
        _train(tmp_path, steps=4, ckpt_every=2, resume=True)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in (*UNIT, COMMIT)} == before
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / ".lock").exists()
    _train(tmp_path, steps=4, ckpt_every=2, resume=True)  # the retry, once there is room
    assert _consistent(tmp_path)["step"] == 4


def _mount_tmpfs(where: Path, *options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path: Path):
    where = tmp_path / "disk"
    _mount_tmpfs(where, "size=8m")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_is_found_before_the_first_step(small_disk: Path) -> None:
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    os.truncate(filler, filler.stat().st_size - 2**19)  # half a MiB left: room for the lock and config, not more
    out = small_disk / "run"
    big = {"model_args": {"hidden": 256, "depth": 2}}
    with pytest.raises(ValueError) as e:
        _train(out, steps=2, **big)
    assert str(e.value).startswith(f"cannot write checkpoints to {out}: 0.5 MiB free, a checkpoint of this run needs "
                                   "about"), e.value
    filler.unlink()
    _train(out, steps=2, **big)  # the same command once there is room: no --force needed
    _consistent(out)


def test_a_read_only_directory_is_one_line(tmp_path: Path) -> None:
    where = tmp_path / "ro"
    _mount_tmpfs(where, "size=1m", "ro")
    try:
        with pytest.raises(ValueError, match=f"cannot write {where / 'run'}.*Read-only file system"):
            _train(where / "run", steps=2)
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


# ---------------------------------------------------------------------------------------------
# Integrity: digests of a run's files, recorded when written, checked at load
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small") / "run"
    _train(out, steps=2)
    return out


def _copy(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


def test_one_flipped_bit_is_refused(small_run: Path, tmp_path: Path) -> None:
    out = _copy(small_run, tmp_path / "run")
    data = bytearray((out / CHECKPOINT).read_bytes())
    data[len(data) // 2] ^= 0x10  # inside a tensor's bytes: torch.load alone would not notice
    (out / CHECKPOINT).write_bytes(bytes(data))
    for load in (lambda: load_training_state(out / CHECKPOINT), lambda: load_run(out / CHECKPOINT),
                 lambda: _train(out, steps=4, resume=True)):
        with pytest.raises(CheckpointError, match=f"{out / CHECKPOINT} does not match its sha256"):
            load()


def test_a_hand_edited_model_json_is_refused(small_run: Path, tmp_path: Path) -> None:
    out = _copy(small_run, tmp_path / "run")
    meta = json.loads((out / META).read_text())
    meta["path"]["name"] = "vp"  # was condot: would sample with the wrong path
    (out / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"{out / META} does not match its sha256 .*edited or corrupted"):
        load_run(out)


def test_wrong_shaped_tensors_in_a_checkpoint_are_one_line(small_run: Path, tmp_path: Path) -> None:
    """A checkpoint with the run's config but tensors of other shapes (committed consistently)."""
    out = _copy(small_run, tmp_path / "run")
    state = load_training_state(out / CHECKPOINT)
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, 3)
    save_inference(out, state["ema"], state["meta"], step=state["step"], state=state)
    with pytest.raises(CheckpointError, match=f"{out / CHECKPOINT} does not fit this run's model .*size mismatch"):
        _train(out, steps=4, resume=True)


def test_run_files_have_the_usual_modes(small_run: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for name in (*UNIT, COMMIT, "metrics.jsonl", "config.json"):
        assert (small_run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_tensorboard_event_files(tmp_path: Path) -> None:
    """--tensorboard: every metrics.jsonl record also as TensorBoard scalars, at its step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path, steps=3, tensorboard=True)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [r for r in _rows(tmp_path) if "loss" in r]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in logged] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    final = [r["final"] for r in _rows(tmp_path) if "final" in r][0]
    nll = events.Scalars("eval/test/nll_nats")
    assert [(e.step, e.value) for e in nll] == [(3, pytest.approx(final["test"]["nll_nats"], rel=1e-6))]


def test_too_little_data_is_found_before_training(tmp_path: Path) -> None:
    """A 2-row data set (1 test row) used to train to the end and fail in the final evaluation."""
    import numpy as np

    np.save(tmp_path / "two.npy", np.random.default_rng(0).normal(size=(2, 2)).astype(np.float32))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="has 1 test point\\(s\\); the evaluation needs at least 2"):
        _train(out, data=f"npy:{tmp_path / 'two.npy'}", steps=3)
    assert not out.exists()
