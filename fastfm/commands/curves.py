"""A training run's curves, from its metrics.jsonl to one PNG: ``python -m fastfm.curves RUN_DIR [--out PNG]``.

Panels, those with data: training loss (log scale), learning rate, throughput (samples/s), test NLL with one
standard error as error bars (bits/dim where the evaluations report it, else nats) and sample quality (vector
data: energy distance, sliced Wasserstein; log scale). Evaluations are the periodic ``eval`` records and the
``final`` one, at the run's last step. Each resume (a header with ``resumed_at``) is a dashed vertical line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from fastfm.commands.helpformat import parser
from fastfm.run.rundir import METRICS, read_metrics

PNG = "curves.png"
MARKER_MAX_POINTS = 30
"""Series with fewer points are drawn with a marker on each."""


@dataclass(frozen=True)
class Series:
    """One curve: ``values`` at ``steps``; ``errors`` (one standard error, NaN where unknown) or None."""

    label: str
    steps: list[int]
    values: list[float]
    errors: list[float] | None = None


@dataclass(frozen=True)
class Panel:
    """One plot of the figure."""

    title: str
    series: list[Series]
    log_y: bool = False  # only where every value is > 0


@dataclass(frozen=True)
class Curves:
    """What the figure shows."""

    panels: list[Panel]  # the panels with data, in drawing order
    resumes: list[int]  # steps where a resumed run started


def _series(label: str, points: list[tuple[int, Any]], errors: list[Any] | None = None) -> Series:
    """The points whose value is a number (a skipped interval logs loss None); errors None where none is known."""
    keep = [i for i, (_, v) in enumerate(points) if isinstance(v, (int, float))]
    errs = None
    if errors is not None and any(errors[i] is not None for i in keep):
        errs = [math.nan if errors[i] is None else float(errors[i]) for i in keep]
    return Series(label, [points[i][0] for i in keep], [float(points[i][1]) for i in keep], errs)


def _panel(title: str, series: list[Series], log: bool = False) -> Panel:
    series = [s for s in series if s.steps]
    return Panel(title, series, log and all(v > 0 for s in series for v in s.values))


def evaluations(records: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(step, evaluation) of each ``eval`` record and of the ``final`` one (at its ``steps``)."""
    return [(r["step"], r["eval"]) if "eval" in r else (r["final"]["steps"], r["final"])
            for r in records if "eval" in r or "final" in r]


def nll_series(evals: list[tuple[int, dict[str, Any]]]) -> Series:
    """Test NLL per evaluation with its standard error: bits/dim if any evaluation reports it, else nats."""
    tests = [(step, ev["test"]) for step, ev in evals if ev.get("test")]
    key = "bits_per_dim" if any("bits_per_dim" in t for _, t in tests) else "nll_nats"
    label = "bits/dim" if key == "bits_per_dim" else "nats"
    return _series(label, [(s, t.get(key)) for s, t in tests], [t.get(f"{key}_stderr") for _, t in tests])


def quality_series(evals: list[tuple[int, dict[str, Any]]]) -> list[Series]:
    """One series per sample-quality distance the evaluations report."""
    quality = [(step, ev["quality"]) for step, ev in evals if ev.get("quality")]
    keys = list(dict.fromkeys(k for _, q in quality for k in q))
    return [_series(k, [(s, q.get(k)) for s, q in quality]) for k in keys]


def curves(records: list[dict[str, Any]]) -> Curves:
    """The curves of a run's metrics.jsonl records (in file order; a resumed run's repeated header included)."""
    train = [r for r in records if "loss" in r and "step" in r]

    def train_series(key: str, label: str) -> Series:
        return _series(label, [(r["step"], r.get(key)) for r in train])

    evals = evaluations(records)
    nll = nll_series(evals)
    panels = [_panel("training loss", [train_series("loss", "loss")], log=True),
              _panel("learning rate", [train_series("lr", "lr")]),
              _panel("throughput (samples/s)", [train_series("samples_per_s", "samples/s")]),
              _panel(f"test NLL ({nll.label}, ± 1 s.e.)", [nll]),
              _panel("sample quality", quality_series(evals), log=True)]
    resumes = [r["header"]["resumed_at"] for r in records if r.get("header", {}).get("resumed_at") is not None]
    return Curves([p for p in panels if p.series], resumes)


def draw(c: Curves, png: Path, title: str) -> None:
    """The panels in a grid of up to three columns, one step axis shared by all, resumes marked on each."""
    cols = min(len(c.panels), 3)
    rows = math.ceil(len(c.panels) / cols)
    fig = Figure(figsize=(4.8 * cols, 3.4 * rows), layout="constrained")
    first = None
    for i, panel in enumerate(c.panels):
        ax = fig.add_subplot(rows, cols, i + 1, sharex=first)
        first = first or ax
        for s in panel.series:
            marker = "o" if len(s.steps) < MARKER_MAX_POINTS else None
            ax.errorbar(s.steps, s.values, yerr=s.errors, marker=marker, markersize=3, capsize=3, label=s.label)
        for j, step in enumerate(c.resumes):
            ax.axvline(step, color="grey", linestyle="--", linewidth=1, label="resumed" if j == 0 else None)
        if panel.log_y:
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(LogFormatter())  # 4.8, not 4.8 x 10^0, within a decade
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(panel.series) > 1 or c.resumes:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(png, dpi=100)


def plot_run(run_dir: Path, png: Path | None = None) -> Path:
    """Draw ``run_dir``'s curves to ``png`` (default RUN_DIR/curves.png); ValueError (one line) where it is no
    run directory or has logged no step yet."""
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a directory")
    if not (run_dir / METRICS).is_file():
        raise ValueError(f"{run_dir} is not a run directory: it has no {METRICS} (python -m fastfm.train --out "
                         f"{run_dir} writes one)")
    c = curves(read_metrics(run_dir))
    if not c.panels:
        raise ValueError(f"{run_dir / METRICS} holds no training step or evaluation yet: nothing to plot")
    png = png or run_dir / PNG
    draw(c, png, str(run_dir))
    return png


def main(argv: list[str] | None = None) -> None:
    p = parser("curves", "Draw a training run's curves (loss, learning rate, throughput, test NLL with error "
                         "bars, sample quality; resumes marked) from its metrics.jsonl to one PNG.")
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run's directory (train's --out)")
    p.add_argument("--out", type=Path, default=None, help=f"the PNG to write (default: RUN_DIR/{PNG})")
    args = p.parse_args(argv)
    try:
        print(plot_run(args.run_dir, args.out))
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
