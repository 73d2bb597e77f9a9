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

The engine file carries its own copy of what it computes (``identity``: spec, nfe, grid, device, inputs,
outputs, the weights' sha256 and the run's model.json), stamped in at the build (``backends.STAMP``).

Reading rejects corrupt or too deeply nested JSON, an unknown schema or backend, missing keys, values of the
wrong type, inputs/outputs, nfe or a grid that do not follow from the spec and the model, a manifest edited
after the build (its manifest_sha256 differs), an engine file that is not a plain file in the engine
directory, and one whose sha256 differs; loading (``check_stamp``) rejects an engine file whose stamp differs
from the manifest, naming each field. Manifests of earlier schemas (1: no manifest_sha256; 2: no SDE fields
in the spec; 3: no stamp in the engine file) are refused: rebuild the engine.
"""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastfm.run.checkpoint import load_json, save_json, sha256
from fastfm.run.load import path_of
from fastfm.run.meta import RunMeta
from fastfm.solve.solvers import STEPPED_SOLVERS

from .backends import ENGINE_BACKENDS
from .spec import DTYPES, TASKS, EngineSpec, ExportError, TensorSlot

MANIFEST = "manifest.json"
SCHEMA = 4
DIGEST = "manifest_sha256"
TYPES: dict[str, Any] = {"schema": int, DIGEST: str, "spec": dict, "nfe": int, "grid": list, "device": str,
                         "inputs": list, "outputs": list, "engine": dict, "checkpoint": dict, "parity": dict,
                         "versions": dict}
"""The required keys and the type of each value."""
IDENTITY = ("spec", "nfe", "grid", "device", "inputs", "outputs")
"""The keys of what an engine computes (with the weights' sha256 and the run's model.json: ``identity``)."""
_ABSENT = "(absent)"
_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
               bool: "true or false", type(None): "null"}


class ManifestError(ExportError):
    """A manifest that is missing, corrupt, or does not match its engine or checkpoint."""


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
    meta: RunMeta
    parity: dict[str, Any]
    identity: dict[str, Any]  # what the engine computes, as the manifest states it (``identity``)
    hardware: dict[str, Any] | None = None  # the machine that built it (fastfm.hardware)
    selection: dict[str, Any] | None = None  # how backend and dtype were chosen, with each candidate's time

    @property
    def path(self) -> Path:
        return self.engine_file.parent / MANIFEST


def identity(body: dict[str, Any]) -> dict[str, Any]:
    """What the engine of manifest ``body`` computes: its spec, nfe, grid, device, inputs and outputs, the
    sha256 of the weights and the run's model.json (path, target, data shape)."""
    checkpoint = body["checkpoint"]
    return {**{k: body[k] for k in IDENTITY}, "checkpoint": {"sha256": checkpoint["sha256"],
                                                            "meta": checkpoint["meta"]}}


def _canonical(value: Any) -> str:
    """JSON with sorted keys and no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def stamp(body: dict[str, Any]) -> str:
    """The stamp the build writes into the engine file: ``identity(body)`` as canonical JSON."""
    return _canonical(identity(body))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested objects as one level of dotted keys ('spec.steps'); anything else is a leaf."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_stamp(info: Manifest, carried: str | None) -> None:
    """Refuse an engine file whose stamp is missing or differs from its manifest (one line naming each field
    that differs, with the manifest's value and the engine file's)."""
    try:
        engine = json.loads(carried or "null")
        built = _flat(engine) if isinstance(engine, dict) else None
    except (ValueError, RecursionError):
        built = None
    if built is None:
        raise ManifestError(f"engine file {info.engine_file} carries no fastfm stamp of what it computes (not built "
                            "by this fastfm's python -m fastfm.export); rebuild the engine")
    stated = _flat(info.identity)
    differ = [f"{k}: manifest {stated.get(k, _ABSENT)}, engine file {built.get(k, _ABSENT)}"
              for k in sorted(stated.keys() | built.keys()) if stated.get(k, _ABSENT) != built.get(k, _ABSENT)]
    if differ:
        raise ManifestError(f"{info.path} does not describe its engine file {info.engine_file.name}: "
                            f"{'; '.join(differ)}; rebuild the engine with python -m fastfm.export")


def digest(body: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of ``body`` without its own digest."""
    return hashlib.sha256(_canonical({k: v for k, v in body.items() if k != DIGEST}).encode()).hexdigest()


def write(directory: Path, body: dict[str, Any]) -> None:
    """DIRECTORY/manifest.json: ``body`` with the schema and its digest."""
    body = {"schema": SCHEMA, **body}
    save_json({**body, DIGEST: digest(body)}, directory / MANIFEST)


def _typed(value: Any, kind: Any) -> bool:
    """``value`` (from JSON) is of the annotated type ``kind`` (a bool is no int; an int is a float)."""
    kinds = typing.get_args(kind) or (kind,)
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds) or (float in kinds and isinstance(value, int))


def _names(kind: Any) -> str:
    """The annotated type ``kind`` in JSON words ('an integer or null')."""
    return " or ".join(_JSON_NAMES[k] for k in typing.get_args(kind) or (kind,))


SPEC_TYPES: dict[str, Any] = {
    "task": str, "solver": str, "steps": int, "batch": int, "backend": str, "dtype": str, "log_likelihood": bool,
    "divergence": str, "probes": int, "guidance": float, "class_label": int | None, "diffusion": str | None,
    "denoise": bool}
"""The keys of a stored spec (``EngineSpec.to_json``) and the type of each value."""


def _spec(d: dict[str, Any], meta: RunMeta, path: Path) -> EngineSpec:
    if set(d) != set(SPEC_TYPES):
        raise ManifestError(f"{path}: spec must have exactly the keys {sorted(SPEC_TYPES)}")
    for name, kind in SPEC_TYPES.items():
        if not _typed(d[name], kind):
            raise ManifestError(f"{path}: spec.{name} must be {_names(kind)}, got {d[name]!r}")
    if d["backend"] not in ENGINE_BACKENDS:
        raise ManifestError(f"{path} names unknown backend {d['backend']!r}; known: {ENGINE_BACKENDS.names}")
    for field, allowed in (("task", TASKS), ("solver", STEPPED_SOLVERS), ("dtype", tuple(DTYPES))):
        if d[field] not in allowed:
            raise ManifestError(f"{path} names unknown {field} {d[field]!r}; known: {allowed}")
    if any(d[k] < 0 for k in ("steps", "batch", "probes")):
        raise ManifestError(f"{path}: spec steps, batch and probes must be non-negative")
    try:
        return EngineSpec.from_json(d, meta, path_of(meta))
    except ValueError as e:
        raise ManifestError(f"{path}: {e}") from None


def _slots(entries: list[Any], key: str, path: Path) -> list[TensorSlot]:
    for i, d in enumerate(entries):
        if not isinstance(d, dict) or set(d) != {"name", "shape", "dtype"}:
            raise ManifestError(f"{path}: {key}[{i}] must be an object with name, shape and dtype, got {d!r}")
    return [TensorSlot.from_json(d) for d in entries]


def _engine_file(directory: Path, name: Any, path: Path) -> Path:
    """The engine file: a bare file name (no directory part, not absolute) of an entry of the engine
    directory that is not a symbolic link."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name \
            or (directory / name).is_symlink():
        raise ManifestError(f"{path}: engine file {name!r} is not a plain file inside the engine directory "
                            f"{directory} (a bare file name, no directories or symbolic links)")
    return directory / name


def _check_grid(grid: Any, spec: EngineSpec, path: Path) -> None:
    """The grid must be the plan's uniform fp32 grid."""
    plan = spec.plan
    ok = isinstance(grid, list) and len(grid) == plan.steps + 1 and all(isinstance(t, (int, float)) for t in grid)
    if not ok or not torch.allclose(torch.tensor(grid, dtype=torch.float32), plan.times(), rtol=0, atol=1e-6):
        raise ManifestError(f"{path}: grid {grid} is not the time grid of {plan.steps} {plan.solver} steps")


def read(directory: str | Path, verify: bool = True) -> Manifest:
    """Parse and validate DIRECTORY/manifest.json (and the engine file's sha256 when ``verify``)."""
    directory = Path(directory)
    try:
        return _read(directory, directory / MANIFEST, verify)
    except RecursionError:
        raise ManifestError(f"{directory / MANIFEST} is nested too deeply to be a manifest") from None


def _read(directory: Path, path: Path, verify: bool) -> Manifest:
    body = load_json(path, ManifestError, f"{directory} is not an engine directory: no {MANIFEST}")
    if not isinstance(body, dict):
        raise ManifestError(f"{path} must hold a JSON object")
    if "schema" in body and body["schema"] != SCHEMA:
        raise ManifestError(f"{path} has schema {body['schema']!r}; this fastfm reads schema {SCHEMA} "
                            "(rebuild the engine with python -m fastfm.export)")
    missing = [k for k in TYPES if k not in body]
    if missing:
        raise ManifestError(f"{path} lacks {missing}")
    wrong = [f"{k} must be {_names(kind)}" for k, kind in TYPES.items() if not _typed(body[k], kind)]
    if wrong:
        raise ManifestError(f"malformed {path}: {'; '.join(wrong)}")
    try:
        meta = RunMeta.from_json(body["checkpoint"]["meta"], f"{path} checkpoint.meta")
        spec = _spec(body["spec"], meta, path)
        inputs, outputs = _slots(body["inputs"], "inputs", path), _slots(body["outputs"], "outputs", path)
        expected = spec.signature()
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
        raise ManifestError(f"{path}: nfe {body['nfe']} does not match {spec.plan.steps} {spec.plan.solver} steps "
                            f"({spec.nfe})")
    _check_grid(body["grid"], spec, path)
    if body[DIGEST] != digest(body):
        raise ManifestError(f"{path} was edited after the build (its content does not match its {DIGEST}); "
                            "rebuild the engine with python -m fastfm.export")
    if not engine_file.is_file():
        raise ManifestError(f"engine file {engine_file} named by {path} is missing or not a regular file")
    if verify and sha256(engine_file) != engine_sha:
        raise ManifestError(f"engine file {engine_file} does not match the sha256 in {path} (corrupt or replaced)")
    return Manifest(spec, spec.nfe, device, inputs, outputs, engine_file, ckpt_sha, meta, body["parity"],
                    identity(body), body.get("hardware"), body.get("selection"))
