"""``InferenceSettings``: how a user asks a trained field to be integrated, with ONE set of defaults (``DEFAULTS``)
that eager runs and exported engines share. A ``SolvePlan`` (``fastfm.solve.plan``) is these settings resolved
against a run."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from fastfm.solve.divergence import DIVERGENCES
from fastfm.solve.sde import parse_diffusion
from fastfm.solve.solvers import DEFAULT_SOLVER, DEFAULT_STEPS, FLOW_MAP, FLOW_MAP_STEPS, SOLVERS, check_grid

SAMPLE_COUNTS = {"vector": 2000, "image": 64}
"""Samples a command draws when no count is given, by data kind."""


@dataclass(frozen=True)
class InferenceSettings:
    """How a trained field is integrated. ``solver`` None: the task's default (DEFAULT_SOLVER; euler,
    i.e. Euler-Maruyama, for the SDE; flowmap for a model of two times); ``steps`` None: the solver's default
    (DEFAULT_STEPS; FLOW_MAP_STEPS for a flow map); ``grid`` (times t_0..t_n in [0, 1]) overrides ``steps``;
    ``divergence``/``probes`` are the likelihood's (``fastfm.solve.divergence``); ``diffusion`` (eps(t), as
    ``fastfm.solve.sde.parse_diffusion`` reads it) switches sampling to the SDE; ``class_label`` fixes the labels
    of unlabelled samples (default: cycle through the classes)."""

    solver: str | None = None
    steps: int | None = None
    grid: tuple[float, ...] | None = None
    divergence: str = "auto"
    probes: int = 1
    batch_size: int = 1000
    guidance: float = 1.0
    class_label: int | None = None
    diffusion: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "probes", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.solver is not None:
            SOLVERS.check(self.solver)
        DIVERGENCES.entry(self.divergence)
        if self.grid is not None:
            try:
                object.__setattr__(self, "grid", tuple(check_grid(list(self.grid)).tolist()))
            except ValueError as e:
                raise ValueError(f"--grid: {e}") from None
        if self.diffusion is not None:
            object.__setattr__(self, "diffusion", str(parse_diffusion(self.diffusion)))


DEFAULTS = InferenceSettings()
SETTINGS = tuple(f.name for f in fields(InferenceSettings))
DEFAULT_SOLVER_HELP = f"{DEFAULT_SOLVER}; euler with --sde; {FLOW_MAP} for a flow-map model"
DEFAULT_STEPS_HELP = f"{DEFAULT_STEPS}; {FLOW_MAP_STEPS} for a flow-map model"


def settings_with(given: dict[str, Any], base: InferenceSettings = DEFAULTS) -> InferenceSettings:
    """``base`` with the options a user gave (None: not given); a grid may be text 't0,...,tn'."""
    given = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown inference settings {unknown}; valid: {SETTINGS}")
    if isinstance(given.get("grid"), str):
        try:
            given["grid"] = tuple(float(v) for v in given["grid"].split(","))
        except ValueError:
            raise ValueError(f"--grid: expected comma-separated times, got {given['grid']!r}") from None
    return replace(base, **given)
