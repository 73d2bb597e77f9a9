"""Arguments and set-up shared by ``python -m fastfm.sample`` and ``python -m fastfm.evaluate``."""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from fastfm.build import LoadedRun, load_run, resolve_device
from fastfm.data import Dataset, get_dataset
from fastfm.solvers import SOLVERS, check_grid


def inference_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--checkpoint", required=True, help="run directory, its ema.safetensors, or a checkpoint.pt")
    p.add_argument("--solver", default="midpoint", choices=SOLVERS, help="ODE solver")
    p.add_argument("--steps", type=int, default=32, help="fixed-step solver steps")
    p.add_argument("--grid", default=None,
                   help="user time grid t_0,...,t_n in [0, 1] (comma-separated; overrides --steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--divergence", default="auto", choices=("auto", "exact", "hutchinson"),
                   help="likelihood divergence: exact (D JVPs), hutchinson, auto (exact up to 16 dims)")
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes")
    return p


def setup(args: argparse.Namespace) -> LoadedRun:
    """Validate shared arguments, then load the run (errors before any output is written)."""
    if args.steps < 1 or args.batch_size < 1 or args.probes < 1:
        raise ValueError("--steps, --batch-size and --probes must be >= 1")
    if args.grid is not None:
        try:
            args.grid = check_grid([float(v) for v in args.grid.split(",")])
        except ValueError as e:
            raise ValueError(f"--grid: {e}") from None
    return load_run(args.checkpoint, resolve_device(args.device))


def run_dataset(run: LoadedRun) -> Dataset:
    """The data set the run was trained on (same seed, so the same test split)."""
    return get_dataset(run.meta["data"]["name"], seed=run.meta.get("seed", 0))


def low_res_of(run: LoadedRun, images: torch.Tensor) -> dict[str, Any]:
    """Super-resolution conditioning (x downsampled by the run's factor), or nothing."""
    factor = run.meta.get("superres", 0)
    return {"low_res": F.avg_pool2d(images, factor)} if factor else {}
