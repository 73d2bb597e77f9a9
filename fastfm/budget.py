"""Evaluation sized to a time budget: the seconds one test point or sample costs, measured before the
evaluation runs, and how many points a budget pays for (the trainer's unrequested evaluations)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import Tensor

from fastfm.inference import Cond, EagerSampler
from fastfm.solvers import TABLEAUS

TIMED_POINTS = 32  # the first timed batch
TIMED_MIN_S = 0.1  # a timed call this long amortises per-call overhead


def points_within(budget_s: float | None, seconds_per_point: float, n_min: int, n_max: int) -> int:
    """How many points a time budget pays for: clamp(budget / seconds per point, n_min, n_max); all
    n_max without a budget."""
    if budget_s is None:
        return n_max
    return int(min(n_max, max(n_min, budget_s // max(seconds_per_point, 1e-9))))


def _timed(fn: Callable[[int], Any], k: int) -> float:
    """Seconds of one call ``fn(k)``."""
    start = time.perf_counter()
    fn(k)
    return time.perf_counter() - start


def _seconds_per_point(fn: Callable[[int], Any], k_max: int) -> float:
    """Seconds per point of ``fn(k)``: after a warm-up call ``fn(1)`` (one-time set-up costs), k = 32, 128,
    512, ... up to ``k_max`` until one call takes TIMED_MIN_S, so a small model's per-call overhead is
    spread as in the real batches while a large model is timed on 32 points."""
    fn(1)
    k = min(TIMED_POINTS, k_max)
    while True:
        seconds = _timed(fn, k)
        if seconds >= TIMED_MIN_S or k >= k_max:
            return seconds / k
        k = min(4 * k, k_max)


def _one_step(sampler: EagerSampler, what: str) -> EagerSampler:
    """The sampler with one solver step (a timed step costs 1/steps of the solve)."""
    s = sampler.settings
    if s.solver not in TABLEAUS or s.grid is not None:
        raise ValueError(f"a timed {what} needs a fixed-step solver without a grid, got {s.solver!r}")
    return EagerSampler(sampler.model, sampler.path, sampler.shape, target=sampler.target,
                        settings=replace(s, steps=1), meta=sampler.meta)


def nll_seconds_per_point(sampler: EagerSampler, x: Tensor, cond: Cond | None = None) -> float:
    """Seconds one test point costs in ``sampler.log_likelihood``: one solver step (with its divergence) timed
    on the first points of x (``_seconds_per_point``, at most a batch), times the steps."""
    step = _one_step(sampler, "NLL")

    def run(m: int) -> None:
        step.log_likelihood(x[:m], cond={k: v[:m] for k, v in (cond or {}).items()}, progress=False)

    return _seconds_per_point(run, min(len(x), sampler.settings.batch_size)) * sampler.settings.steps


def sample_seconds_per_point(sampler: EagerSampler, n: int, cond: Cond | None = None) -> float:
    """Seconds one of ``n`` samples costs in ``sampler.sample``: one solver step timed on up to n samples (as
    many as ``cond`` has rows; ``_seconds_per_point``), times the steps."""
    step = _one_step(sampler, "sampler")
    k_max = min(n, *(len(v) for v in cond.values())) if cond else n

    def run(m: int) -> None:
        with torch.no_grad():
            step.sample(m, cond={k: v[:m] for k, v in (cond or {}).items()}, progress=False)

    return _seconds_per_point(run, k_max) * sampler.settings.steps
