"""Arguments and set-up shared by ``python -m fastfm.sample``, ``evaluate`` and ``export``: the options become
``InferenceSettings`` and open one ``Sampler``, eager or an exported engine (the only place that tells them
apart)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastfm.commands import helpformat
from fastfm.data.arrays import read_arrays
from fastfm.solve.divergence import DIVERGENCES
from fastfm.run.load import load_run, resolve_device
from fastfm.run.meta import RunMeta
from fastfm.solve import DEFAULTS, EagerSampler, Sampler, settings_with
from fastfm.solve.settings import DEFAULT_SOLVER_HELP, DEFAULT_STEPS_HELP, SETTINGS
from fastfm.solve.solvers import SOLVERS


def add_solve_options(p: argparse.ArgumentParser) -> None:
    """The solver and likelihood options of ``InferenceSettings`` (sample, evaluate and export share them). They
    default to None, "not given": ``fastfm.solve.DEFAULTS``, or an engine's values."""
    solver = p.add_argument_group("solver")
    solver.add_argument("--solver", default=None, choices=SOLVERS,
                        help=f"solver: {SOLVERS.help_text()} (default: {DEFAULT_SOLVER_HELP})")
    solver.add_argument("--steps", type=int, default=None, help=f"solver steps (default: {DEFAULT_STEPS_HELP})")
    solver.add_argument("--grid", default=None,
                        help="user time grid t_0,...,t_n in [0, 1] spanning the solve (comma-separated; overrides "
                             "--steps)")
    lik = p.add_argument_group("likelihood")
    lik.add_argument("--divergence", default=None, choices=DIVERGENCES,
                     help=f"likelihood divergence: {DIVERGENCES.help_text()} (default: {DEFAULTS.divergence})")
    lik.add_argument("--probes", type=int, default=None, help=f"Hutchinson probes (default: {DEFAULTS.probes})")


def add_sampling_options(group: argparse._ArgumentGroup, sde_help: str) -> None:
    """--class-label, --guidance, --sde and its --diffusion (sample and export share them)."""
    group.add_argument("--class-label", type=int, default=None,
                       help="class to sample (conditional models; an engine bakes it in; default: cycle through all "
                            "classes)")
    group.add_argument("--guidance", type=float, default=None,
                       help=f"classifier-free guidance scale w, 1: none (default: {DEFAULTS.guidance:g})")
    group.add_argument("--sde", action="store_true", help=sde_help)
    group.add_argument("--diffusion", default=None,
                       help=f"eps(t) of --sde: a constant C, or sin2:C for C sin^2(pi t) (vanishing at both ends) "
                            f"(default: {DEFAULT_DIFFUSION})")


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
    add_solve_options(p)
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0, help="seed of the prior draws and probes")
    run.add_argument("--batch-size", type=int, default=None,
                     help=f"points per solver batch (default: {DEFAULTS.batch_size})")
    return p


DEFAULT_DIFFUSION = "1"


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The inference options the arguments give (None: not given); --diffusion without --sde would be ignored:
    an error."""
    given: dict[str, Any] = {k: getattr(args, k, None) for k in SETTINGS}
    if getattr(args, "diffusion", None) is not None and not args.sde:
        raise ValueError(f"--diffusion {args.diffusion} applies to SDE sampling: add --sde (without it the ODE runs)")
    given["diffusion"] = (args.diffusion or DEFAULT_DIFFUSION) if getattr(args, "sde", False) else None
    return given


def open_sampler(args: argparse.Namespace, task: str | None = None) -> Sampler:
    """The sampler the arguments ask for: an exported engine (``--engine``, of ``task`` if given; the export
    layer is imported here, lazily) or the eager model of ``--checkpoint``; errors before any output is
    written."""
    given = given_settings(args)
    if args.engine:
        from fastfm.export.sampler import EngineSampler

        return EngineSampler.open(args.engine, given, task=task, checkpoint=args.checkpoint)
    if args.checkpoint is None:
        raise ValueError("--checkpoint is required (or --engine DIR)")
    settings = settings_with(given)  # checks the options before the run is loaded
    return EagerSampler.from_run(load_run(args.checkpoint, resolve_device(args.device)), settings)


def read_low_res(path: str, meta: RunMeta) -> torch.Tensor:
    """A --low-res .npy file as float32, read without unpickling (errors name the file, as data files' do), checked
    against the run (``RunMeta.check_conditioning``)."""
    if not meta.superres:
        raise ValueError(f"--low-res {path} given, but the model was not trained for super-resolution")
    arrays = read_arrays(Path(path))
    if list(arrays) != ["x"]:
        raise ValueError(f"--low-res {path}: expected one array in a .npy file, got {sorted(arrays)}")
    try:
        low = torch.from_numpy(arrays["x"].astype(np.float32))
    except (TypeError, ValueError) as e:
        raise ValueError(f"--low-res {path}: not a numeric array ({e})") from None
    meta.check_conditioning({"low_res": low}, f"--low-res {path}")
    return low
