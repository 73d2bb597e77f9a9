"""Arguments and set-up shared by ``python -m fastfm.sample`` and ``python -m fastfm.evaluate``: the options
become ``InferenceSettings`` and open one ``Sampler``, eager or an exported engine (the only place that
tells them apart)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fastfm import helpformat
from fastfm.data import Dataset, get_dataset
from fastfm.data.arrays import read_arrays
from fastfm.divergence import DIVERGENCES
from fastfm.inference import DEFAULTS, SETTINGS, EagerSampler, Sampler, settings_with
from fastfm.runs import load_run, resolve_device
from fastfm.solvers import SOLVERS


def inference_parser(command: str, description: str) -> argparse.ArgumentParser:
    """The options ``sample`` and ``evaluate`` share, in groups; each command adds its own group. Options an
    engine fixes default to None ("not given": ``fastfm.inference.DEFAULTS``, or the engine's values)."""
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
    solver.add_argument("--solver", default=None, choices=SOLVERS, help=f"ODE solver (default: {DEFAULTS.solver})")
    solver.add_argument("--steps", type=int, default=None, help=f"fixed-step solver steps (default: {DEFAULTS.steps})")
    solver.add_argument("--grid", default=None,
                        help="user time grid t_0,...,t_n in [0, 1] (comma-separated; overrides --steps)")
    lik = p.add_argument_group("likelihood")
    lik.add_argument("--divergence", default=None, choices=DIVERGENCES,
                     help="likelihood divergence: exact (D JVPs), hutchinson, or auto: exact up to 16 dims "
                          "(default: auto)")
    lik.add_argument("--probes", type=int, default=None, help=f"Hutchinson probes (default: {DEFAULTS.probes})")
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0, help="seed of the prior draws and probes")
    run.add_argument("--batch-size", type=int, default=None,
                     help=f"points per solver batch (default: {DEFAULTS.batch_size})")
    return p


DEFAULT_DIFFUSION = "1"


def add_sde_options(group: argparse._ArgumentGroup, sde_help: str) -> None:
    """--sde (what it does for this command) and its --diffusion, shared by sample and export."""
    group.add_argument("--sde", action="store_true", help=sde_help)
    group.add_argument("--diffusion", default=None,
                       help=f"eps(t) of --sde: a constant C, or sin2:C for C sin^2(pi t) (vanishing at both ends) "
                            f"(default: {DEFAULT_DIFFUSION})")


def diffusion_of(args: argparse.Namespace) -> str | None:
    """The SDE's eps(t) of the arguments (None: the ODE); --diffusion without --sde would be ignored: an error."""
    if args.diffusion is not None and not args.sde:
        raise ValueError(f"--diffusion {args.diffusion} applies to SDE sampling: add --sde (without it the ODE runs)")
    return (args.diffusion or DEFAULT_DIFFUSION) if args.sde else None


def open_sampler(args: argparse.Namespace, task: str | None = None) -> Sampler:
    """The sampler the arguments ask for: an exported engine (``--engine``, of ``task`` if given; the export
    layer is imported here, lazily) or the eager model of ``--checkpoint``; errors before any output is
    written."""
    given: dict[str, Any] = {k: getattr(args, k, None) for k in SETTINGS}
    given["diffusion"] = diffusion_of(args) if hasattr(args, "sde") else None
    if args.engine:
        from fastfm.export.sampler import EngineSampler

        return EngineSampler.open(args.engine, given, task=task, checkpoint=args.checkpoint)
    if args.checkpoint is None:
        raise ValueError("--checkpoint is required (or --engine DIR)")
    settings = settings_with(given)  # checks the options before the run is loaded
    return EagerSampler.from_run(load_run(args.checkpoint, resolve_device(args.device)), settings)


def run_dataset(meta: dict[str, Any]) -> Dataset:
    """The data set a run was trained on (same seed, so the same test split), from its model.json."""
    data = meta["data"]
    return get_dataset(data["name"], seed=meta.get("seed", 0), **data.get("args", {}))


def read_low_res(path: str, meta: dict[str, Any]) -> torch.Tensor:
    """A --low-res .npy file as float32, read without unpickling (errors name the file, as data files' do),
    for a super-resolution run of ``meta``: (N, C, H / f, W / f) for data (C, H, W) and factor f, finite."""
    factor = meta.get("superres", 0)
    if not factor:
        raise ValueError(f"--low-res {path} given, but the model was not trained for super-resolution")
    arrays = read_arrays(Path(path))
    if list(arrays) != ["x"]:
        raise ValueError(f"--low-res {path}: expected one array in a .npy file, got {sorted(arrays)}")
    try:
        low = torch.from_numpy(arrays["x"].astype(np.float32))
    except (TypeError, ValueError) as e:
        raise ValueError(f"--low-res {path}: not a numeric array ({e})") from None
    c, h, w = meta["data"]["shape"]
    want = (c, h // factor, w // factor)
    if low.dim() != 4 or tuple(low.shape[1:]) != want or low.shape[0] == 0:
        raise ValueError(f"--low-res {path}: expected shape (N, {', '.join(map(str, want))}) with N >= 1 (the "
                         f"{h}x{w} images pooled by {factor}), got {tuple(low.shape)}")
    if not bool(torch.isfinite(low).all()):
        raise ValueError(f"--low-res {path} holds NaN/Inf values")
    return low


def low_res_of(meta: dict[str, Any], images: torch.Tensor) -> dict[str, Any]:
    """Super-resolution conditioning (x downsampled by the run's factor), or nothing."""
    factor = meta.get("superres", 0)
    return {"low_res": F.avg_pool2d(images, factor)} if factor else {}
