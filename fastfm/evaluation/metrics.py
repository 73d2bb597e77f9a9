"""Sample-quality distances between two sample sets x (N, d) and y (M, d).

All functions work in torch on the inputs' device (float32 at least) and return
0-dim tensors. Inputs must be 2D, finite, with the same feature dimension d.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastfm import seeding

__all__ = ["energy_distance", "mmd_rbf", "sample_quality", "sliced_wasserstein"]


def _check(x: Tensor, y: Tensor, min_rows: int = 1) -> tuple[Tensor, Tensor]:
    """Validate a pair of sample sets and promote them to a common float dtype."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2D tensor (N, d), got shape {tuple(getattr(t, 'shape', ()))}")
        if t.shape[0] < min_rows:
            raise ValueError(f"{name} needs at least {min_rows} samples, got {t.shape[0]}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: x has d={x.shape[1]}, y has d={y.shape[1]}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    return x.to(dtype), y.to(dtype)


def _dist(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise Euclidean distances, computed directly (exact zeros on the diagonal)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _mmd2_unbiased(x: Tensor, y: Tensor, kernel: Callable[[Tensor], Tensor]) -> Tensor:
    """Unbiased MMD^2 for k(a, b) = kernel(|a - b|):
    mean_{i != i'} k(x_i, x_i') + mean_{j != j'} k(y_j, y_j') - 2 mean_{i, j} k(x_i, y_j).
    """
    n, m = x.shape[0], y.shape[0]
    kxx, kyy = kernel(_dist(x, x)), kernel(_dist(y, y))
    exx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    eyy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return exx + eyy - 2 * kernel(_dist(x, y)).mean()


def energy_distance(x: Tensor, y: Tensor) -> Tensor:
    """Squared energy distance D^2 = 2 E|X - Y| - E|X - X'| - E|Y - Y'|.

    Estimated with the unbiased U-statistics for the within-set terms (means over
    i != i') and the plain mean over all pairs for the cross term; this equals the
    unbiased MMD^2 with kernel k(a, b) = -|a - b|, so it can be slightly negative
    when both sets come from the same distribution.
    """
    x, y = _check(x, y, min_rows=2)
    return _mmd2_unbiased(x, y, torch.neg)


def mmd_rbf(x: Tensor, y: Tensor, bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0)) -> Tensor:
    """Unbiased MMD^2 with the summed Gaussian kernel k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2))."""
    x, y = _check(x, y, min_rows=2)
    if len(bandwidths) == 0 or min(bandwidths) <= 0:
        raise ValueError(f"bandwidths must be a non-empty sequence of positive floats, got {bandwidths}")
    h2 = 2 * torch.tensor(bandwidths, dtype=x.dtype, device=x.device) ** 2
    return _mmd2_unbiased(x, y, lambda d: torch.exp(-(d**2)[..., None] / h2).sum(-1))


def sliced_wasserstein(
    x: Tensor,
    y: Tensor,
    n_projections: int = 256,
    p: float = 2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sliced Wasserstein-p: SW_p = (E_theta W_p^p(theta # x, theta # y))^(1/p).

    theta are ``n_projections`` random unit directions (from ``generator``, which
    must live on the inputs' device). Each 1D W_p^p = int_0^1 |F^-1(t) - G^-1(t)|^p dt
    is computed exactly from the sorted projections: the empirical quantile
    functions are step functions, evaluated on the merged grid {i/N} U {j/M}
    (for N == M this is the mean of |x_(i) - y_(i)|^p over sorted samples).
    """
    x, y = _check(x, y)
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1, got {n_projections}")
    theta = torch.randn(x.shape[1], n_projections, generator=generator, device=x.device, dtype=x.dtype)
    theta = theta / theta.norm(dim=0, keepdim=True)
    xs, ys = (x @ theta).sort(dim=0).values, (y @ theta).sort(dim=0).values
    n, m = xs.shape[0], ys.shape[0]
    # Merged quantile grid (float64 so the step indices are robust) and interval widths.
    kw = dict(dtype=torch.float64, device=x.device)
    t = torch.cat([torch.arange(1, n + 1, **kw) / n, torch.arange(1, m + 1, **kw) / m]).sort().values
    w = torch.diff(t, prepend=t.new_zeros(1))
    mid = t - w / 2
    ix = (mid * n).ceil().long().clamp(1, n) - 1
    iy = (mid * m).ceil().long().clamp(1, m) - 1
    wpp = (w.to(x.dtype)[:, None] * (xs[ix] - ys[iy]).abs() ** p).sum(0)
    return wpp.mean() ** (1 / p)


def sample_quality(samples: Tensor, reference: Tensor, seed: int = 0) -> dict[str, float]:
    """Energy distance and sliced Wasserstein-2 between samples and held-out data (vectors); the projections
    come from the stream ``seeding.METRICS`` of ``seed``."""
    s, r = samples.flatten(1).float(), reference.flatten(1).float()
    gen = seeding.generator(seed, seeding.METRICS)
    return {"energy_distance": float(energy_distance(s, r)),
            "sliced_wasserstein": float(sliced_wasserstein(s, r, generator=gen))}
