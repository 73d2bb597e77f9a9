"""What every experiment shares: its context (output folder, scale, device, one progress bar over all its
stages), training a configuration with an evaluation hook along the way, the settings a report records, and
figures (sample quality: ``fastfm.experiments.judges``)."""

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
from fastfm.run.checkpoint import save_inference  # noqa: E402
from fastfm.training.config import TrainConfig  # noqa: E402
from fastfm.data.pixels import to_pixels  # noqa: E402
from fastfm.experiments.verdicts import BOOTSTRAP, SETTLED  # noqa: E402
from fastfm.solve import EagerSampler, settings_with  # noqa: E402
from fastfm.solve.ode import draw_prior, ode_sample  # noqa: E402
from fastfm.solve.solvers import ADAPTIVE_TOL  # noqa: E402
from fastfm.training.trainer import Trainer  # noqa: E402

T = TypeVar("T")
SCALES = ("tiny", "cpu", "gpu")
"""tiny: seconds, for the test suite; cpu: the default, about 45 minutes on 2 CPU cores for the whole set;
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
        return EagerSampler(tr.ema, tr.path, tr.meta, settings_with(settings))


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
    save_inference(out, tr.ema.state_dict(), tr.meta.to_json(), step=cfg.steps)
    ctx.done()
    return run


TOLERANCE = "rtol = atol = " + f"{ADAPTIVE_TOL:.0e}".replace("e-0", "e-")
"""dopri5's tolerances (``fastfm.solve.solvers.ADAPTIVE_TOL``); the tiny scale (tests) solves with RK4 x 4 instead."""


def recorded(size: dict[str, Any]) -> dict[str, Any]:
    """A report's settings: the scale's sizes, the adaptive tolerance and the verdict rules' constants."""
    return {**size, "adaptive_tol": ADAPTIVE_TOL, "settled": SETTLED, "bootstrap": BOOTSTRAP,
            "nfe_batches": NFE_BATCHES}


VERDICTS = ("A verdict counts a difference when it exceeds {settled:g} x its noise, measured on the models' own "
            "outputs: {bootstrap} bootstrap resamples of their samples, the standard errors of paired or binomial "
            "measures, the NFE of {nfe_batches} batches; otherwise, or where the setup cannot test a claim, it says "
            "not settled.")
"""The sentence on verdicts every report's introduction ends with, formatted with ``recorded`` settings."""


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


def nll_value(rep: dict[str, Any]) -> float:
    """The headline of an ``nll_report``: bits/dim for discrete data, else nats."""
    return rep["bits_per_dim"] if "bits_per_dim" in rep else rep["nll_nats"]


def nll_stderr(rep: dict[str, Any]) -> float:
    """The standard error of ``nll_value``, in its unit."""
    return rep["bits_per_dim_stderr"] if "bits_per_dim" in rep else rep["nll_nats_stderr"]


NFE_BATCHES = 4
"""Batches of an adaptive sampling solve: each reports its NFE, whose spread says how much an NFE difference means."""


def batched_sample(run: Trained, solve: dict[str, Any], n: int, seed: int,
                   progress: bool) -> tuple[Tensor, list[int]]:
    """n samples by ``solve`` in NFE_BATCHES batches drawn from one generator, the sampler's own stream
    (``seeding.SAMPLE``: one call's samples), and each batch's NFE."""
    m = -(-n // NFE_BATCHES)
    sampler, gen = run.sampler(**solve, batch_size=m), seeding.generator(seed, seeding.SAMPLE)
    parts = [sampler.sample(min(m, n - i), generator=gen, progress=progress) for i in range(0, n, m)]
    return torch.cat([p.x for p in parts]), [p.nfe for p in parts]


def trajectory(run: Trained, steps: int, seed: int, n: int = 300) -> Tensor:
    """RK4 trajectories (T, n, D) of n prior draws (the stream ``seeding.TRAJECTORY``) under the EMA model
    (flattened features)."""
    tr = run.trainer
    x0 = draw_prior(tr.path, n, tr.data.shape, seeding.generator(seed, seeding.TRAJECTORY))
    with torch.no_grad():
        res = ode_sample(tr.ema, tr.path, x0.to(tr.device), solver="rk4", steps=steps, target=tr.cfg.target,
                     return_intermediates=True)
    return res.intermediates.flatten(2).cpu()


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


def clouds_png(path: Path, panels: dict[str, Tensor], *, title: str = "") -> None:
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
