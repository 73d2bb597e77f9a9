"""Divergence of a velocity field from Jacobian-vector products (torch.func.jvp, forward mode).

exact:       div v(x) = sum_i e_i^T J e_i                (D JVPs, one per coordinate)
hutchinson:  div v(x) ~ (1/k) sum_j eps_j^T J eps_j      (k probes, E[eps eps^T] = I: unbiased)

Both are plain traced ops (no autograd.grad loop), so torch.compile and torch.export see them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from fastfm.models.blocks import forward_mode_attention
from fastfm.registry import Registry
from fastfm.solve.solvers import Field

PROBES = ("rademacher", "gaussian")
EXACT_MAX_DIM = 16
VectorField = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Estimator:
    """A divergence estimator: ``exact`` (D JVPs per evaluation, no probes) or ``hutchinson`` (one JVP per
    probe; the samplers draw k Rademacher probes, E[eps eps^T] = I)."""

    name: str
    takes_probes: bool

    def jvps(self, dim: int, probes: int) -> int:
        """JVPs (model calls) per field evaluation of a D = ``dim`` field with ``probes`` probes."""
        return probes if self.takes_probes else dim

    def draw(self, k: int, shape: tuple[int, ...], generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> Tensor | None:
        """The probes this estimator takes: None (exact), else k Rademacher probes of ``shape`` drawn with
        ``generator`` (on its device), moved to ``device``."""
        return make_probes(k, shape, "rademacher", generator).to(device) if self.takes_probes else None


EXACT, HUTCHINSON = Estimator("exact", False), Estimator("hutchinson", True)
DIVERGENCES: Registry[Estimator] = Registry("divergence", supplied=("dim",))
"""Each factory maps the data dimension D to the estimator used."""
DIVERGENCES.register("auto", f"exact up to {EXACT_MAX_DIM} dimensions, Hutchinson above",
                     lambda dim: EXACT if dim <= EXACT_MAX_DIM else HUTCHINSON)
DIVERGENCES.register("exact", "exact trace of the Jacobian, D JVPs per evaluation", lambda dim: EXACT)
DIVERGENCES.register("hutchinson", "unbiased Hutchinson estimate, one JVP per Rademacher probe",
                     lambda dim: HUTCHINSON)


def estimator(divergence: str, dim: int) -> Estimator:
    """The estimator of ``divergence`` for a D = ``dim`` field: ``auto`` is exact up to EXACT_MAX_DIM = 16
    dimensions (D JVPs per evaluation), Hutchinson above."""
    return DIVERGENCES.build(divergence, dim=dim)


def divergence_exact(v: VectorField, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(v(x, t), exact divergence (B,)) from D = prod(x.shape[1:]) JVPs."""
    flat = x.flatten(1)
    dim = flat.shape[1]
    eye = torch.eye(dim, dtype=x.dtype, device=x.device)
    fx, div = None, None
    for i in range(dim):
        e = eye[i].expand_as(flat).reshape(x.shape)
        with forward_mode_attention():
            fx, jv = torch.func.jvp(lambda z: v(z, t), (x,), (e,))
        term = jv.flatten(1)[:, i].float()
        div = term if div is None else div + term
    return fx, div


def divergence_hutchinson(v: VectorField, x: Tensor, t: Tensor, probes: Tensor) -> tuple[Tensor, Tensor]:
    """(v(x, t), Hutchinson estimate (B,)) with probes of shape (k, *x.shape)."""
    if probes.shape[1:] != x.shape:
        raise ValueError(f"probes must have shape (k, *{tuple(x.shape)}), got {tuple(probes.shape)}")
    fx, est = None, None
    for j in range(probes.shape[0]):
        eps = probes[j]
        with forward_mode_attention():
            fx, jv = torch.func.jvp(lambda z: v(z, t), (x,), (eps,))
        term = (eps.float() * jv.float()).flatten(1).sum(1)
        est = term if est is None else est + term
    return fx, est / probes.shape[0]


def make_probes(k: int, shape: tuple[int, ...], kind: str = "rademacher",
                generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """k probe vectors with E[eps eps^T] = I: Rademacher (+-1) or standard Gaussian."""
    if kind not in PROBES:
        raise ValueError(f"unknown probe distribution {kind!r}; choose one of {PROBES}")
    if k < 1:
        raise ValueError(f"need at least one Hutchinson probe, got {k}")
    if kind == "gaussian":
        return torch.randn((k, *shape), generator=generator, device=device)
    return torch.randint(0, 2, (k, *shape), generator=generator, device=device).float() * 2 - 1


def augmented_field(v: VectorField, probes: Tensor | None, sign: float) -> Field:
    """d/dt (x, l) = (v(x, t), sign * div v(x, t)); exact divergence when probes is None."""
    def f(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x = state[0]
        if probes is None:
            fx, div = divergence_exact(v, x, t)
        else:
            fx, div = divergence_hutchinson(v, x, t, probes)
        return fx, sign * div
    return f
