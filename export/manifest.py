"""manifest.json: what an engine directory holds, written beside the engine and checked on load.

    schema, fastfm_version, created
    manifest_sha256              sha256 of the canonical JSON of everything else in the manifest
    spec        task, solver, steps, batch, backend, dtype, divergence, probes, guidance, ...
    nfe, device, grid            field evaluations per call, engine device, the baked time grid
    inputs, outputs              name, static shape, dtype of each, in graph order
    engine                       file name (directly in the engine directory) and sha256
    checkpoint                   source, sha256 of the weights file, the run's model.json
    parity                       max-abs and cosine per output against eager, tolerances
    versions                     torch and the backend's packages
    hardware, selection          the building machine (fastfm.hardware) and how backend and dtype were chosen
                                 (requested, or measured: every candidate's seconds per call)

Reading rejects corrupt JSON, an unknown schema or backend, missing keys, inputs/outputs, nfe or a
grid that do not follow from the spec and the model, a manifest edited after the build (its
manifest_sha256 differs), an engine file that is not a plain file in the engine directory, and one
whose sha256 differs. Manifests of earlier schemas (1: no manifest_sha256; 2: no SDE fields in the spec) are
refused: rebuild the engine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from fastfm.checkpoint import load_json, save_json
from fastfm.solvers import TABLEAUS, time_grid

from .backends import ENGINE_BACKENDS
from .spec import DTYPES, TASKS, EngineSpec, ExportError, TensorSlot, signature

MANIFEST = "manifest.json"
SCHEMA = 3
DIGEST = "manifest_sha256"
REQUIRED = ("schema", DIGEST, "spec", "nfe", "grid", "device", "inputs", "outputs", "engine", "checkpoint", "parity",
            "versions")


class ManifestError(ExportError):
    """A manifest that is missing, corrupt, or does not match its engine or checkpoint."""


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    """A validated manifest; ``meta`` is the run's model.json (data shape, kind, levels, path)."""

    spec: EngineSpec
    nfe: int
    device: torch.device
    inputs: list[TensorSlot]
    outputs: list[TensorSlot]
    engine_file: Path
    checkpoint_sha256: str
    meta: dict[str, Any]
    parity: dict[str, Any]
    hardware: dict[str, Any] | None = None  # the machine that built it (fastfm.hardware)
    selection: dict[str, Any] | None = None  # how backend and dtype were chosen, with each candidate's time


def digest(body: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of ``body`` without its own digest."""
    rest = {k: v for k, v in body.items() if k != DIGEST}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write(directory: Path, body: dict[str, Any]) -> None:
    """DIRECTORY/manifest.json: ``body`` with the schema and its digest."""
    body = {"schema": SCHEMA, **body}
    save_json({**body, DIGEST: digest(body)}, directory / MANIFEST)


def _spec(d: Any) -> EngineSpec:
    names = {f.name for f in fields(EngineSpec)}
    if not isinstance(d, dict) or set(d) != names:
        raise ManifestError(f"manifest spec must have exactly the keys {sorted(names)}")
    if d["backend"] not in ENGINE_BACKENDS:
        raise ManifestError(f"manifest names unknown backend {d['backend']!r}; known: {ENGINE_BACKENDS.names}")
    for field, allowed in (("task", TASKS), ("solver", tuple(TABLEAUS)), ("dtype", tuple(DTYPES))):
        if d[field] not in allowed:
            raise ManifestError(f"manifest names unknown {field} {d[field]!r}; known: {allowed}")
    if not all(isinstance(d[k], int) and d[k] >= 0 for k in ("steps", "batch", "probes")):
        raise ManifestError("manifest steps, batch and probes must be non-negative integers")
    return EngineSpec(**d)


def _engine_file(directory: Path, name: Any, path: Path) -> Path:
    """The engine file: a bare file name (no directory part, not absolute) of an entry of the engine
    directory that is not a symbolic link."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name \
            or (directory / name).is_symlink():
        raise ManifestError(f"{path}: engine file {name!r} is not a plain file inside the engine directory "
                            f"{directory} (a bare file name, no directories or symbolic links)")
    return directory / name


def _check_grid(grid: Any, spec: EngineSpec, path: Path) -> None:
    """The grid must be the uniform fp32 grid of the spec's steps between its own end points."""
    ok = (spec.steps >= 1 and isinstance(grid, list) and len(grid) == spec.steps + 1
          and all(isinstance(t, (int, float)) for t in grid))
    if not ok or not torch.allclose(torch.tensor(grid, dtype=torch.float32), time_grid(spec.steps, grid[0], grid[-1]),
                                    rtol=0, atol=1e-6):
        raise ManifestError(f"{path}: grid {grid} is not the time grid of {spec.steps} {spec.solver} steps")


def read(directory: str | Path, verify: bool = True) -> Manifest:
    """Parse and validate DIRECTORY/manifest.json (and the engine file's sha256 when ``verify``)."""
    directory = Path(directory)
    path = directory / MANIFEST
    body = load_json(path, ManifestError, f"{directory} is not an engine directory: no {MANIFEST}")
    if not isinstance(body, dict):
        raise ManifestError(f"{path} must hold a JSON object")
    if "schema" in body and body["schema"] != SCHEMA:
        raise ManifestError(f"{path} has schema {body['schema']!r}; this fastfm reads schema {SCHEMA} "
                            "(rebuild the engine with python -m fastfm.export)")
    missing = [k for k in REQUIRED if k not in body]
    if missing:
        raise ManifestError(f"{path} lacks {missing}")
    try:
        spec = _spec(body["spec"])
        meta = body["checkpoint"]["meta"]
        inputs = [TensorSlot.from_json(d) for d in body["inputs"]]
        outputs = [TensorSlot.from_json(d) for d in body["outputs"]]
        expected = signature(spec, meta)
        engine_file = _engine_file(directory, body["engine"]["file"], path)
        engine_sha, ckpt_sha = str(body["engine"]["sha256"]), str(body["checkpoint"]["sha256"])
        device = torch.device(body["device"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        if isinstance(e, ManifestError):
            raise
        raise ManifestError(f"malformed {path}: {type(e).__name__}: {e}") from None
    if (inputs, outputs) != expected:
        raise ManifestError(f"{path}: inputs/outputs do not follow from its spec and model "
                            f"(expected {expected}, manifest has {(inputs, outputs)})")
    if body["nfe"] != spec.nfe:
        raise ManifestError(f"{path}: nfe {body['nfe']} does not match {spec.steps} {spec.solver} steps ({spec.nfe})")
    _check_grid(body["grid"], spec, path)
    if body[DIGEST] != digest(body):
        raise ManifestError(f"{path} was edited after the build (its content does not match its {DIGEST}); "
                            "rebuild the engine with python -m fastfm.export")
    if not engine_file.is_file():
        raise ManifestError(f"engine file {engine_file} named by {path} is missing or not a regular file")
    if verify and sha256(engine_file) != engine_sha:
        raise ManifestError(f"engine file {engine_file} does not match the sha256 in {path} (corrupt or replaced)")
    return Manifest(spec, spec.nfe, device, inputs, outputs, engine_file, ckpt_sha, meta, body["parity"],
                    body.get("hardware"), body.get("selection"))
