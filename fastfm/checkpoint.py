"""Checkpoints: atomic writes, no arbitrary unpickling on load.

A run directory holds
  checkpoint.pt       full training state (torch.save of tensors and plain containers,
                      loaded with weights_only=True)
  ema.safetensors     EMA weights, for sampling and export
  model.json          what is needed to rebuild model, path and data conventions
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKPOINT, EMA_WEIGHTS, META = "checkpoint.pt", "ema.safetensors", "model.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or inconsistent."""


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in the target directory, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def save_training_state(state: dict, path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


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


def load_training_state(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt or unsafe file
        raise _load_error(path, e) from None


def save_inference(run_dir: str | Path, weights: dict[str, torch.Tensor], meta: dict) -> None:
    """EMA weights as safetensors plus model.json; JSON is written last so a reader never sees new
    metadata with old weights."""
    run_dir = Path(run_dir)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    atomic_write(run_dir / EMA_WEIGHTS, lambda tmp: save_file(tensors, tmp))
    save_json(meta, run_dir / META)


def inference_file(source: str | Path) -> Path:
    """The file that holds the weights: a run directory's ema.safetensors, or ``source`` itself."""
    source = Path(source)
    return source / EMA_WEIGHTS if source.is_dir() else source


def load_inference(source: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, meta) from a run directory, its ema.safetensors, or a checkpoint.pt."""
    source = inference_file(source)
    if not source.exists():
        raise CheckpointError(f"no checkpoint at {source}")
    if source.suffix == ".pt":
        state = load_training_state(source)
        if not isinstance(state, dict) or "ema" not in state or "meta" not in state:
            raise CheckpointError(f"{source} is not a fastfm training checkpoint (no 'ema'/'meta' entries)")
        return state["ema"], state["meta"]
    meta_path = source.parent / META
    meta = load_json(meta_path, CheckpointError, f"{meta_path} is missing: it must sit beside {source.name}")
    try:
        weights = load_file(str(source))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt weights file {source}: {e}") from None
    return weights, meta
