"""Arguments and set-up shared by ``python -m fastfm.sample`` and ``python -m fastfm.evaluate``."""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from fastfm import helpformat
from fastfm.build import LoadedRun, load_run, resolve_device
from fastfm.data import Dataset, get_dataset
from fastfm.divergence import DIVERGENCES
from fastfm.export import Engine, load
from fastfm.solvers import SOLVERS, check_grid

# Flags an exported engine fixes: None means "not given" (eager defaults below, or the engine's values).
EAGER_DEFAULTS = {"solver": "midpoint", "steps": 32, "divergence": "auto", "probes": 1}


def inference_parser(command: str, description: str) -> argparse.ArgumentParser:
    """The options ``sample`` and ``evaluate`` share, in groups; each command adds its own group."""
    p = helpformat.parser(command, description)
    model = p.add_argument_group("model")
    model.add_argument("--checkpoint", default=None,
                       help="run directory, its ema.safetensors, or a checkpoint.pt (required unless --engine)")
    model.add_argument("--engine", default=None,
                       help="engine directory from python -m fastfm.export, run instead of the eager solver "
                            "(its solver, steps, divergence and guidance are fixed; with --checkpoint, the "
                            "weights are checked against it)")
    model.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    solver = p.add_argument_group("solver")
    solver.add_argument("--solver", default=None, choices=SOLVERS, help="ODE solver (default midpoint)")
    solver.add_argument("--steps", type=int, default=None, help="fixed-step solver steps (default 32)")
    solver.add_argument("--grid", default=None,
                        help="user time grid t_0,...,t_n in [0, 1] (comma-separated; overrides --steps)")
    lik = p.add_argument_group("likelihood")
    lik.add_argument("--divergence", default=None, choices=DIVERGENCES,
                     help="likelihood divergence: exact (D JVPs), hutchinson, auto (default: exact up to 16 dims)")
    lik.add_argument("--probes", type=int, default=None, help="Hutchinson probes (default 1)")
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0, help="seed of the prior draws and probes")
    run.add_argument("--batch-size", type=int, default=1000, help="points per solver batch")
    return p


def _check_counts(args: argparse.Namespace) -> None:
    if any(v is not None and v < 1 for v in (args.steps, args.batch_size, args.probes)):
        raise ValueError("--steps, --batch-size and --probes must be >= 1")


def setup(args: argparse.Namespace) -> LoadedRun:
    """Validate shared arguments, then load the run (errors before any output is written)."""
    _check_counts(args)
    if args.checkpoint is None:
        raise ValueError("--checkpoint is required (or --engine DIR)")
    for flag, default in EAGER_DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    if args.grid is not None:
        try:
            args.grid = check_grid([float(v) for v in args.grid.split(",")])
        except ValueError as e:
            raise ValueError(f"--grid: {e}") from None
    return load_run(args.checkpoint, resolve_device(args.device))


def setup_engine(args: argparse.Namespace, task: str | None) -> Engine:
    """Load --engine (a ``task`` engine, any if None); flags it fixes must be left out or agree with it."""
    _check_counts(args)
    if args.grid is not None:
        raise ValueError("--grid cannot be used with --engine: the engine's time grid is baked in")
    engine = load(args.engine, checkpoint=args.checkpoint)
    spec = engine.spec
    if task is not None and spec.task != task:
        raise ValueError(f"--engine {args.engine} is a {spec.task} engine; this command needs a {task} engine")
    fixed = {"solver": spec.solver, "steps": spec.steps, "probes": spec.probes or None,
             "divergence": None if spec.divergence == "none" else spec.divergence}
    for flag, value in fixed.items():
        given = getattr(args, flag)
        if given is not None and given != value and not (flag == "divergence" and given == "auto"):
            raise ValueError(f"--{flag} {given} conflicts with the engine ({value}); an engine's solver, steps "
                             "and divergence are fixed at export")
        setattr(args, flag, value)
    return engine


def run_dataset(meta: dict[str, Any]) -> Dataset:
    """The data set a run was trained on (same seed, so the same test split), from its model.json."""
    return get_dataset(meta["data"]["name"], seed=meta.get("seed", 0))


def low_res_of(meta: dict[str, Any], images: torch.Tensor) -> dict[str, Any]:
    """Super-resolution conditioning (x downsampled by the run's factor), or nothing."""
    factor = meta.get("superres", 0)
    return {"low_res": F.avg_pool2d(images, factor)} if factor else {}
