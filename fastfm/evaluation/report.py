"""The one evaluation of a run, for the trainer and ``python -m fastfm.evaluate`` alike.

    samples   n draws of the sampler (the held-out conditioning: test labels, low-res test images), for vector
              data their quality against the held-out set (energy distance, sliced W2;
              ``fastfm.evaluation.metrics``) and, where the sampler reports trajectories, the transport of that
              solve (kinetic energy, straightness, exact W2^2 prior -> held-out data on at most
              ``W2_EVAL_POINTS`` points; ``fastfm.solve.transport``)
    test      the test NLL of the held-out points (nats; bits/dim for discrete data), with NFE and what ran

Each part runs where the sampler can do it (``Sampler.capabilities``). A ``Budget`` (the trainer's evaluations
no one asked for) may cut the points to what a time budget pays for; without one every point asked for runs.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from fastfm.data import Dataset
from fastfm.evaluation.metrics import sample_quality
from fastfm.solve.ode import SampleResult
from fastfm.path.affine import AffinePath
from fastfm.run.meta import Cond, RunMeta, rows
from fastfm.solve.sampler import Sampler, nll_report
from fastfm.solve.transport import transport_report

W2_EVAL_POINTS = 5000
"""Exact OT (prior -> held-out data) on at most this many points per side: 8.9 s for 5,000 x 5,000 2D points on
the 2-core cpu-avx2 machine (POT's network simplex, measured 2026-12-07)."""


class Budget(Protocol):
    """Cuts an evaluation to a time budget: how many of n points to run, and the sampler that runs them."""

    def samples(self, sampler: Sampler, n: int, cond: Cond) -> tuple[int, Sampler]: ...

    def nll(self, sampler: Sampler, x: Tensor, cond: Cond) -> tuple[int, Sampler]: ...


def held_out(meta: RunMeta, data: Dataset, n: int) -> tuple[Tensor, Cond]:
    """The first n held-out points and their conditioning (labels, low-res images)."""
    x = data.test[:n]
    return x, meta.conditioning(x, None if data.test_labels is None else data.test_labels[:n])


def sample_report(res: SampleResult, data: Dataset, path: AffinePath, seed: int) -> dict[str, Any]:
    """Quality (vector data) and transport (where the solve reported trajectories) of n samples ``res``."""
    out: dict[str, Any] = {}
    vector = data.kind == "vector"
    if vector:
        out["quality"] = sample_quality(res.x, data.test[:len(res.x)], seed)
    if res.kinetic is not None:
        out["transport"] = transport_report(res, path, data.test if vector else None, seed=seed,
                                            w2_points=min(len(res.x), W2_EVAL_POINTS))
    return out


def evaluate(sampler: Sampler, data: Dataset, *, n_samples: int | None, n_nll: int | None,
             seed: int = 0, budget: Budget | None = None) -> tuple[dict[str, Any], SampleResult | None]:
    """Samples (``n_samples``; None: none) and the test NLL (``n_nll`` held-out points; None: none) of ``sampler``,
    each capped by the held-out set and, with a ``budget``, by its time. Returns the report ({"quality",
    "transport", "test"} where they ran) and the samples (None where none were drawn)."""
    report: dict[str, Any] = {}
    res = None
    meta, tasks = sampler.meta, sampler.capabilities
    if n_samples is not None and "sample" in tasks:
        n = min(n_samples, len(data.test))
        _, cond = held_out(meta, data, n)
        drawer = sampler
        if budget is not None:
            n, drawer = budget.samples(sampler, n, cond)
        res = drawer.sample(n, seed=seed, cond=rows(cond, 0, n), transport="transport" in tasks)
        report.update(sample_report(res, data, sampler.path, seed))
    if n_nll is not None and "likelihood" in tasks:
        x, cond = held_out(meta, data, min(n_nll, len(data.test)))
        scorer = sampler
        if budget is not None:
            n, scorer = budget.nll(sampler, x, cond)
            x, cond = x[:n], rows(cond, 0, n)
        report["test"] = {**nll_report(scorer, x, levels=data.levels, seed=seed, cond=cond), "n_asked": n_nll}
    return report, res
