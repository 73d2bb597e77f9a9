"""Evaluation shared by training and ``python -m fastfm.evaluate``: test NLL, samples, quality.

``cond`` maps conditioning keywords (``y`` labels, ``low_res`` images) to per-sample tensors,
sliced along with the batch. Every solve shows its progress per model evaluation, with an ETA;
the per-point costs measured here let training size its unrequested evaluation to a time budget.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from fastfm.data import to_pixels
from fastfm.divergence import make_probes, resolve_divergence
from fastfm.likelihood import bits_per_dim, log_likelihood
from fastfm.metrics import energy_distance, sliced_wasserstein
from fastfm.paths import AffinePath
from fastfm.plotting import grid_png, scatter_png
from fastfm.sampling import SampleResult, draw_prior, sample
from fastfm.score import score_interval
from fastfm.sde import Diffusion, sde_sample
from fastfm.solvers import TABLEAUS, nfe_per_step
from fastfm.transport import transport_summary, w2_squared


def _probes(divergence: str, dim: int, n_probes: int, shape: tuple[int, ...], gen: torch.Generator,
            device: torch.device) -> Tensor | None:
    """None for the exact divergence; Rademacher probes for Hutchinson."""
    if resolve_divergence(divergence, dim) == "exact":
        return None
    return make_probes(n_probes, shape, "rademacher", gen).to(device)


class Progress(nn.Module):
    """``model`` that advances a progress bar on every call (one per model evaluation, JVPs included)."""

    def __init__(self, model: nn.Module, bar: tqdm) -> None:
        super().__init__()
        self.model, self.bar = model, bar
        self.num_classes = getattr(model, "num_classes", None)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        out = self.model(*args, **kwargs)
        self.bar.update(1)
        return out


def _calls(method: str, steps: int, grid: Tensor | None, divergence: str | None, dim: int, n_probes: int) -> int | None:
    """Model calls of one batch's solve (None for adaptive solvers): NFE x (D exact JVPs, k probes or 1)."""
    if method not in TABLEAUS:
        return None
    n_steps = steps if grid is None else grid.numel() - 1
    per_eval = 1 if divergence is None else (dim if divergence == "exact" else n_probes)
    return n_steps * nfe_per_step(method) * per_eval


def _on(grid: Tensor | None, device: torch.device) -> Tensor | None:
    return None if grid is None else grid.to(device)


def _slice(cond: dict[str, Tensor] | None, i: int, m: int, device: torch.device) -> dict[str, Tensor]:
    return {k: v[i:i + m].to(device) for k, v in (cond or {}).items()}


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


TIMED_POINTS = 32  # the first timed batch
TIMED_MIN_S = 0.1  # a timed call this long amortises per-call overhead


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


def nll_seconds_per_point(model: nn.Module, path: AffinePath, x: Tensor, *, target: str = "velocity",
                          method: str = "midpoint", steps: int = 32, divergence: str = "auto", n_probes: int = 1,
                          batch_size: int = 500, cond: dict[str, Tensor] | None = None) -> float:
    """Seconds one test point costs in :func:`test_nll`: one solver step (with its divergence) timed on
    the first points of x (``_seconds_per_point``, at most a batch), times ``steps``."""
    if method not in TABLEAUS:
        raise ValueError(f"a timed NLL needs a fixed-step solver, got {method!r}")
    dim = x[0].numel()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)

    def step(m: int) -> None:
        xb = x[:m].to(device)
        with torch.no_grad():
            log_likelihood(model, path, xb, method=method, steps=1, target=target,
                           probes=_probes(divergence, dim, n_probes, tuple(xb.shape), gen, device),
                           **_slice(cond, 0, m, device))

    return _seconds_per_point(step, min(len(x), batch_size)) * steps


def sample_seconds_per_point(model: nn.Module, path: AffinePath, shape: tuple[int, ...], n: int, *,
                             target: str = "velocity", method: str = "midpoint", steps: int = 32,
                             cond: dict[str, Tensor] | None = None) -> float:
    """Seconds one of ``n`` samples costs in :func:`generate`: one solver step timed on up to n samples (as
    many as ``cond`` has rows; ``_seconds_per_point``), times ``steps``."""
    if method not in TABLEAUS:
        raise ValueError(f"a timed sampler needs a fixed-step solver, got {method!r}")
    k_max = min(n, *(len(v) for v in cond.values())) if cond else n

    def step(m: int) -> None:
        generate(model, path, m, shape, target=target, method=method, steps=1, cond=cond, progress=False)

    return _seconds_per_point(step, k_max) * steps


def test_nll(model: nn.Module, path: AffinePath, x: Tensor, *, target: str = "velocity", levels: int | None = None,
             method: str = "midpoint", steps: int = 32, grid: Tensor | None = None, divergence: str = "auto",
             n_probes: int = 1, batch_size: int = 500, seed: int = 0, cond: dict[str, Tensor] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Mean NLL in nats (and bits/dim for discrete data) of test points x, with field evaluations; a
    progress bar counts model evaluations over all batches (with an ETA)."""
    dim = x[0].numel()
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    kind = resolve_divergence(divergence, dim)
    batches = -(-x.shape[0] // batch_size)
    calls = _calls(method, steps, grid, kind, dim, n_probes)
    logps, nfe = [], 0
    with tqdm(total=None if calls is None else calls * batches, desc=f"test NLL ({x.shape[0]} points, {kind})",
              unit="eval", disable=not progress, leave=False) as bar:
        counted = Progress(model, bar)
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(device)
            probes = _probes(kind, dim, n_probes, tuple(xb.shape), gen, device)
            with torch.no_grad():  # forward-mode JVPs only: no autograd graph to keep
                res = log_likelihood(counted, path, xb, method=method, steps=steps, grid=_on(grid, device),
                                     target=target, probes=probes, **_slice(cond, i, xb.shape[0], device))
            logps.append(res.log_prob.cpu())
            nfe = res.nfe
    label = kind if kind == "exact" else f"hutchinson x{n_probes}"
    return nll_summary(torch.cat(logps), dim, levels, nfe=nfe, solver=method, steps=steps_run(method, steps, grid),
                       divergence=label)


def steps_run(method: str, steps: int, grid: Tensor | None) -> int | str:
    """The steps that ran: the grid's for a user grid, 'adaptive' for adaptive solvers."""
    if method not in TABLEAUS:
        return "adaptive"
    return steps if grid is None else grid.numel() - 1


def nll_summary(logp: Tensor, dim: int, levels: int | None, **info: Any) -> dict[str, Any]:
    """Mean NLL in nats with its standard error (and bits/dim for discrete data) of log-likelihoods."""
    out: dict[str, Any] = {"nll_nats": float(-logp.mean()), "nll_nats_stderr": float(logp.std() / math.sqrt(len(logp))),
                           **info, "n": len(logp)}
    if levels is not None:
        out["bits_per_dim"] = float(bits_per_dim(logp, dim, levels).mean())
    return out


def engine_nll(engine: Any, x: Tensor, *, levels: int | None = None, seed: int = 0,
               cond: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """:func:`test_nll` through an exported likelihood engine (``fastfm.export.load``), with its solver,
    steps and divergence (Hutchinson probes drawn here, Rademacher)."""
    spec = engine.spec
    gen = torch.Generator().manual_seed(seed)
    probes = _probes(spec.divergence, x[0].numel(), spec.probes, tuple(x.shape), gen, torch.device("cpu"))
    res = engine(x, probes=probes, **(cond or {}))
    kind = "exact" if probes is None else f"hutchinson x{spec.probes}"
    return nll_summary(res.log_prob.cpu(), x[0].numel(), levels, nfe=res.nfe, solver=spec.solver, steps=spec.steps,
                       divergence=kind, engine=str(engine.directory), backend=spec.backend)


def engine_generate(engine: Any, n: int, *, seed: int = 0, cond: dict[str, Tensor] | None = None) -> SampleResult:
    """:func:`generate` through an exported sampling engine: n prior draws pushed to t = 1 (and their
    log-likelihood where the engine computes it)."""
    from fastfm.build import path_from_meta

    spec = engine.spec
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(engine.meta["data"]["shape"])
    x0 = draw_prior(path_from_meta(engine.meta), n, shape, gen)
    probes = (_probes(spec.divergence, math.prod(shape), spec.probes, (n, *shape), gen, torch.device("cpu"))
              if spec.divergence != "none" else None)
    noise = torch.randn((spec.steps, n, *shape), generator=gen) if spec.diffusion is not None else None
    res = engine(x0, probes=probes, noise=noise, **(cond or {}))
    return SampleResult(res.x.cpu(), res.nfe, None if res.log_prob is None else res.log_prob.cpu())


def generate(model: nn.Module, path: AffinePath, n: int, shape: tuple[int, ...], *, target: str = "velocity",
             method: str = "midpoint", steps: int = 32, grid: Tensor | None = None, seed: int = 0,
             guidance: float = 1.0,
             cond: dict[str, Tensor] | None = None, log_likelihood: bool = False, divergence: str = "auto",
             n_probes: int = 1, batch_size: int = 4096, progress: bool = True,
             diffusion: Diffusion | None = None, transport: bool = False) -> SampleResult:
    """n samples from the prior pushed to t = 1 in batches; optionally their log-likelihood and (``transport``)
    per-sample kinetic energy and straightness in the same pass, or (``diffusion``: eps(t)) with the SDE
    sampler of ``fastfm.sde`` instead of the ODE. A progress bar counts model evaluations (with an ETA)."""
    if diffusion is not None and (log_likelihood or grid is not None or transport):
        raise ValueError("the SDE sampler takes --steps (Euler-Maruyama); no --grid, no --log-likelihood and no "
                         "transport diagnostics (they are properties of the ODE flow)")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    dim = math.prod(shape)
    kind = resolve_divergence(divergence, dim) if log_likelihood else None
    if diffusion is not None:  # one call per Euler-Maruyama step, and the denoising jump short of t = 1
        calls = steps + (score_interval(path, target)[1] < 1.0)
    else:
        calls = _calls(method, steps, grid, kind, dim, n_probes)
    xs, logps, kinetic, straight, nfe = [], [], [], [], 0
    with tqdm(total=None if calls is None else calls * -(-n // batch_size), desc=f"sampling ({n})", unit="eval",
              leave=False, disable=not progress) as bar:
        counted = Progress(model, bar)
        for i in range(0, n, batch_size):
            m = min(batch_size, n - i)
            x0 = draw_prior(path, m, shape, gen).to(device)
            probes = _probes(kind, dim, n_probes, (m, *shape), gen, device) if log_likelihood else None
            c = _slice(cond, i, m, device)
            y = c.pop("y", None)
            with torch.set_grad_enabled(False):
                if diffusion is not None:
                    res = sde_sample(counted, path, x0, diffusion=diffusion, steps=steps, target=target,
                                     generator=gen, y=y, guidance=guidance, **c)
                else:
                    res = sample(counted, path, x0, method=method, steps=steps, grid=_on(grid, device),
                                 target=target, y=y, guidance=guidance, log_likelihood=log_likelihood,
                                 probes=probes, transport=transport, **c)
            xs.append(res.x.cpu())
            if res.log_prob is not None:
                logps.append(res.log_prob.cpu())
            if transport:
                kinetic.append(res.kinetic.cpu())
                straight.append(res.straightness.cpu())
            nfe = res.nfe
    cat = lambda parts: torch.cat(parts) if parts else None  # noqa: E731
    return SampleResult(torch.cat(xs), nfe, cat(logps), kinetic=cat(kinetic), straightness=cat(straight))


def transport_report(res: SampleResult, path: AffinePath, reference: Tensor | None = None, *, w2_points: int,
                     seed: int = 0) -> dict[str, Any]:
    """The "transport" block of an evaluation: kinetic energy and straightness (means over the trajectories of
    the solve that made ``res``, which must have run with ``transport=True``) and, given reference data
    (vectors), POT's exact W2^2 between ``w2_points`` prior draws and as many reference points: the least
    kinetic energy any flow from the prior to the data can have (Benamou-Brenier), up to sampling error."""
    if res.kinetic is None or res.straightness is None:
        raise ValueError("transport_report needs samples generated with transport=True")
    out: dict[str, Any] = transport_summary(res.kinetic, res.straightness)
    if reference is not None:
        n = min(w2_points, len(reference))
        x0 = draw_prior(path, n, tuple(reference.shape[1:]), torch.Generator().manual_seed(seed))
        out["w2_sq_pot"] = w2_squared(x0, reference[:n])
        out["w2_n"] = n
    return out


def sample_quality(samples: Tensor, reference: Tensor, seed: int = 0) -> dict[str, float]:
    """Energy distance and sliced Wasserstein-2 between samples and held-out data (vectors)."""
    s, r = samples.flatten(1).float(), reference.flatten(1).float()
    gen = torch.Generator().manual_seed(seed)
    return {"energy_distance": float(energy_distance(s, r)),
            "sliced_wasserstein": float(sliced_wasserstein(s, r, generator=gen))}


def save_samples_png(samples: Tensor, path: str | Path, kind: str, levels: int | None,
                     reference: Tensor | None = None, title: str = "") -> None:
    """Scatter (2D vectors, first two coordinates otherwise) or an image grid of up to 64."""
    if kind == "image":
        levels = levels or 256
        pixels = to_pixels(samples[:64], levels).float() * (255 / (levels - 1))
        grid_png(pixels.round().to(torch.uint8), path)
    else:
        scatter_png(samples[:, :2], path, None if reference is None else reference[:, :2], title)
