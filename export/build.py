"""Build an engine directory: validate, trace, compile, check parity, write manifest, publish.

Everything is written to a temporary directory beside ``out`` and renamed into place only after
the parity check passed, so a failed build leaves nothing at ``out``. Each finished stage can be
reported as a line ``export: <what was done> (<seconds> s)``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from torch import Tensor

import fastfm
from fastfm.runs import load_run, resolve_device
from fastfm.checkpoint import inference_file

from . import manifest
from .backends import backend, check_available, versions
from .graph import build_program, example_inputs, trace
from .parity import compare, probe_inputs, reference
from .spec import EngineSpec, ExportError, signature, validate


class _Stages:
    """Passes ``export: <what> (<seconds since the last stage> s)`` to ``report`` as each stage ends."""

    def __init__(self, report: Callable[[str], None] | None) -> None:
        self.report, self.last = report, time.perf_counter()

    def done(self, what: str) -> None:
        now = time.perf_counter()
        if self.report is not None:
            self.report(f"export: {what} ({now - self.last:.1f} s)")
        self.last = now


def export_engine(checkpoint: str | Path, spec: EngineSpec, out: str | Path, *, device: str = "auto",
                  seed: int = 0, low_res: Tensor | None = None, force: bool = False,
                  progress: Callable[[str], None] | None = None) -> manifest.Manifest:
    """Build the engine of ``spec`` for the run at ``checkpoint`` into ``out``; returns its manifest.

    ``low_res`` optionally gives the low-resolution images of the parity probe batch (super-resolution
    models; default: downsampled prior draws); ``progress`` gets one line per finished stage.
    Raises ExportError (a ValueError) naming what is wrong.
    """
    started = time.perf_counter()
    stages = _Stages(progress)
    out = Path(out)
    dev = resolve_device(device)
    check_available(spec.backend, dev, spec.dtype)
    run = load_run(checkpoint, dev)
    spec = validate(spec, run.meta)
    if low_res is not None and not run.meta.get("superres"):
        raise ExportError("low-res inputs given, but the model was not trained for super-resolution")
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass force=True (--force) to replace it")
    inputs, outputs = signature(spec, run.meta)
    probe = probe_inputs(run, inputs, seed, low_res)
    stages.done(f"checked the request and loaded {checkpoint}")
    program = build_program(run, spec)
    ep = trace(program, example_inputs(inputs, dev))
    stages.done(f"traced, simplified and exported the program ({len(ep.graph.nodes)} graph nodes)")
    lowering = backend(spec.backend)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        engine_file = tmp / lowering.filename
        lowering.build(ep, example_inputs(inputs, dev), engine_file, [t.name for t in inputs + outputs])
        stages.done(f"built the {spec.backend} engine {lowering.filename}")
        runner = lowering.load(engine_file, inputs, outputs, dev)
        got = runner([probe[i.name].to(dev) for i in inputs])
        parity = compare(got, reference(run, spec, probe, outputs), outputs, spec.dtype)
        if not parity["ok"]:
            raise ExportError(f"parity check failed, engine not written: {parity['outputs']} "
                              f"(tolerance {parity['tolerance']})")
        stages.done("loaded the engine; parity check against eager passed")
        weights = inference_file(checkpoint)
        manifest.write(tmp, {
            "fastfm_version": fastfm.__version__, "created": datetime.now(timezone.utc).isoformat(),
            "spec": spec.to_json(), "nfe": spec.nfe, "device": str(dev), "grid": program.grid.tolist(),
            "inputs": [i.to_json() for i in inputs], "outputs": [o.to_json() for o in outputs],
            "engine": {"file": lowering.filename, "sha256": manifest.sha256(engine_file)},
            "checkpoint": {"source": str(checkpoint), "file": weights.name, "sha256": manifest.sha256(weights),
                           "meta": run.meta},
            "parity": parity, "versions": versions(spec.backend),
            "build_seconds": round(time.perf_counter() - started, 1),
        })
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = manifest.read(out)
    stages.done(f"wrote {manifest.MANIFEST} and published {out}")
    return info
