"""Build an engine directory: validate, trace, compile, check parity, (auto) time the candidates, write the
manifest, publish.

Everything is written to a temporary directory beside ``out`` and renamed into place only after
the parity check passed, so a failed build leaves nothing at ``out``; the published directory and files
have the modes the umask gives new ones (0755 and 0644 under umask 022). Each finished stage can be
reported as a line ``export: <what was done> (<seconds> s)``; the export tools' own warnings and log
lines are silenced (``quiet``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

import fastfm
from fastfm import hardware
from fastfm.run.checkpoint import inference_file, new_mode
from fastfm.run.load import LoadedRun, load_run, resolve_device

from . import manifest
from .backends import Runner, backend, versions
from .choose import candidates
from .graph import build_program, example_inputs, trace
from .parity import compare, probe_inputs, reference
from .quiet import quiet
from .spec import EngineRequest, EngineSpec, ExportError, TensorSlot, resolve

TIMED_MIN_S = 0.2
"""Each candidate engine is timed over at least this many seconds of calls (and at least 3 calls)."""


class _Stages:
    """Passes ``export: <what> (<seconds since the last stage> s)`` to ``report`` as each stage ends."""

    def __init__(self, report: Callable[[str], None] | None) -> None:
        self.report, self.last = report, time.perf_counter()

    def done(self, what: str) -> None:
        now = time.perf_counter()
        if self.report is not None:
            self.report(f"export: {what} ({now - self.last:.1f} s)")
        self.last = now


@dataclass
class _Built:
    """One candidate engine, built and checked in its own directory."""

    spec: EngineSpec
    directory: Path
    filename: str
    parity: dict[str, Any]
    runner: Runner
    described: dict[str, Any]  # the manifest's account of what it computes (``manifest.identity``)


def _build_one(run: LoadedRun, spec: EngineSpec, base: dict[str, Any], inputs: list[TensorSlot],
               outputs: list[TensorSlot], probe: dict[str, Tensor], ref: list[Tensor], directory: Path,
               dev: torch.device, stages: _Stages) -> _Built:
    """Trace, build (stamped with what it computes: ``base`` with the spec, nfe and grid), load and
    parity-check the engine of a concrete ``spec`` in ``directory``."""
    label = f"{spec.backend} {spec.dtype}"
    program = build_program(run, spec)
    described = {**base, "spec": spec.to_json(), "nfe": spec.nfe, "grid": program.grid.tolist()}
    ep = trace(program, example_inputs(inputs, dev))
    stages.done(f"traced, simplified and exported the {spec.dtype} program ({len(ep.graph.nodes)} graph nodes)")
    lowering = backend(spec.backend)
    directory.mkdir(parents=True, exist_ok=True)
    engine_file = directory / lowering.filename
    stamp = manifest.stamp(described)
    lowering.build(ep, example_inputs(inputs, dev), engine_file, [t.name for t in inputs + outputs], stamp)
    stages.done(f"built the {label} engine {lowering.filename}")
    loaded = lowering.load(engine_file, inputs, outputs, dev)
    if loaded.stamp != stamp:
        raise ExportError(f"the {label} engine file {lowering.filename} did not keep its stamp of what it computes "
                          "(its loader cannot check it against the manifest)")
    parity = compare(loaded.run([probe[i.name].to(dev) for i in inputs]), ref, outputs, spec.dtype)
    if not parity["ok"]:
        raise ExportError(f"parity check failed, engine not written ({label}): {parity['outputs']} "
                          f"(tolerance {parity['tolerance']})")
    stages.done(f"loaded the {label} engine; parity check against eager passed")
    return _Built(spec, directory, lowering.filename, parity, loaded.run, described)


def _umask_modes(directory: Path) -> None:
    """``directory`` and everything in it with the modes the umask gives new directories and files (a temporary
    directory is created 0700, and some writers create their files 0600)."""
    for path in [directory, *directory.rglob("*")]:
        path.chmod(new_mode(path.is_dir()))


def _timed(built: _Built, inputs: list[TensorSlot], probe: dict[str, Tensor], dev: torch.device) -> float:
    """Median seconds of one engine call on the probe batch (``hardware.seconds_per_call``)."""
    xs = [probe[i.name].to(dev) for i in inputs]

    def call() -> None:
        built.runner(xs)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return hardware.seconds_per_call(call, min_s=TIMED_MIN_S)


def _select(built: list[_Built], failed: dict[str, str], inputs: list[TensorSlot], probe: dict[str, Tensor],
            dev: torch.device, stages: _Stages) -> tuple[_Built, dict[str, Any]]:
    """The fastest engine that passed its parity check, and the record of the choice for the manifest."""
    if not built:
        raise ExportError(f"no candidate engine passed: {failed}")
    rule = "requested" if len(built) + len(failed) == 1 else "measured" if len(built) > 1 else "the one that passed"
    record: dict[str, Any] = {"rule": rule}
    best = built[0]
    if len(built) > 1:
        seconds = {f"{b.spec.backend}/{b.spec.dtype}": _timed(b, inputs, probe, dev) for b in built}
        best = built[list(seconds.values()).index(min(seconds.values()))]
        record["seconds_per_call"] = {k: round(v, 7) for k, v in seconds.items()}
        stages.done("timed the candidates: " + ", ".join(f"{k} {1e3 * v:.3g} ms" for k, v in seconds.items()))
    if failed:
        record["failed"] = failed
    record["chosen"] = f"{best.spec.backend}/{best.spec.dtype}"
    return best, record


def export_engine(checkpoint: str | Path, request: EngineRequest, out: str | Path, *, device: str = "auto",
                  seed: int = 0, low_res: Tensor | None = None, force: bool = False,
                  progress: Callable[[str], None] | None = None) -> manifest.Manifest:
    """Build the engine of ``request`` for the run at ``checkpoint`` into ``out``; returns its manifest.

    ``request.backend`` / ``request.dtype`` 'auto' build every candidate this machine offers (export/choose.py), check
    each one's parity, time each on the probe batch and publish the fastest, recording every time in the manifest.
    ``low_res`` optionally gives the low-resolution images of the parity probe batch (super-resolution
    models; default: downsampled prior draws); ``progress`` gets one line per finished stage.
    Raises ExportError (a ValueError) naming what is wrong.
    """
    started = time.perf_counter()
    stages = _Stages(progress)
    out = Path(out)
    dev = resolve_device(device)
    caps = hardware.capabilities(dev)
    options = candidates(request, dev, caps)
    run = load_run(checkpoint, dev)
    specs = [resolve(option, run.meta, run.path, warn=i == 0) for i, option in enumerate(options)]
    spec = specs[0]
    if low_res is not None:
        try:
            run.meta.check_conditioning({"low_res": low_res}, "low-res inputs")
        except ValueError as e:
            raise ExportError(str(e)) from None
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass force=True (--force) to replace it")
    inputs, outputs = spec.signature()
    probe = probe_inputs(run, spec, seed, low_res)
    ref = reference(run, spec, probe)
    weights = inference_file(checkpoint)
    base = {"device": str(dev), "inputs": [i.to_json() for i in inputs], "outputs": [o.to_json() for o in outputs],
            "checkpoint": {"source": str(checkpoint), "file": weights.name, "sha256": manifest.sha256(weights),
                           "meta": run.meta.to_json()}}
    stages.done(f"checked the request and loaded {checkpoint}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        built, failed = [], {}
        for option in specs:
            where = tmp if len(specs) == 1 else tmp / f"{option.backend}-{option.dtype}"
            try:
                with quiet():
                    built.append(_build_one(run, option, base, inputs, outputs, probe, ref, where, dev, stages))
            except ExportError as e:
                if len(specs) == 1:
                    raise
                failed[f"{option.backend}/{option.dtype}"] = str(e).splitlines()[0]
        best, selection = _select(built, failed, inputs, probe, dev, stages)
        if best.directory != tmp:
            os.replace(best.directory / best.filename, tmp / best.filename)
            for b in built:
                shutil.rmtree(b.directory, ignore_errors=True)
        manifest.write(tmp, {
            **best.described, "fastfm_version": fastfm.__version__, "created": datetime.now(timezone.utc).isoformat(),
            "engine": {"file": best.filename, "sha256": manifest.sha256(tmp / best.filename)},
            "parity": best.parity, "versions": versions(best.spec.backend), "hardware": caps.to_json(),
            "selection": selection, "build_seconds": round(time.perf_counter() - started, 1),
        })
        _umask_modes(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = manifest.read(out)
    stages.done(f"wrote {manifest.MANIFEST} and published {out}")
    return info
