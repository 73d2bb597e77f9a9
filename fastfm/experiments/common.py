"""What every experiment shares: its context (output folder, scale, device, one progress bar over all its
stages), training a configuration with an evaluation hook along the way, sample quality, and figures."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm import tqdm  # noqa: E402

from fastfm import seeding  # noqa: E402
from fastfm.checkpoint import save_inference  # noqa: E402
from fastfm.config import TrainConfig  # noqa: E402
from fastfm.data.pixels import to_pixels  # noqa: E402
from fastfm.frechet import accuracy, classifier_frechet_distance, train_classifier  # noqa: E402
from fastfm.inference import EagerSampler, settings_with  # noqa: E402
from fastfm.metrics import sliced_wasserstein  # noqa: E402
from fastfm.ode import draw_prior, sample  # noqa: E402
from fastfm.solvers import ADAPTIVE_TOL  # noqa: E402
from fastfm.trainer import Trainer  # noqa: E402

T = TypeVar("T")
SCALES = ("tiny", "cpu", "gpu")
"""tiny: seconds, for the test suite; cpu: the default, within 30 minutes on 2 CPU cores for the whole set;
gpu: one GPU, sized (not measured: no GPU was lent) for under 10 minutes."""

TINY_UNET = {"model_channels": 8, "channel_mult": [1], "num_res_blocks": 1, "attention_resolutions": []}
SMALL_UNET = {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": []}
MEDIUM_UNET = {"model_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "attention_resolutions": []}
"""UNet sizes of the experiments (``--model-args``): seconds in tests, minutes on 2 CPU cores, a GPU's."""


@dataclass
class Context:
    """One experiment's run: where it writes, at which scale, on which device, and its progress bar, which
    counts stages (a training run, an evaluation) out of ``total``."""

    out: Path
    scale: str
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    bar: tqdm | None = field(default=None, repr=False)

    def plan(self, name: str, total: int) -> None:
        self.bar = tqdm(total=total, desc=f"experiment {name}", unit="stage", dynamic_ncols=True,
                        disable=not self.progress)

    def stage(self, label: str) -> None:
        """Show the stage now running on the bar (``done`` counts it when it ends)."""
        if self.bar is not None:
            self.bar.set_postfix_str(label)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Trained:
    """A trained configuration: its trainer (EMA model, path, data), training wall time without the evaluations
    taken along the way, and their records."""

    key: str
    trainer: Trainer
    wall_s: float
    curve: list[dict[str, Any]]

    @property
    def data(self) -> Any:
        return self.trainer.data

    def sampler(self, **settings: Any) -> EagerSampler:
        """The EMA model behind the inference interface, with these ``InferenceSettings``."""
        tr = self.trainer
        return EagerSampler(tr.ema, tr.path, tr.data.shape, target=tr.cfg.target, meta=tr.meta,
                            settings=settings_with(settings))


def train(ctx: Context, key: str, options: dict[str, Any], *,
          evaluate: Callable[[Trained, int], dict[str, Any]] | None = None, every: int = 0) -> Trained:
    """Train ``TrainConfig(**options)`` (eagerly, seeded by the context) and save its EMA weights under
    ``runs/<key>`` in the experiment's folder; ``evaluate(trained, step)`` runs every ``every`` steps and at the
    end, its time left out of ``wall_s``."""
    out = ctx.out / "runs" / key
    cfg = TrainConfig(**{"seed": ctx.seed, "device": ctx.device, "out": str(out), "force": True, **options})
    cfg.validate()
    ctx.stage(f"train {key}")
    tr = Trainer(cfg)
    run = Trained(key, tr, 0.0, [])
    sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
    started = time.perf_counter()
    for step in tqdm(range(1, cfg.steps + 1), desc=f"train {key}", leave=False, disable=not ctx.progress):
        tr.train_step(step)
        if evaluate is not None and ((every and step % every == 0) or step == cfg.steps):
            sync()
            run.wall_s += time.perf_counter() - started
            run.curve.append({"step": step, **evaluate(run, step)})
            started = time.perf_counter()
    sync()
    run.wall_s += time.perf_counter() - started
    save_inference(out, tr.ema.state_dict(), tr.meta)
    ctx.done()
    return run


TOLERANCE = "rtol = atol = " + f"{ADAPTIVE_TOL:.0e}".replace("e-0", "e-")
"""dopri5's tolerances (``fastfm.solvers.ADAPTIVE_TOL``); the tiny scale (tests) solves with RK4 x 4 instead."""


def solve_label(solve: dict[str, Any]) -> str:
    """What a reference solve is: dopri5 with its tolerances, or a fixed-step stand-in (tiny scale)."""
    return f"dopri5, {TOLERANCE}" if solve["solver"] == "dopri5" else f"{solve['solver']} x {solve['steps']}"


def attempt(notes: list[str], what: str, solve: Callable[[], T]) -> T | None:
    """``solve()``, or None with a note where an adaptive solver gives up (a field too stiff for its tolerance)."""
    try:
        return solve()
    except ValueError as e:
        notes.append(f"{what}: {e}")
        return None


def less(a: float | None, b: float | None) -> bool | None:
    """a < b, or None (not settled) where either number is missing (a solve that failed)."""
    return None if a is None or b is None else a < b


def quality_claim(report: Any, claim: str, a: float | None, b: float | None, spread: float,
                  names: tuple[str, str] = ("CondOT", "VP")) -> None:
    """"a's samples are better than b's" (lower measure): settled only when the two differ by more than
    SETTLED x the spread of the measure over fresh draws of the data (``Judge.floor``)."""
    if a is None or b is None:
        report.claim(claim, None, f"{names[0]} {{a}} vs {names[1]} {{b}}: a solve failed", a=a, b=b)
        return
    holds = None if abs(a - b) <= SETTLED * spread else a < b
    report.claim(claim, holds, f"{names[0]} {{a}} vs {names[1]} {{b}}, spread of the data's own {{s}}"
                 + ("" if holds is not None else f": within {SETTLED} x the spread"), a=a, b=b, s=spread)


def nll_value(rep: dict[str, Any]) -> float:
    """The headline of an ``nll_report``: bits/dim for discrete data, else nats."""
    return rep["bits_per_dim"] if "bits_per_dim" in rep else rep["nll_nats"]


def trajectory(run: Trained, steps: int, seed: int, n: int = 300) -> Tensor:
    """RK4 trajectories (T, n, D) of n prior draws under the EMA model (flattened features)."""
    tr = run.trainer
    x0 = draw_prior(tr.path, n, tr.data.shape, seeding.generator(seed, seeding.EVAL, 7))
    with torch.no_grad():
        res = sample(tr.ema, tr.path, x0.to(tr.device), solver="rk4", steps=steps, target=tr.cfg.target,
                     return_intermediates=True)
    return res.intermediates.flatten(2).cpu()


SETTLED = 2.0
"""A difference is settled when it exceeds this many standard errors (NLL, paired) or spreads of the data's own
quality measure (sample quality)."""
REFERENCE_POINTS = 20_000
"""Reference draws of a generated (2D) data set for sliced W2: a 2,000-point test set alone leaves the distance
between two draws of the data itself anywhere in 0.08-0.17 on the checkerboard."""
FLOOR_DRAWS = 5


class Judge:
    """Sample quality against a data set, lower is better: sliced W2 (256 projections) to a large reference draw
    for vectors, the classifier Fréchet distance to the test images for images (``ImageJudge``). ``floor``: the
    same measure for fresh draws of the data itself (mean and spread over draws), the best a sampler can show."""

    def __init__(self, data: Any, seed: int) -> None:
        self.data, self.seed = data, seed
        generated = getattr(data, "train", None) is None
        self.reference = data.sample(REFERENCE_POINTS, seeding.generator(seed, seeding.EVAL, 11))[0] \
            if generated else data.test

    def __call__(self, samples: Tensor) -> float:
        gen = seeding.generator(self.seed, seeding.EVAL)
        return float(sliced_wasserstein(samples.flatten(1).float(), self.reference.flatten(1).float(), generator=gen))

    def floor(self, n: int, draws: int = FLOOR_DRAWS) -> tuple[float, float]:
        """Mean and standard deviation of the measure over ``draws`` fresh draws of n data points."""
        q = torch.tensor([self(self.data.sample(n, seeding.generator(self.seed, seeding.EVAL, 12, i))[0])
                          for i in range(draws)], dtype=torch.float64)
        return float(q.mean()), float(q.std()) if draws > 1 else 0.0


class ImageJudge(Judge):
    """The small classifier that fastfm trains on an image data set's training split, and what it measures:
    its test accuracy, the Fréchet distance of samples to the test images in its feature space (not FID), the
    accuracy of samples' labels, features."""

    def __init__(self, data: Any, seed: int, steps: int, progress: bool = True) -> None:
        super().__init__(data, seed)
        images, labels = data.sample(len(data.train), seeding.generator(seed, seeding.DATA, 1))
        self.model = train_classifier(images, labels, data.num_classes, steps=steps, seed=seed, progress=progress)
        self.test_accuracy = accuracy(self.model, data.test, data.test_labels)

    def __call__(self, samples: Tensor) -> float:
        return classifier_frechet_distance(self.model, samples.float().clamp(-1, 1), self.reference)

    def accuracy(self, samples: Tensor, labels: Tensor) -> float:
        return accuracy(self.model, samples.float().clamp(-1, 1), labels)

    @torch.no_grad()
    def features(self, samples: Tensor) -> Tensor:
        return self.model.features(samples.float().clamp(-1, 1))


def judge_for(data: Any, seed: int, classifier_steps: int, progress: bool = True) -> Judge:
    """The quality measure of a data set: ``ImageJudge`` for images (it trains the classifier), else ``Judge``."""
    return ImageJudge(data, seed, classifier_steps, progress) if data.kind == "image" else Judge(data, seed)


# ---------------------------------------------------------------------------------------------- figures


def lines_png(path: Path, panels: dict[str, dict[str, tuple[list[float], list[float]]]], *, xlabel: str,
              ylabel: str, logx: bool = False, logy: bool = False, title: str = "") -> None:
    """One panel per key of ``panels``; each holds named curves (xs, ys)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (name, curves) in zip(axes[0], panels.items()):
        for label, (xs, ys) in curves.items():
            ax.plot(xs, ys, marker="o", ms=3, label=label)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trajectories_png(path: Path, panels: dict[str, Tensor], *, title: str = "", n: int = 200) -> None:
    """2D trajectories (T, N, 2) per panel: grey lines from the source (blue) to the end points (red)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.9), squeeze=False)
    for ax, (name, traj) in zip(axes[0], panels.items()):
        p = traj[:, :n].float().cpu().numpy()
        ax.plot(p[:, :, 0], p[:, :, 1], color="0.5", lw=0.4, alpha=0.5)
        ax.scatter(p[0, :, 0], p[0, :, 1], s=3, color="tab:blue", label="t = 0")
        ax.scatter(p[-1, :, 0], p[-1, :, 1], s=3, color="tab:red", label="t = 1")
        ax.set_title(name, fontsize=9)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scatter_png(path: Path, panels: dict[str, Tensor], *, title: str = "") -> None:
    """2D point clouds side by side, one per key."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, x) in zip(axes[0], panels.items()):
        p = x.float().cpu().numpy()
        ax.scatter(p[:, 0], p[:, 1], s=1, alpha=0.5, linewidths=0)
        ax.set_title(name, fontsize=9)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grids_png(path: Path, panels: dict[str, Tensor], levels: int | None, *, nrow: int = 8, title: str = "") -> None:
    """Image grids side by side, one per key: the first nrow^2 images of each (C x H x W in [-1, 1])."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.5), squeeze=False)
    for ax, (name, images) in zip(axes[0], panels.items()):
        ax.imshow(tile(images[: nrow * nrow], levels, nrow), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tile(images: Tensor, levels: int | None, nrow: int) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] quantised to the data's levels, tiled into an (rows*H, nrow*W) array in
    [0, 1] (first channel), one pixel of padding between images."""
    levels = levels or 256
    px = to_pixels(images.float().clamp(-1, 1), levels).float()[:, 0] / (levels - 1)
    n, h, w = px.shape
    rows = -(-n // nrow)
    canvas = np.ones((rows * (h + 1) + 1, nrow * (w + 1) + 1))
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = px[i].numpy()
    return canvas
