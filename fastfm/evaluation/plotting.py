"""PNG outputs: scatter plots for 2D samples, grids for images; each under a title saying what drew them."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastfm.data.pixels import to_pixels  # noqa: E402

MIN_IMAGE_PX = 64
"""Least side of one image in a sample grid, in pixels (8x8 digits are drawn 8 times larger)."""
TITLE_PX, MIN_WIDTH_PX, DPI = 36, 320, 100
"""A grid's title band (two lines of text) and least width in pixels, so that its title fits; the PNG's dpi."""


def scatter_png(samples: torch.Tensor, path: str | Path, reference: torch.Tensor | None = None,
                title: str = "") -> None:
    """Side-by-side 2D scatter of samples (and reference data, if given), shared axes."""
    panels = [("samples", samples)] + ([("data", reference)] if reference is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False)
    pts = torch.cat([p for _, p in panels]).float().cpu().numpy()
    lo, hi = np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)
    pad = 0.1 * (hi - lo)
    for ax, (name, p) in zip(axes[0], panels):
        p = p.float().cpu().numpy()
        ax.scatter(p[:, 0], p[:, 1], s=1.5, alpha=0.5, linewidths=0)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_aspect("equal")
        ax.set_title(name)
    if title:
        fig.suptitle(title, fontsize=10, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tile(images: torch.Tensor, nrow: int | None = None) -> np.ndarray:
    """uint8 images (N, C, H, W) tiled ``nrow`` to a row (default: a square) with 2-pixel black gaps, each enlarged
    (nearest-neighbour) to at least ``MIN_IMAGE_PX`` pixels a side: an (H', W', C) uint8 canvas."""
    scale = -(-MIN_IMAGE_PX // min(images.shape[-2:]))
    images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    canvas = np.zeros((ncol * (h + 2) + 2, nrow * (w + 2) + 2, c), dtype=np.uint8)
    imgs = images.to("cpu", torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + q * (w + 2): 2 + q * (w + 2) + w] = imgs[i]
    return canvas


def grid_png(images: torch.Tensor, path: str | Path, title: str, nrow: int | None = None) -> None:
    """uint8 images (N, C, H, W), C in {1, 3}, as one PNG: their ``tile`` pixel for pixel under ``title``."""
    canvas = tile(images, nrow)
    height, width = canvas.shape[0] + TITLE_PX, max(canvas.shape[1], MIN_WIDTH_PX)
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.figimage(np.repeat(canvas, 3 // canvas.shape[2], axis=2), xo=(width - canvas.shape[1]) // 2)  # RGB, as is
    fig.suptitle(title, y=1 - TITLE_PX / 2 / height, va="center", fontsize=8, wrap=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def nonfinite_rows(samples: torch.Tensor) -> int:
    """How many samples (rows of the first dimension) hold a NaN or Inf."""
    return int((~torch.isfinite(samples.reshape(len(samples), -1))).any(dim=1).sum())


def save_samples_png(samples: torch.Tensor, path: str | Path, kind: str, levels: int | None,
                     reference: torch.Tensor | None = None, *, title: str) -> None:
    """Scatter (2D vectors, first two coordinates otherwise) or an image grid of up to 64, under ``title`` (which
    should name what drew them: solver, steps, NFE). ValueError for samples with NaN or Inf values."""
    bad = nonfinite_rows(samples)
    if bad:
        raise ValueError(f"{bad} of {len(samples)} samples hold NaN/Inf values: nothing to plot")
    if kind == "image":
        levels = levels or 256
        pixels = to_pixels(samples[:64], levels).float() * (255 / (levels - 1))
        grid_png(pixels.round().to(torch.uint8), path, title)
    else:
        scatter_png(samples[:, :2], path, None if reference is None else reference[:, :2], title)
