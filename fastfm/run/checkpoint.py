"""Checkpoints: atomic writes, committed units with digests, no arbitrary unpickling on load.

A run directory holds
  checkpoint.pt       full training state (torch.save of tensors and plain containers,
                      loaded with weights_only=True)
  ema.safetensors     EMA weights, for sampling and export
  model.json          what is needed to rebuild model, path and data conventions
  commit.json         the committed unit: its step and the sha256 of each of the files above

The files of one checkpoint change together (``commit``): each is written in full to a temporary
file, then commit.json names the step, the digests and the temporaries (the commit point), then the
temporaries are renamed over the files and commit.json is rewritten without them. A kill before the
commit point leaves the previous unit (its temporaries are dropped by ``settle``); a kill after it
leaves a unit that ``settle`` finishes (renames the temporaries whose digests match) and that
readers already see (``read_committed`` reads a pending temporary). A file whose digest differs
from commit.json (a flipped bit, a hand edit) is refused at load, naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

CHECKPOINT, EMA_WEIGHTS, META, COMMIT = "checkpoint.pt", "ema.safetensors", "model.json", "commit.json"
UNIT = (CHECKPOINT, EMA_WEIGHTS, META)
"""The files of one committed checkpoint (an inference-only unit has no checkpoint.pt)."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or inconsistent."""


class RunFileError(ValueError):
    """A file of a run that cannot be written (full disk, read-only or missing directory, no permission)."""


def write_error(path: str | Path, e: BaseException) -> RunFileError:
    """One line for a failed write: the path and the operating system's reason (torch.save's writer reports a
    full disk as an 'enforce fail' RuntimeError: the free space is checked to name the reason)."""
    if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:
        try:
            free = shutil.disk_usage(Path(path).parent).free
        except OSError:
            free = -1
        reason = (os.strerror(errno.ENOSPC) if 0 <= free < 1 << 20
                  else (str(e).strip().splitlines() or [type(e).__name__])[0])
    return RunFileError(f"cannot write {path}: {reason}")


def _temporary(path: Path) -> str:
    """A new empty file beside ``path`` (.NAME.XXXXXXXX.tmp) with the mode the umask gives new files."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_error(path, e) from None
    os.close(fd)
    return tmp


def new_mode(directory: bool = False) -> int:
    """The mode open() and mkdir() give new files (0666) and directories (0777) under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _write_temporary(path: Path, write: Callable[[str], None]) -> str:
    """``write(tmp)`` into a temporary beside ``path``, synced to disk; the temporary is removed on failure."""
    tmp = _temporary(path)
    try:
        write(tmp)
        os.chmod(tmp, new_mode())  # after writing: some writers re-create the file 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise write_error(path, e) from None
        raise
    return tmp


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in the target directory, then rename it over ``path``; a failed
    write raises one ``RunFileError`` line and leaves neither a temporary nor a partial ``path``."""
    path = Path(path)
    tmp = _write_temporary(path, write)
    try:
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, e) from None


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_json(obj: Any, path: str | Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
    atomic_write(path, write)


def load_json(path: str | Path, error: type[ValueError], missing: str) -> Any:
    """The JSON value in ``path``; ``error(missing)`` if there is no file, ``error`` naming it if corrupt."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"corrupt {path}: {e}") from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def commit(run_dir: str | Path, step: int, files: dict[str, bytes]) -> None:
    """Write ``files`` (name -> content) into ``run_dir`` as one committed unit at ``step`` (module docstring)."""
    run_dir = Path(run_dir)
    pending: dict[str, str] = {}
    try:
        for name, data in files.items():
            pending[name] = Path(_write_temporary(run_dir / name, lambda tmp: Path(tmp).write_bytes(data))).name
        record = {"step": step, "written": _now(), "files": {name: _digest(data) for name, data in files.items()}}
        save_json({**record, "pending": pending}, run_dir / COMMIT)  # the commit point
    except BaseException:
        for tmp in pending.values():
            (run_dir / tmp).unlink(missing_ok=True)
        raise
    _finish(run_dir, {**record, "pending": pending})


def _finish(run_dir: Path, record: dict) -> None:
    """Rename a committed unit's pending temporaries over its files; commit.json then names no temporaries."""
    for name, tmp in record.get("pending", {}).items():
        if (run_dir / tmp).exists():
            try:
                os.replace(run_dir / tmp, run_dir / name)
            except OSError as e:
                raise write_error(run_dir / name, e) from None
    save_json({k: v for k, v in record.items() if k != "pending"}, run_dir / COMMIT)


def committed(run_dir: str | Path) -> dict | None:
    """commit.json of ``run_dir`` ({"step", "written", "files", maybe "pending"}), or None if there is none."""
    path = Path(run_dir) / COMMIT
    if not path.exists():
        return None
    record = load_json(path, CheckpointError, f"no {path}")
    if not (isinstance(record, dict) and isinstance(record.get("files"), dict)
            and isinstance(record.get("step"), int) and isinstance(record.get("pending", {}), dict)):
        raise CheckpointError(f"corrupt {path}: not a fastfm commit record")
    return record


def settle(run_dir: str | Path) -> dict | None:
    """Writer's recovery after a kill: finish a committed unit (rename its temporaries whose digests match),
    remove every other temporary of the unit's files; returns the commit record."""
    run_dir = Path(run_dir)
    record = committed(run_dir)
    if record is not None and record.get("pending"):
        ready = {name: tmp for name, tmp in record["pending"].items()
                 if (run_dir / tmp).exists() and sha256(run_dir / tmp) == record["files"][name]}
        _finish(run_dir, {**record, "pending": ready})
        record = committed(run_dir)
    drop_temporaries(run_dir)
    return record


def drop_temporaries(run_dir: Path) -> None:
    """Remove the temporaries (.NAME.XXXXXXXX.tmp) of a unit's files that a killed writer left behind."""
    for name in (*UNIT, COMMIT):
        for tmp in run_dir.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


RESUME_HINT = "python -m fastfm.train --resume --out {dir} (with the run's options) rewrites it from checkpoint.pt"


def read_committed(path: str | Path) -> bytes:
    """The bytes of a run file as committed: checked against commit.json's digest where the directory has one
    (a pending temporary of a committed unit is read in its place); a file of no run directory as it is."""
    path = Path(path)
    for attempt in range(3):  # a writer may rename a temporary or rewrite commit.json between our reads
        record = committed(path.parent)
        if record is None or path.name not in UNIT:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise CheckpointError(f"no checkpoint at {path}") from None
        want = record["files"].get(path.name)
        where = f"the checkpoint committed in {path.parent / COMMIT} (step {record['step']})"
        if want is None:
            raise CheckpointError(f"{path} is not part of {where}")
        found = False
        for candidate in (path, path.parent / record.get("pending", {}).get(path.name, path.name)):
            try:
                data = candidate.read_bytes()
            except FileNotFoundError:
                continue
            found = True
            if _digest(data) == want:
                return data
        if attempt == 2:
            if not found:
                hint = "" if path.name == CHECKPOINT else "; " + RESUME_HINT.format(dir=path.parent)
                raise CheckpointError(f"{path} is missing: {where} lists it{hint}")
            raise CheckpointError(f"{path} does not match its sha256 in {where}: the file was edited or corrupted "
                                  "after it was written")
        time.sleep(0.05)
    raise AssertionError("unreachable")


def _load_error(path: str | Path, e: Exception) -> CheckpointError:
    """One line for a file torch.load refused or could not read: a pickled reference to a Python object
    (a class, a function) is refused as unsafe; anything else is reported with the reader's own first line."""
    if isinstance(e, pickle.UnpicklingError):  # torch re-raises the unpickler's error inside advice to load unsafely
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        if unsafe:
            return CheckpointError(f"corrupt or unsafe checkpoint {path}: refused, it contains objects other than "
                                   f"tensors and plain containers (unsafe pickle referencing {unsafe[1]})")
        e = e.__context__ or e
    lines = str(e).strip().splitlines()
    return CheckpointError(f"corrupt or unsafe checkpoint {path}: {lines[0] if lines else type(e).__name__}")


def save_training_state(state: dict, path: str | Path) -> None:
    """A lone checkpoint file (atomic); in a run directory ``save_inference(..., state=...)`` commits it with
    the files that go with it."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | Path) -> dict:
    """A checkpoint.pt (digest-checked in a run directory), tensors and plain containers only."""
    data = read_committed(path)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt or unsafe file
        raise _load_error(path, e) from None


def save_inference(run_dir: str | Path, weights: dict[str, torch.Tensor], meta: dict, step: int = 0,
                   state: dict | None = None) -> None:
    """Commit EMA weights (safetensors) and model.json, with the full training ``state`` (checkpoint.pt) if
    given, as one unit at ``step``."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    files = {EMA_WEIGHTS: save_safetensors(tensors), META: json.dumps(meta, indent=2, sort_keys=True).encode()}
    if state is not None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        files = {CHECKPOINT: buffer.getvalue(), **files}
    commit(run_dir, step, files)


def inference_file(source: str | Path) -> Path:
    """The file that holds the weights: a run directory's ema.safetensors, or ``source`` itself."""
    source = Path(source)
    return source / EMA_WEIGHTS if source.is_dir() else source


def load_inference(source: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, meta) from a run directory, its ema.safetensors, or a checkpoint.pt; digest-checked."""
    source = inference_file(source)
    if source.suffix == ".pt":
        state = load_training_state(source)
        if isinstance(state, dict) and "shards" in state:  # a sharded run's EMA is committed whole beside it
            return load_inference(source.parent)
        if not isinstance(state, dict) or "ema" not in state or "meta" not in state:
            raise CheckpointError(f"{source} is not a fastfm training checkpoint (no 'ema'/'meta' entries)")
        return state["ema"], state["meta"]
    if not source.exists() and (source.parent / CHECKPOINT).exists() and source.name == EMA_WEIGHTS:
        raise CheckpointError(f"{source} is missing (the run has a {CHECKPOINT}): "
                              + RESUME_HINT.format(dir=source.parent))
    data = read_committed(source)
    meta_path = source.parent / META
    if not meta_path.exists():
        raise CheckpointError(f"{meta_path} is missing: it must sit beside {source.name}")
    try:
        meta = json.loads(read_committed(meta_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt {meta_path}: {e}") from None
    try:
        weights = load_safetensors(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"corrupt weights file {source}: {e}") from None
    return weights, meta
