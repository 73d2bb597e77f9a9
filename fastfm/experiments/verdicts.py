"""When a measured difference settles a claim: the verdict rules of the experiments' reports.

A claim holds (True), does not hold (False) or is not settled (None). Every rule weighs a difference against the
noise of its measure, estimated on the compared models' own outputs (not only on the data): bootstrap resamples
of their samples (sample quality, bend, diversity), the binomial error of an accuracy, the standard error of
paired per-point differences (NLL, PSNR), the spread of an adaptive solve's NFE over batches. A difference within
SETTLED noise units is not settled, and so is a claim the setup cannot test (the NFE of a fixed-step solver is
set by its steps, not by the field).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from fastfm import seeding
from fastfm.solve.solvers import FIXED_SOLVERS

SETTLED = 2.0
"""A difference is settled when it exceeds this many noise units (standard errors or bootstrap spreads)."""
BOOTSTRAP = 16
"""Resamples behind a bootstrap spread."""
STEP_NFE = {"dopri5": 6}
"""Field evaluations per step of an adaptive solver: torchdiffeq's dopri5 has 7 stages and reuses the last one
as the next step's first (FSAL), so NFE = 2 + 6 x steps (the first evaluation and the initial step size's)."""


@dataclass(frozen=True)
class Verdict:
    """``holds`` (None: not settled) and, when not settled, why."""

    holds: bool | None
    why: str = ""


def bootstrap_std(measure: Callable[[Tensor], float], rows: Tensor, seed: int, draws: int = BOOTSTRAP) -> float:
    """Standard deviation of measure(rows[i]) over ``draws`` resamples i of the rows with replacement, drawn from
    the stream ``seeding.BOOTSTRAP`` of ``seed`` (the same resamples for every measure of n rows)."""
    gen = seeding.generator(seed, seeding.BOOTSTRAP)
    n = rows.shape[0]
    values = torch.tensor([measure(rows[torch.randint(0, n, (n,), generator=gen)]) for _ in range(draws)],
                          dtype=torch.float64)
    return float(values.std())


def noise(*spreads: float) -> float:
    """The noise of a difference of independent measures: sqrt(sum spread^2)."""
    return math.sqrt(sum(s * s for s in spreads))


def lower(a: float | None, b: float | None, spread: float) -> Verdict:
    """'a is lower than b': settled when |a - b| > SETTLED x spread (the noise of the difference)."""
    if a is None or b is None:
        return Verdict(None, "a measurement failed")
    if abs(a - b) <= SETTLED * spread:
        return Verdict(None, f"within {SETTLED:g} x the noise")
    return Verdict(a < b)


def no_worse(a: float | None, b: float | None, spread: float) -> Verdict:
    """'a is no worse (no higher) than b': holds unless a exceeds b by more than SETTLED x spread."""
    if a is None or b is None:
        return Verdict(None, "a measurement failed")
    return Verdict(a <= b + SETTLED * spread)


def converged_no_worse(series: Sequence[tuple[float, float]], ref: float | None, ref_spread: float) -> Verdict:
    """'the last of a sequence of measures (value, spread) at growing cost is no worse than ref': holds as
    ``no_worse``; where it is worse but still falling (the last two differ by more than the noise: more steps
    would change it) it is not settled; else it does not hold."""
    (prev, s_prev), (last, s_last) = series[-2], series[-1]
    verdict = no_worse(last, ref, noise(s_last, ref_spread))
    if verdict.holds is False and lower(last, prev, noise(s_last, s_prev)).holds:
        return Verdict(None, "still improving with steps")
    return verdict


def close(d: float | None, se: float, tol: float) -> Verdict:
    """'|a - b| <= tol' from the difference d and its standard error: holds when d +- SETTLED se lies within
    +-tol, does not hold when it lies outside, else not settled."""
    if d is None:
        return Verdict(None, "a measurement failed")
    if abs(d) + SETTLED * se <= tol:
        return Verdict(True)
    if abs(d) - SETTLED * se > tol:
        return Verdict(False)
    return Verdict(None, f"within {SETTLED:g} standard errors of the tolerance")


def fewer_nfe(a: Sequence[int] | None, b: Sequence[int] | None, solver: str) -> Verdict:
    """'a samples with fewer NFE than b' from the NFE of each batch's solve: not testable with a fixed-step
    solver; settled when the means differ by more than one adaptive step's NFE and SETTLED standard errors."""
    if solver in FIXED_SOLVERS:
        return Verdict(None, f"{solver} is a fixed-step solver: its NFE is set by the steps, not by the field")
    if not a or not b:
        return Verdict(None, "a solve failed")
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    se = noise(*(float(t.std() / math.sqrt(len(t))) if len(t) > 1 else 0.0 for t in (ta, tb)))
    step = STEP_NFE.get(solver, 0)
    if abs(float(ta.mean() - tb.mean())) <= max(step, SETTLED * se):
        return Verdict(None, f"within one {solver} step ({step} NFE) or {SETTLED:g} standard errors")
    return Verdict(bool(ta.mean() < tb.mean()))
