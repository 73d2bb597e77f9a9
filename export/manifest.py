"""manifest.json: what an engine directory holds, written beside the engine and checked on load.

    schema, fastfm_version, created
    spec        task, solver, steps, batch, backend, dtype, divergence, probes, guidance, ...
    nfe, device, grid            field evaluations per call, engine device, the baked time grid
    inputs, outputs              name, static shape, dtype of each, in graph order
    engine                       file name and sha256
    checkpoint                   source, sha256 of the weights file, the run's model.json
    parity                       max-abs and cosine per output against eager, tolerances
    versions                     torch and the backend's packages

Reading rejects corrupt JSON, an unknown schema or backend, missing keys, an engine file whose
sha256 differs, and inputs/outputs that do not follow from the spec and the model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from fastfm.checkpoint import load_json, save_json
from fastfm.solvers import TABLEAUS

from .spec import BACKENDS, DTYPES, TASKS, EngineSpec, ExportError, TensorSpec, signature

MANIFEST = "manifest.json"
SCHEMA = 1
REQUIRED = ("schema", "spec", "nfe", "device", "inputs", "outputs", "engine", "checkpoint", "parity", "versions")


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
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    engine_file: Path
    checkpoint_sha256: str
    meta: dict[str, Any]
    parity: dict[str, Any]


def write(directory: Path, body: dict[str, Any]) -> None:
    save_json({"schema": SCHEMA, **body}, directory / MANIFEST)


def _spec(d: Any) -> EngineSpec:
    names = {f.name for f in fields(EngineSpec)}
    if not isinstance(d, dict) or set(d) != names:
        raise ManifestError(f"manifest spec must have exactly the keys {sorted(names)}")
    if d["backend"] not in BACKENDS:
        raise ManifestError(f"manifest names unknown backend {d['backend']!r}; known: {BACKENDS}")
    for field, allowed in (("task", TASKS), ("solver", tuple(TABLEAUS)), ("dtype", tuple(DTYPES))):
        if d[field] not in allowed:
            raise ManifestError(f"manifest names unknown {field} {d[field]!r}; known: {allowed}")
    if not all(isinstance(d[k], int) and d[k] >= 0 for k in ("steps", "batch", "probes")):
        raise ManifestError("manifest steps, batch and probes must be non-negative integers")
    return EngineSpec(**d)


def read(directory: str | Path, verify: bool = True) -> Manifest:
    """Parse and validate DIRECTORY/manifest.json (and the engine file's sha256 when ``verify``)."""
    directory = Path(directory)
    path = directory / MANIFEST
    body = load_json(path, ManifestError, f"{directory} is not an engine directory: no {MANIFEST}")
    if not isinstance(body, dict):
        raise ManifestError(f"{path} must hold a JSON object")
    missing = [k for k in REQUIRED if k not in body]
    if missing:
        raise ManifestError(f"{path} lacks {missing}")
    if body["schema"] != SCHEMA:
        raise ManifestError(f"{path} has schema {body['schema']!r}; this fastfm reads schema {SCHEMA}")
    try:
        spec = _spec(body["spec"])
        meta = body["checkpoint"]["meta"]
        inputs = [TensorSpec.from_json(d) for d in body["inputs"]]
        outputs = [TensorSpec.from_json(d) for d in body["outputs"]]
        expected = signature(spec, meta)
        engine_file = directory / body["engine"]["file"]
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
    if not engine_file.is_file():
        raise ManifestError(f"engine file {engine_file} named by {path} is missing")
    if verify and sha256(engine_file) != engine_sha:
        raise ManifestError(f"engine file {engine_file} does not match the sha256 in {path} (corrupt or replaced)")
    return Manifest(spec, spec.nfe, device, inputs, outputs, engine_file, ckpt_sha, meta, body["parity"])
