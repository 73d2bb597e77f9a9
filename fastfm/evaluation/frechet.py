"""Sample quality of images as a Fréchet distance in the feature space of a small classifier that fastfm
trains itself on the data set's training split. This is *not* FID: the features are not Inception's, so the
numbers compare runs on one data set, not papers.

    FD(N(m1, S1), N(m2, S2)) = |m1 - m2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))

computed the standard way: feature means and covariances (unbiased), ``scipy.linalg.sqrtm`` of S1 S2, its
real part (the imaginary part is round-off).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn
from tqdm import tqdm

from fastfm import seeding


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein) distance squared between N(mu1, cov1) and N(mu2, cov2)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes disagree: means {mu1.shape} / {mu2.shape}, covariances {cov1.shape} / {cov2.shape}")
    root = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(root).all():  # singular product: regularise as the reference FID code does
        eps = 1e-6 * np.eye(mu1.size)
        root = scipy.linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * np.real(root)))


def feature_stats(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of rows of features (N, F), N >= 2."""
    f = features.detach().double().cpu().numpy()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, F), got {tuple(f.shape)}")
    return f.mean(0), np.cov(f, rowvar=False)


class DigitClassifier(nn.Module):
    """A small CNN for C x H x W images in [-1, 1]: two conv blocks, a ``features`` layer (the space of the
    Fréchet distance), then the class logits."""

    def __init__(self, channels: int, num_classes: int, width: int = 32, features: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * width, features), nn.GELU())
        self.head = nn.Linear(features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def train_classifier(images: Tensor, labels: Tensor, num_classes: int, *, steps: int = 600, batch: int = 128,
                     lr: float = 2e-3, seed: int = 0, progress: bool = True) -> DigitClassifier:
    """Train :class:`DigitClassifier` on (images, labels) with AdamW; small random shifts as augmentation. The
    weights start from the stream ``seeding.FRECHET_INIT`` of ``seed`` (on a forked CPU RNG: the global state
    is left as it was), the batches and shifts come from ``seeding.FRECHET_BATCH``."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seeding.derive(seed, seeding.FRECHET_INIT))
        model = DigitClassifier(images.shape[1], num_classes)
    gen = seeding.generator(seed, seeding.FRECHET_BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    for _ in tqdm(range(steps), desc="classifier", leave=False, disable=not progress):
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = images[idx]
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
        x = torch.roll(x, (dx, dy), dims=(2, 3))
        loss = nn.functional.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    """Fraction of images classified as their label."""
    return float((model(images).argmax(1) == labels).float().mean())


@torch.no_grad()
def classifier_frechet_distance(model: DigitClassifier, samples: Tensor, reference: Tensor) -> float:
    """Fréchet distance between the classifier features of samples and of reference images."""
    return frechet_distance(*feature_stats(model.features(samples)), *feature_stats(model.features(reference)))
