"""Minibatch couplings: which base sample x0 is paired with which data sample x1.

A coupling takes x0, x1 of shape (B, *shape) (rows are flattened for costs) and
returns (x0', x1', y1') paired row by row. The built-in couplings keep x1 and y1
in their order and re-pair x0 (a permutation, or samples with replacement).

Cost: c(x0_i, x1_j) = |x0_i - x1_j|^2 (squared Euclidean on flattened rows).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from fastfm.registry import Registry

__all__ = [
    "COUPLINGS",
    "Coupling",
    "IndependentCoupling",
    "ExactOTCoupling",
    "SinkhornCoupling",
    "LabelAwareCoupling",
    "get_coupling",
    "ot_cost",
    "sinkhorn_log_plan",
]


class Coupling(Protocol):
    def __call__(self, x0: Tensor, x1: Tensor, y1: Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Return (x0', x1', y1') paired row by row."""
        ...


def _check_batch(x0: Tensor, x1: Tensor) -> None:
    if x0.shape[0] != x1.shape[0]:
        raise ValueError(f"batch sizes differ: x0 has {x0.shape[0]} rows, x1 has {x1.shape[0]}")
    if x0.shape[1:].numel() != x1.shape[1:].numel():
        raise ValueError(f"sample shapes differ: x0 {tuple(x0.shape[1:])} vs x1 {tuple(x1.shape[1:])}")


def _sq_cost(x0: Tensor, x1: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """C_ij = |x0_i - x1_j|^2 on flattened rows, shape (B0, B1), no autograd."""
    a, b = (x.detach().flatten(1).to(device, dtype) for x in (x0, x1))
    return torch.cdist(a, b) ** 2


def ot_cost(x0: Tensor, x1: Tensor) -> Tensor:
    """Mean squared Euclidean distance of paired rows: (1/B) sum_i |x0_i - x1_i|^2."""
    _check_batch(x0, x1)
    return (x0.flatten(1) - x1.flatten(1)).pow(2).sum(1).mean()


class IndependentCoupling:
    """Product coupling pi = p0 x p1: returns the inputs unchanged."""

    def __call__(self, x0: Tensor, x1: Tensor, y1: Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        _check_batch(x0, x1)
        return x0, x1, y1


class _ReindexingCoupling:
    """A coupling that re-pairs by an index: x0' = x0[idx], x1 and y1 unchanged."""

    def assignment(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def __call__(self, x0: Tensor, x1: Tensor, y1: Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        return x0[self.assignment(x0, x1, generator)], x1, y1


class ExactOTCoupling(_ReindexingCoupling):
    """Minibatch exact OT: the permutation sigma minimising sum_j |x0_sigma(j) - x1_j|^2.

    For equal batch sizes with uniform weights the OT plan is a permutation
    (Birkhoff), found by ``scipy.optimize.linear_sum_assignment`` (default) or
    POT's ``ot.emd`` (optional dependency ``pot``). The cost is solved on CPU
    in float64; the returned x0 is indexed on its original device.
    """

    def __init__(self, backend: str = "scipy") -> None:
        if backend not in ("scipy", "pot"):
            raise ValueError(f"unknown OT backend {backend!r}; expected 'scipy' or 'pot'")
        if backend == "pot":
            try:
                import ot  # noqa: F401
            except ImportError as e:
                raise ImportError(
                    "ExactOTCoupling(backend='pot') needs the POT package: pip install pot"
                ) from e
        self.backend = backend

    def assignment(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Index tensor idx (on x0.device) such that x0[idx[j]] is paired with x1[j]."""
        _check_batch(x0, x1)
        cost = _sq_cost(x0, x1, torch.float64, torch.device("cpu")).numpy()
        if self.backend == "scipy":
            from scipy.optimize import linear_sum_assignment

            rows, cols = linear_sum_assignment(cost)
            idx = torch.empty(len(cols), dtype=torch.long)
            idx[torch.from_numpy(cols)] = torch.from_numpy(rows)
        else:
            import numpy as np
            import ot

            n = cost.shape[0]
            w = np.full(n, 1.0 / n)
            plan = ot.emd(w, w, cost, numItermax=1_000_000)
            idx = torch.from_numpy(plan.argmax(axis=0))
        return idx.to(x0.device)


def sinkhorn_log_plan(cost: Tensor, reg: float, n_iters: int) -> Tensor:
    """Log of the entropic OT plan for cost C (n, m) with uniform marginals a, b.

    Solves min_P <P, C> - reg H(P) s.t. P 1 = a, P^T 1 = b by log-domain Sinkhorn
    on scaled potentials u, v (P = exp(u_i + v_j - C_ij / reg)):
        u = log a - logsumexp_j(v_j - C_ij / reg),  v = log b - logsumexp_i(u_i - C_ij / reg).
    Fixed ``n_iters``, no host synchronisation; the column marginal holds up to rounding.
    """
    n, m = cost.shape
    k = -cost / reg
    log_a, log_b = -math.log(n), -math.log(m)
    u = cost.new_zeros(n)
    v = cost.new_zeros(m)
    for _ in range(n_iters):
        u = log_a - torch.logsumexp(k + v[None, :], dim=1)
        v = log_b - torch.logsumexp(k + u[:, None], dim=0)
    return k + u[:, None] + v[None, :]


class SinkhornCoupling(_ReindexingCoupling):
    """Entropic minibatch OT, sampled: for each x1_j draw i ~ P[:, j] / sum_i P[i, j].

    P is the Sinkhorn plan (see :func:`sinkhorn_log_plan`) solved in torch on the
    tensors' device. With ``normalize_cost`` the cost is divided by its max, so
    ``reg`` is relative to the largest pairwise cost. Partners are drawn
    independently per column (with replacement across j), using ``generator``
    (which must live on the tensors' device).
    """

    def __init__(self, reg: float = 0.01, n_iters: int = 100, normalize_cost: bool = True) -> None:
        if reg <= 0:
            raise ValueError(f"reg must be positive, got {reg}")
        if n_iters < 1:
            raise ValueError(f"n_iters must be >= 1, got {n_iters}")
        self.reg, self.n_iters, self.normalize_cost = reg, n_iters, normalize_cost

    def log_plan(self, x0: Tensor, x1: Tensor) -> Tensor:
        """Log Sinkhorn plan (B0, B1) between the rows of x0 and x1."""
        dtype = torch.promote_types(x0.dtype, torch.float32)
        cost = _sq_cost(x0, x1, dtype, x0.device)
        if self.normalize_cost:
            cost = cost / cost.max().clamp_min(torch.finfo(dtype).tiny)
        return sinkhorn_log_plan(cost, self.reg, self.n_iters)

    def assignment(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """idx_j ~ P[:, j] / sum_i P[i, j], drawn independently per j."""
        _check_batch(x0, x1)
        probs = torch.softmax(self.log_plan(x0, x1), dim=0).T
        return torch.multinomial(probs, 1, replacement=True, generator=generator).squeeze(1)


class LabelAwareCoupling:
    """Solve ``inner`` separately within each class so pairs never cross classes.

    With y1 only: the x0 rows at the positions of class c are re-paired among the
    x1 rows of class c. With base labels y0 as well: the x0 rows with y0 == c are
    paired with the x1 rows with y1 == c; this requires equal per-class counts
    (a ValueError otherwise). Either way y1 stays attached to x1, and the returned
    x0' has labels y1. Without labels this is just ``inner``.
    """

    def __init__(self, inner: Coupling) -> None:
        self.inner = inner

    def __call__(self, x0: Tensor, x1: Tensor, y1: Tensor | None = None, generator: torch.Generator | None = None,
                 y0: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        if y1 is None:
            if y0 is not None:
                raise ValueError("y0 was given without y1; label-aware coupling needs data labels y1")
            return self.inner(x0, x1, None, generator)
        _check_batch(x0, x1)
        for name, y in (("y1", y1), ("y0", y0)):
            if y is not None and y.shape != (x1.shape[0],):
                raise ValueError(f"{name} must have shape ({x1.shape[0]},), got {tuple(y.shape)}")
        out0, out1, order = [], [], []
        for c in torch.unique(y1):
            i1 = (y1 == c).nonzero().squeeze(1)
            i0 = i1 if y0 is None else (y0 == c).nonzero().squeeze(1)
            if i0.numel() != i1.numel():
                raise ValueError(
                    f"class {c.item()}: {i0.numel()} base samples (y0) but {i1.numel()} data "
                    "samples (y1); label-aware pairing needs equal per-class counts"
                )
            a, b, _ = self.inner(x0[i0], x1[i1], None, generator)
            out0.append(a)
            out1.append(b)
            order.append(i1)
        # Blocks are concatenated class by class; scatter them back to the x1 positions.
        perm = torch.cat(order)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        return torch.cat(out0)[inv], torch.cat(out1)[inv], y1


def _label_aware(inner: Callable[..., Coupling]) -> Callable[..., Coupling]:
    """A factory of ``LabelAwareCoupling(inner(**params))`` that takes ``inner``'s parameters."""
    def build(**params: Any) -> Coupling:
        return LabelAwareCoupling(inner(**params))
    build.__signature__ = inspect.signature(inner)  # type: ignore[attr-defined]
    return build


COUPLINGS: Registry[Coupling] = Registry("coupling")
COUPLINGS.register("independent", "product coupling, pairs as drawn", IndependentCoupling)
COUPLINGS.register("ot", "minibatch exact OT (a permutation; backend scipy or pot)", ExactOTCoupling)
COUPLINGS.register("sinkhorn", "entropic minibatch OT, partners drawn from the Sinkhorn plan", SinkhornCoupling)
COUPLINGS.register("ot-label", "exact OT within each class (needs labels)", _label_aware(ExactOTCoupling))
COUPLINGS.register("sinkhorn-label", "Sinkhorn within each class (needs labels)", _label_aware(SinkhornCoupling))


def get_coupling(name: str, **kwargs: Any) -> Coupling:
    """Build a coupling of ``COUPLINGS`` by name; ``kwargs`` go to the (inner) coupling constructor."""
    return COUPLINGS.build(name, **kwargs)
