"""Diagonal Gaussian mixtures with exact sampling and log-density.

p(x) = sum_k w_k N(x; mu_k, diag(s_k^2)), usable as a data set or as the base
density of a stochastic interpolant; independent of ``Dataset``.
"""

from __future__ import annotations

import math

import torch

from fastfm import seeding


class GaussianMixture:
    """Mixture of K diagonal Gaussians in d dimensions.

    ``means`` (K, d); ``stds`` a scalar, (K,) isotropic or (K, d) diagonal, all > 0;
    ``weights`` (K,) non-negative (normalised here), uniform when omitted.
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor | float,
        weights: torch.Tensor | None = None,
    ) -> None:
        means = torch.as_tensor(means, dtype=torch.float32)
        if means.ndim != 2 or means.shape[0] == 0 or means.shape[1] == 0:
            raise ValueError(f"means must have shape (K, d) with K, d >= 1, got {tuple(means.shape)}")
        k, d = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float32, device=means.device)
        given = tuple(stds.shape)
        if stds.ndim == 0:
            stds = stds.expand(k, d)
        elif stds.ndim == 1:
            stds = stds[:, None]
        if stds.shape not in {(k, 1), (k, d)}:
            raise ValueError(f"stds must be a scalar, (K,) or (K, d) = ({k}, {d}), got {given}")
        if not bool((stds > 0).all() & torch.isfinite(stds).all()):
            raise ValueError("stds must be finite and > 0")
        if weights is None:
            weights = torch.ones(k, device=means.device)
        weights = torch.as_tensor(weights, dtype=torch.float32, device=means.device)
        valid = bool((weights >= 0).all() & torch.isfinite(weights).all()) if weights.shape == (k,) else False
        if not valid or not float(weights.sum()) > 0:
            raise ValueError(f"weights must be {k} finite non-negative numbers with a positive sum")
        self.means = means
        self.stds = stds.expand(k, d).contiguous()
        self.weights = weights / weights.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def to(self, device: torch.device | str | None = None) -> GaussianMixture:
        """The same mixture with its parameters on ``device``."""
        return GaussianMixture(self.means.to(device), self.stds.to(device), self.weights.to(device))

    def mean(self) -> torch.Tensor:
        """E[x] = sum_k w_k mu_k, shape (d,)."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Cov[x] = sum_k w_k (diag(s_k^2) + mu_k mu_k^T) - E[x] E[x]^T, shape (d, d)."""
        second = torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        second = second + torch.diag(self.weights @ self.stds.square())
        m = self.mean()
        return second - torch.outer(m, m)

    def sample_with_components(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n points x = mu_k + s_k * eps with k ~ Cat(w), eps ~ N(0, I); returns (x, k)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, device=self.means.device)
        return self.means[k] + self.stds[k] * eps, k

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n points (n, d) drawn from the mixture."""
        return self.sample_with_components(n, generator)[0]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) = logsumexp_k [log w_k - sum_i (log s_ki + (x_i - mu_ki)^2 / (2 s_ki^2))] - d/2 log 2pi.

        ``x`` has shape (..., d); the result has shape (...) in x's dtype and device.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected points of dimension {self.dim}, got shape {tuple(x.shape)}")
        means, stds, weights = (t.to(x) for t in (self.means, self.stds, self.weights))
        z = (x[..., None, :] - means) / stds
        per_component = -0.5 * z.square().sum(-1) - stds.log().sum(-1) + weights.log()
        return torch.logsumexp(per_component, dim=-1) - 0.5 * self.dim * math.log(2 * math.pi)


def sphere_mixture(
    dim: int = 2, n_components: int = 8, radius: float = 4.0, std: float = 0.5, seed: int = 0
) -> GaussianMixture:
    """Equal-weight isotropic components with means on the sphere |mu| = ``radius``.

    In 2-D the means are evenly spaced on the circle (angles 2 pi k / K); in other
    dimensions they are uniform on the sphere, drawn with ``seed``.
    """
    if dim < 1 or n_components < 1:
        raise ValueError(f"need dim >= 1 and n_components >= 1, got dim={dim}, n_components={n_components}")
    if dim == 2:
        angles = torch.arange(n_components) * (2 * math.pi / n_components)
        directions = torch.stack([angles.cos(), angles.sin()], dim=1)
    else:
        directions = torch.randn(n_components, dim, generator=seeding.generator(seed, "data/directions"))
        directions = directions / directions.norm(dim=1, keepdim=True)
    return GaussianMixture(radius * directions, torch.full((n_components,), float(std)))
