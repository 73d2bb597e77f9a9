"""``python -m fastfm.curves``: the series read from a synthetic metrics.jsonl (torn line, resume, evaluations
with and without a test NLL), the PNG drawn, and one-line errors for what is not a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from fastfm.commands import curves
from fastfm.run.rundir import read_metrics

from conftest import PNG_MAGIC, call, cli_error

HEADER = {"hardware": {"device": "cpu"}, "world": 1}


def train_row(step: int, loss: float | None) -> dict:
    return {"step": step, "loss": loss, "grad_norm": 1.0, "lr": 1e-3 * step, "samples_per_s": 100.0 + step,
            "sec_per_kimg": 1.0, "peak_mem_mb": 10.0, "tflops": 0.1, "skipped_steps": 0}


def quality(step: int) -> dict:
    return {"energy_distance": 0.1 / step, "sliced_wasserstein": 1.0 / step}


VECTOR_RUN = [
    {"header": {**HEADER, "resumed_at": None}},
    train_row(10, 2.0), train_row(20, 1.5),
    {"step": 20, "eval": {"test": {"nll_nats": 3.0, "nll_nats_stderr": 0.2, "nfe": 8, "n": 50},
                          "quality": quality(20), "transport": {"kinetic_energy": 2.0}, "sample_nfe": 4}},
    train_row(30, 1.2),
    train_row(40, 1.1),  # logged after the checkpoint at 30, then dropped by the resume (trainer) or torn here:
    {"header": {**HEADER, "resumed_at": 30}},
    train_row(40, 1.0), train_row(50, None),  # every step of that interval skipped: no loss, the rest logged
    {"step": 50, "eval": {"test": None, "quality": quality(50), "sample_nfe": 4}},
    {"final": {"test": {"nll_nats": 2.5, "nll_nats_stderr": 0.1, "nfe": 8, "n": 50}, "quality": quality(60),
               "steps": 60, "wall_s": 1.0, "last": train_row(60, 0.9)}},
]


def write_run(run_dir: Path, records: list[dict], torn_after: int | None = None) -> Path:
    """metrics.jsonl of ``records``; with ``torn_after``, record ``torn_after`` cut mid-line (a kill)."""
    lines = [json.dumps(r) for r in records]
    if torn_after is not None:
        lines[torn_after] = lines[torn_after][: len(lines[torn_after]) // 2]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def series(c: curves.Curves, title_start: str) -> list[curves.Series]:
    (panel,) = [p for p in c.panels if p.title.startswith(title_start)]
    return panel.series


def test_series_of_a_resumed_vector_run(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", VECTOR_RUN, torn_after=5)  # the pre-resume step 40 row, torn
    c = curves.curves(read_metrics(run))
    assert [p.title for p in c.panels] == ["training loss", "learning rate", "throughput (samples/s)",
                                           "test NLL (nats, ± 1 s.e.)", "sample quality"]
    assert c.resumes == [30]
    (loss,) = series(c, "training loss")
    assert (loss.steps, loss.values, loss.errors) == ([10, 20, 30, 40], [2.0, 1.5, 1.2, 1.0], None)
    (lr,) = series(c, "learning rate")
    assert lr.steps == [10, 20, 30, 40, 50] and lr.values == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])
    (rate,) = series(c, "throughput")
    assert rate.values == [110.0, 120.0, 130.0, 140.0, 150.0]
    (nll,) = series(c, "test NLL")  # the step-50 evaluation has no test NLL; the final one is at the last step
    assert (nll.steps, nll.values, nll.errors) == ([20, 60], [3.0, 2.5], [0.2, 0.1])
    dist, sw = series(c, "sample quality")
    assert (dist.label, dist.steps, sw.label) == ("energy_distance", [20, 50, 60], "sliced_wasserstein")
    assert sw.values == pytest.approx([1 / 20, 1 / 50, 1 / 60])
    assert [p.log_y for p in c.panels] == [True, False, False, False, True]


def test_image_run_plots_bits_per_dim_without_quality(tmp_path: Path) -> None:
    bpd = {"nll_nats": 900.0, "nll_nats_stderr": 3.0, "bits_per_dim": 1.9, "bits_per_dim_stderr": 0.01}
    records = [{"header": {**HEADER, "resumed_at": None}}, train_row(5, -0.5), train_row(10, 0.5),
               {"step": 5, "eval": {"test": bpd, "sample_nfe": 4}},
               {"step": 8, "eval": {"test": {**bpd, "bits_per_dim_stderr": None}}},
               {"final": {"test": {"nll_nats": 880.0, "nll_nats_stderr": 2.0, "bits_per_dim": 1.8}, "steps": 10}}]
    c = curves.curves(read_metrics(write_run(tmp_path / "run", records)))
    assert [p.title for p in c.panels] == ["training loss", "learning rate", "throughput (samples/s)",
                                           "test NLL (bits/dim, ± 1 s.e.)"]
    assert not c.panels[0].log_y  # a loss <= 0 has no log scale
    (nll,) = c.panels[-1].series
    assert (nll.steps, nll.values, nll.errors[0]) == ([5, 8, 10], [1.9, 1.9, 1.8], 0.01)
    assert all(math.isnan(e) for e in nll.errors[1:])  # no standard error known: no bar
    assert c.resumes == []


def test_cli_writes_png(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", VECTOR_RUN, torn_after=5)
    assert call(curves.main, [str(run)]).strip() == str(run / "curves.png")
    assert (run / "curves.png").read_bytes()[:8] == PNG_MAGIC
    with Image.open(run / "curves.png") as img:
        img.verify()
        width, height = img.size
    assert 1000 <= width <= 2000 and 500 <= height <= 1000, img.size  # 3 x 2 panels
    out = tmp_path / "elsewhere.png"
    call(curves.main, [str(run), "--out", str(out)])
    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("setup, message", [
    (lambda d: d / "missing", "is not a directory"),
    (lambda d: d, "is not a run directory: it has no metrics.jsonl"),
    (lambda d: write_run(d / "run", []), "holds no training step or evaluation yet"),
    (lambda d: write_run(d / "run", [{"header": HEADER}, train_row(3, 1.0)], torn_after=1),
     "holds no training step or evaluation yet"),
], ids=["missing", "no-metrics", "empty", "header-and-torn-line"])
def test_not_a_run_is_one_error_line(tmp_path: Path, setup, message: str) -> None:
    msg = cli_error(curves.main, [str(setup(tmp_path))])
    assert message in msg and "\n" not in msg


def test_unwritable_png_is_one_error_line(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", VECTOR_RUN)
    assert "No such file or directory" in cli_error(curves.main, [str(run), "--out", str(tmp_path / "no" / "x.png")])
