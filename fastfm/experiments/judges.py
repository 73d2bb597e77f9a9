"""Sample quality of the experiments, lower is better: sliced W2 to a large reference draw for vectors, the
classifier Fréchet distance to the test images for images; each judge also gives the data's own floor and the
bootstrap spread of a model's samples (the noise the verdicts weigh differences against)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastfm import seeding
from fastfm.experiments.verdicts import bootstrap_std
from fastfm.evaluation.frechet import accuracy, feature_stats, frechet_distance, train_classifier

REFERENCE_POINTS = 20_000
"""Reference draws of a generated (2D) data set for sliced W2: a 2,000-point test set alone leaves the distance
between two draws of the data itself anywhere in 0.08-0.17 on the checkerboard."""
FLOOR_DRAWS = 5


class SlicedW2:
    """``fastfm.evaluation.metrics.sliced_wasserstein`` (p = 2, 256 projections from ``generator``) to one fixed
    reference, its projections drawn and sorted once: a judge measures many sample sets (and bootstrap resamples)
    against the same reference, whose sort would otherwise cost each call ~0.3 s at 20,000 points on 2 CPU
    cores."""

    def __init__(self, reference: Tensor, generator: torch.Generator, projections: int = 256) -> None:
        theta = torch.randn(reference.shape[1], projections, generator=generator, dtype=reference.dtype)
        self.theta = theta / theta.norm(dim=0, keepdim=True)
        self.ys = (reference @ self.theta).T.contiguous().sort(dim=1).values  # (P, M)

    def __call__(self, x: Tensor) -> float:
        """SW_2 = (mean over projections of int_0^1 |F^-1(t) - G^-1(t)|^2 dt)^(1/2) on the merged quantile grid."""
        xs = (x @ self.theta).T.contiguous().sort(dim=1).values  # (P, N)
        n, m = xs.shape[1], self.ys.shape[1]
        kw = dict(dtype=torch.float64, device=x.device)
        t = torch.cat([torch.arange(1, n + 1, **kw) / n, torch.arange(1, m + 1, **kw) / m]).sort().values
        w = torch.diff(t, prepend=t.new_zeros(1))
        ix = ((t - w / 2) * n).ceil().long().clamp(1, n) - 1
        iy = ((t - w / 2) * m).ceil().long().clamp(1, m) - 1
        return float(((xs[:, ix] - self.ys[:, iy]) ** 2 @ w.to(x.dtype)).mean().sqrt())


class Judge:
    """Sample quality against a data set, lower is better: sliced W2 (256 projections) to a large reference draw
    for vectors, the classifier Fréchet distance to the test images for images (``ImageJudge``). ``floor``: the
    same measure for fresh draws of the data itself (mean and spread over draws), the best a sampler can show;
    ``spread``: its bootstrap spread over resamples of a model's own samples (the noise of a comparison)."""

    def __init__(self, data: Any, seed: int) -> None:
        self.data, self.seed = data, seed
        generated = getattr(data, "train", None) is None
        self.reference = data.sample(REFERENCE_POINTS, seeding.generator(seed, seeding.JUDGE_REFERENCE))[0] \
            if generated else data.test
        self._measure: SlicedW2 | None = None

    def __call__(self, samples: Tensor) -> float:
        if self._measure is None:
            gen = seeding.generator(self.seed, seeding.JUDGE_PROJECTIONS)
            self._measure = SlicedW2(self.reference.flatten(1).float(), gen)
        return self._measure(samples.flatten(1).float())

    def floor(self, n: int, draws: int = FLOOR_DRAWS) -> tuple[float, float]:
        """Mean and standard deviation of the measure over ``draws`` fresh draws of n data points."""
        q = torch.tensor([self(self.data.sample(n, seeding.generator(self.seed, seeding.JUDGE_FLOOR, i))[0])
                          for i in range(draws)], dtype=torch.float64)
        return float(q.mean()), float(q.std()) if draws > 1 else 0.0

    def spread(self, samples: Tensor) -> float:
        """Standard deviation of the measure over bootstrap resamples of the samples."""
        return bootstrap_std(self, samples, self.seed)


class ImageJudge(Judge):
    """The small classifier that fastfm trains on an image data set's training split, and what it measures:
    its test accuracy, the Fréchet distance of samples to the test images in its feature space (not FID), the
    accuracy of samples' labels, features."""

    def __init__(self, data: Any, seed: int, steps: int, progress: bool = True) -> None:
        super().__init__(data, seed)
        images, labels = data.sample(len(data.train), seeding.generator(seed, seeding.JUDGE_TRAIN))
        self.model = train_classifier(images, labels, data.num_classes, steps=steps, seed=seed, progress=progress)
        self.test_accuracy = accuracy(self.model, data.test, data.test_labels)
        self._reference_stats = feature_stats(self.features(self.reference))

    def __call__(self, samples: Tensor) -> float:
        """``fastfm.evaluation.frechet.classifier_frechet_distance`` to the test images, their feature statistics
        kept."""
        return self._distance(self.features(samples))

    def spread(self, samples: Tensor) -> float:
        """Bootstrap spread over resamples of the samples' features (the classifier runs once)."""
        return bootstrap_std(self._distance, self.features(samples), self.seed)

    def _distance(self, features: Tensor) -> float:
        return frechet_distance(*feature_stats(features), *self._reference_stats)

    def accuracy(self, samples: Tensor, labels: Tensor) -> float:
        return accuracy(self.model, samples.float().clamp(-1, 1), labels)

    @torch.no_grad()
    def features(self, samples: Tensor) -> Tensor:
        return self.model.features(samples.float().clamp(-1, 1))


def judge_for(data: Any, seed: int, classifier_steps: int, progress: bool = True) -> Judge:
    """The quality measure of a data set: ``ImageJudge`` for images (it trains the classifier), else ``Judge``."""
    return ImageJudge(data, seed, classifier_steps, progress) if data.kind == "image" else Judge(data, seed)
