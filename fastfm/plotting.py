"""PNG outputs: scatter plots for 2D samples, grids for images."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastfm.data.pixels import to_pixels  # noqa: E402


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
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grid_png(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    """Tile uint8 images (N, C, H, W), C in {1, 3}, into one PNG."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    canvas = np.zeros((ncol * (h + 2) + 2, nrow * (w + 2) + 2, c), dtype=np.uint8)
    imgs = images.to("cpu", torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + q * (w + 2): 2 + q * (w + 2) + w] = imgs[i]
    plt.imsave(path, canvas[..., 0] if c == 1 else canvas, cmap="gray" if c == 1 else None, vmin=0, vmax=255)


def save_samples_png(samples: torch.Tensor, path: str | Path, kind: str, levels: int | None,
                     reference: torch.Tensor | None = None, title: str = "") -> None:
    """Scatter (2D vectors, first two coordinates otherwise) or an image grid of up to 64."""
    if kind == "image":
        levels = levels or 256
        pixels = to_pixels(samples[:64], levels).float() * (255 / (levels - 1))
        grid_png(pixels.round().to(torch.uint8), path)
    else:
        scatter_png(samples[:, :2], path, None if reference is None else reference[:, :2], title)
