"""A run directory (``--out``) as one training job owns it: the lock that keeps a second job out, the checks
before the first step (a run already there, free space), the clean-up a kill leaves behind, and the metrics
log (metrics.jsonl, optionally TensorBoard event files).

The lock is an exclusive ``flock`` on OUT/.lock, held while the job runs; the file names its holder (pid,
host, start time, command) and is removed when the job ends. The kernel drops the lock when its process dies,
so a lock file left by a killed run never blocks the next one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastfm.run.checkpoint import (CHECKPOINT, COMMIT, EMA_WEIGHTS, META, RunFileError, atomic_write, drop_temporaries,
                               save_json, write_error)
from fastfm.run.shards import SHARDS
from fastfm.run.tensorboard import LOGDIR, TensorBoardLog

LOCK, METRICS, CONFIG = ".lock", "metrics.jsonl", "config.json"
RUN_FILES = (COMMIT, CHECKPOINT, EMA_WEIGHTS)
"""Files that hold a model and so make a directory a run directory: a new run there needs --force. The metrics
and config.json of a run that never wrote a checkpoint (killed early, or stopped by a full disk) are replaced
by the next run, so a retry needs no --force (a live run is kept out by the lock)."""


class RunInUse(ValueError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """The exclusive lock of one run directory, for this process (``acquire`` / ``release``)."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / LOCK
        self.fd: int | None = None

    def acquire(self, command: str) -> None:
        """Take the lock or raise ``RunInUse`` naming the live holder; ``RunFileError`` if OUT is not writable."""
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise write_error(self.path, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                raise RunInUse(f"{self.path.parent} is in use by a live run ({describe_holder(holder)}): wait for "
                               "it to end or stop it, or choose another --out") from None
            try:  # the file we locked is still the lock (its holder did not remove it meanwhile)
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError as e:
            self.path.unlink(missing_ok=True)
            os.close(fd)
            raise write_error(self.path, e) from None
        self.fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (in that order: a waiting process re-checks the file)."""
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def describe_holder(text: str) -> str:
    """'pid 123 on host h since 2026-...: python -m fastfm.train ...' from a lock file's JSON."""
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']} since {info['started']}: {info['command']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "a process that did not say who it is"


def command_line(world: int = 1) -> str:
    """How this process was started, as a shell command (under torchrun, the torchrun form)."""
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    launcher = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
    return f"{launcher} -m fastfm.train {args}".strip()


def resume_command(world: int) -> str:
    """This run's command line with --resume (and without --force): what continues it."""
    args = [a for a in sys.argv[1:] if a not in ("--force", "--resume")] + ["--resume"]
    launcher = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
    return f"{launcher} -m fastfm.train {' '.join(shlex.quote(a) for a in args)}"


def check_out_dir(out: Path, resume: bool, force: bool) -> None:
    """--resume needs OUT/checkpoint.pt; a new run must not replace another run's model unless --force."""
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise RunFileError(f"--resume: there is no {CHECKPOINT} in {out}; check --out, or drop --resume to "
                               "start a new run")
        return
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not force:
        raise RunFileError(f"{out} already holds a run ({', '.join(found)}); pass --resume to continue it or "
                           "--force to replace it")


def check_space(out: Path, checkpoint_bytes: int) -> None:
    """Room for a checkpoint written beside the previous one (commit writes the new unit before it replaces
    the old), before the first step rather than at the first checkpoint."""
    free = shutil.disk_usage(out).free
    need = 2 * checkpoint_bytes
    if free < need:
        raise RunFileError(f"cannot write checkpoints to {out}: {free / 2**20:.1f} MiB free, a checkpoint of this "
                           f"run needs about {need / 2**20:.1f} MiB (the new one is written beside the last)")


def _logged_after(line: str, step: int) -> bool:
    """Whether a metrics.jsonl line was logged after ``step``, or torn by a kill mid-write."""
    try:
        return json.loads(line).get("step", 0) > step
    except json.JSONDecodeError:
        return True


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records (torn lines skipped)."""
    path = out / METRICS
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def prepare_out_dir(out: Path, config: dict[str, Any], resumed_at: int | None) -> None:
    """Rank 0, before the first step: remove a killed run's temporary metrics files; on resume drop the metrics
    rows logged after the checkpoint (atomic rewrite), else start the metrics afresh and remove the files (and
    temporaries) of a run --force replaces; write config.json."""
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(f".{METRICS}.*.tmp"):
        tmp.unlink(missing_ok=True)
    metrics = out / METRICS
    if resumed_at is None:
        drop_temporaries(out)
        for name in (COMMIT, CHECKPOINT, EMA_WEIGHTS, META):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / LOGDIR, ignore_errors=True)  # a replaced run's curves are not this run's
        shutil.rmtree(out / SHARDS, ignore_errors=True)  # nor its sharded checkpoints
        atomic_write(metrics, lambda tmp: Path(tmp).write_text(""))
    elif metrics.exists():
        rows = [line for line in metrics.read_text().splitlines() if not _logged_after(line, resumed_at)]
        atomic_write(metrics, lambda tmp: Path(tmp).write_text("".join(row + "\n" for row in rows)))
    save_json(config, out / CONFIG)


class MetricsLog:
    """metrics.jsonl (one JSON record a line), and TensorBoard event files under OUT/tensorboard if asked."""

    def __init__(self, out: Path, tensorboard: bool):
        self.path = out / METRICS
        self.board = None
        if tensorboard:
            self.board = TensorBoardLog(out)

    def write(self, record: dict[str, Any]) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise write_error(self.path, e) from None
        if self.board is not None:
            self.board.write(record)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
