"""The papers' experiments at small scale: ``python -m fastfm.experiments NAME [--scale tiny|cpu|gpu]``.

Each experiment trains, evaluates and writes ``runs/experiments/NAME/report.md`` with PNG figures and
``results.json`` (every number of the report). ``EXPERIMENTS`` names them; ``run_experiment`` runs one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from fastfm.experiments import backbones, conditional, fewstep, interpolants, paths
from fastfm.experiments.common import SCALES, Context
from fastfm.experiments.report import Report
from fastfm.registry import Registry

EXPERIMENTS: Registry[Callable[[Context], Report]] = Registry("experiment")
EXPERIMENTS.register("paths", paths.DESCRIPTION, paths.run)
EXPERIMENTS.register("interpolants", interpolants.DESCRIPTION, interpolants.run)
EXPERIMENTS.register("conditional", conditional.DESCRIPTION, conditional.run)
EXPERIMENTS.register("fewstep", fewstep.DESCRIPTION, fewstep.run)
EXPERIMENTS.register("backbones", backbones.DESCRIPTION, backbones.run)


def run_experiment(name: str, *, scale: str = "cpu", out: str | Path = "runs/experiments", device: str = "auto",
                   seed: int = 0, progress: bool = True) -> Path:
    """Run experiment ``name`` at ``scale`` into ``out/name``; returns the path of its report.md."""
    entry = EXPERIMENTS.entry(name)
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    ctx = Context(Path(out) / name, scale, device=device, seed=seed, progress=progress)
    started = time.perf_counter()
    report = entry.factory(ctx)
    report.wall_s = time.perf_counter() - started
    return report.write(ctx.out)
