"""Evaluation sized to a time budget: the seconds one test point or sample costs, measured before the
evaluation runs, how many points a budget pays for (the trainer's unrequested evaluations), and the
re-planning as it runs: the points go in chunks, each timed, and after each the points left are cut to
what the rest of the budget pays for at the speed just measured, so a machine that slows down after the
first measurement overruns the budget by at most one chunk (or the floor of points), not by a multiple."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

from fastfm import seeding
from fastfm.solve.likelihood import LikelihoodResult
from fastfm.solve.ode import SampleResult
from fastfm.run.meta import Cond, rows
from fastfm.solve.sampler import EagerSampler, with_labels

TIMED_POINTS = 32  # the first timed batch
TIMED_MIN_S = 0.1  # a timed call this long amortises per-call overhead
REPLAN_CHUNKS = 8  # a budgeted evaluation runs in about this many chunks, re-planned after each

T = TypeVar("T")


def clock() -> float:
    """Seconds on the evaluation's clock: ``time.perf_counter`` (tests substitute a fake one)."""
    return time.perf_counter()


def points_within(budget_s: float | None, seconds_per_point: float, n_min: int, n_max: int) -> int:
    """How many points a time budget pays for: clamp(budget / seconds per point, n_min, n_max); all
    n_max without a budget."""
    if budget_s is None:
        return n_max
    return int(min(n_max, max(n_min, budget_s // max(seconds_per_point, 1e-9))))


def points_left(budget_s: float, elapsed_s: float, done: int, seconds_per_point: float, n_min: int,
                n_max: int) -> int:
    """Points still to evaluate when ``done`` are done after ``elapsed_s`` of the budget, at the measured
    seconds per point: the total clamp(done + (budget - elapsed) // seconds per point, max(n_min, done), n_max)
    less done, i.e. ``points_within`` of the budget left between max(n_min - done, 0) and n_max - done."""
    return points_within(budget_s - elapsed_s, seconds_per_point, max(n_min - done, 0), n_max - done)


def chunk_points(n: int, n_min: int, batch_size: int) -> int:
    """Points per chunk of a budgeted evaluation of n points: ceil(n / REPLAN_CHUNKS), at least the floor n_min
    (evaluated in any case), at most a batch (a chunk is one batch of the solve)."""
    return min(batch_size, max(n_min, -(-n // REPLAN_CHUNKS)))


def _with(sampler: EagerSampler, **settings: Any) -> EagerSampler:
    """A plain ``EagerSampler`` of ``sampler``'s model with some inference settings changed."""
    return EagerSampler(sampler.model, sampler.path, sampler.meta, replace(sampler.settings, **settings))


def _timed(fn: Callable[[int], Any], k: int) -> float:
    """Seconds of one call ``fn(k)``."""
    start = clock()
    fn(k)
    return clock() - start


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
    plan = sampler.plan()
    if not plan.fixed or plan.grid is not None:
        raise ValueError(f"a timed {what} needs a fixed-step solver without a grid, got {plan.solver!r}")
    return _with(sampler, steps=1)


def nll_seconds_per_point(sampler: EagerSampler, x: Tensor, cond: Cond | None = None) -> float:
    """Seconds one test point costs in ``sampler.log_likelihood``: one solver step (with its divergence) timed
    on the first points of x (``_seconds_per_point``, at most a batch), times the steps."""
    step = _one_step(sampler, "NLL")

    def run(m: int) -> None:
        step.log_likelihood(x[:m], cond=rows(cond or {}, 0, m), progress=False)

    return _seconds_per_point(run, min(len(x), sampler.settings.batch_size)) * sampler.plan("likelihood").steps


def sample_seconds_per_point(sampler: EagerSampler, n: int, cond: Cond | None = None) -> float:
    """Seconds one of ``n`` samples costs in ``sampler.sample``: one solver step timed on up to n samples (as
    many as ``cond`` has rows; ``_seconds_per_point``), times the steps."""
    step = _one_step(sampler, "sampler")
    k_max = min(n, *(len(v) for v in cond.values())) if cond else n

    def run(m: int) -> None:
        with torch.no_grad():
            step.sample(m, cond=rows(cond or {}, 0, m), progress=False)

    return _seconds_per_point(run, k_max) * sampler.plan().steps


def _joined(parts: list[Any], name: str) -> Tensor | None:
    """The chunks' ``name`` tensors end to end (None where they have none)."""
    tensors = [getattr(p, name) for p in parts]
    return None if tensors[0] is None else torch.cat(tensors)


class BudgetedSampler(EagerSampler):
    """``sampler`` whose solves keep within ``budget_s`` seconds from ``started`` (on ``clock``) as they run.

    The n points asked for (planned from a probe: ``points_within``) run in chunks of ``chunk_points``, one
    batch each; after each chunk the total is re-planned, done + ``points_left`` at the seconds per point that
    chunk took (at least n_min, at most n); ``sample`` / ``log_likelihood`` return the first points done. One
    generator runs through the chunks, so they give what one call with the chunk as batch size gives.
    ``replans`` records each re-plan: points done, elapsed seconds, measured seconds per point, new total."""

    def __init__(self, sampler: EagerSampler, budget_s: float, started: float, n_min: int) -> None:
        super().__init__(sampler.model, sampler.path, sampler.meta, sampler.settings)
        self.budget_s, self.started, self.n_min = budget_s, started, n_min
        self.replans: list[dict[str, float]] = []

    def _in_chunks(self, n: int, run: Callable[[EagerSampler, int, int], T]) -> list[T]:
        """``run(batched, i, m)`` on points i..i+m of the n planned, a chunk at a time (``batched``: this
        sampler with the chunk as batch size), re-planned after each chunk until the total is done."""
        chunk = chunk_points(n, self.n_min, self.settings.batch_size)
        batched = _with(self, batch_size=chunk)
        parts: list[T] = []
        done, total = 0, n
        while done < total:
            m = min(chunk, total - done)
            start = clock()
            parts.append(run(batched, done, m))
            done, now = done + m, clock()
            per, elapsed = (now - start) / m, now - self.started
            total = done + points_left(self.budget_s, elapsed, done, per, self.n_min, n)
            self.replans.append({"done": done, "elapsed_s": elapsed, "seconds_per_point": per, "points": total})
        return parts

    def sample(self, n: int, *, seed: int = 0, cond: Cond | None = None, log_likelihood: bool = False,
               transport: bool = False, progress: bool = True,
               generator: torch.Generator | None = None) -> SampleResult:
        """The first of n samples the budget pays for (``EagerSampler.sample`` chunk by chunk)."""
        cond = with_labels(self.meta, self.plan("sample", log_likelihood=log_likelihood, transport=transport), n, cond)
        gen = seeding.generator(seed, seeding.SAMPLE) if generator is None else generator
        parts = self._in_chunks(n, lambda batched, i, m: batched.sample(
            m, cond=rows(cond, i, m), log_likelihood=log_likelihood, transport=transport, progress=progress,
            generator=gen))
        return SampleResult(_joined(parts, "x"), parts[-1].nfe, _joined(parts, "log_prob"),
                            kinetic=_joined(parts, "kinetic"), straightness=_joined(parts, "straightness"))

    def log_likelihood(self, x: Tensor, *, seed: int = 0, cond: Cond | None = None, progress: bool = True,
                       generator: torch.Generator | None = None) -> LikelihoodResult:
        """log p_1 of the first points of x the budget pays for (``EagerSampler.log_likelihood`` chunk by
        chunk)."""
        cond = with_labels(self.meta, self.plan("likelihood"), x.shape[0], cond)
        gen = seeding.generator(seed, seeding.SAMPLE) if generator is None else generator
        parts = self._in_chunks(x.shape[0], lambda batched, i, m: batched.log_likelihood(
            x[i:i + m], cond=rows(cond, i, m), progress=progress, generator=gen))
        return LikelihoodResult(_joined(parts, "log_prob"), parts[-1].nfe, _joined(parts, "x0"))


class EvalBudget:
    """A time budget of ``budget_s`` seconds from ``started`` for an evaluation (``fastfm.evaluation.report``): up
    to half of it for the samples, the rest for the NLL, each planned from its point's cost measured on a few
    points first (at least ``n_min``) and re-planned as it runs (``BudgetedSampler``). ``record`` holds the
    plan: seconds per point, the points planned, the re-plans."""

    def __init__(self, budget_s: float, started: float, n_min: int) -> None:
        self.budget_s, self.started, self.n_min = budget_s, started, n_min
        self.record: dict[str, Any] = {}

    def samples(self, sampler: EagerSampler, n: int, cond: Cond) -> tuple[int, EagerSampler]:
        per, n_min = sample_seconds_per_point(sampler, n, cond), min(n, self.n_min)
        n = points_within(self.budget_s / 2 - (clock() - self.started), per, n_min, n)
        drawer = BudgetedSampler(sampler, self.budget_s / 2, self.started, n_min)
        self.record.update(sample_seconds_per_point=per, samples_planned=n, sample_replans=drawer.replans)
        return n, drawer

    def nll(self, sampler: EagerSampler, x: Tensor, cond: Cond) -> tuple[int, EagerSampler]:
        per, n_min = nll_seconds_per_point(sampler, x, cond), min(len(x), self.n_min)
        n = points_within(self.budget_s - (clock() - self.started), per, n_min, len(x))
        scorer = BudgetedSampler(sampler, self.budget_s, self.started, n_min)
        self.record.update(nll_seconds_per_point=per, nll_points_planned=n, nll_replans=scorer.replans)
        return n, scorer
