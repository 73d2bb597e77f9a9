"""The ``backbones`` experiment (fastfm.experiments.backbones): its tiny scale end to end (every backbone trained
for the steps its timing gave, finite numbers, the files), its runs' configurations and parameter counts at every
scale, and its verdicts read off the numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fastfm.data import get_dataset
from fastfm.experiments import backbones, run_experiment
from fastfm.experiments.backbones import BACKBONES, LIGHTNING, PARAMS_TOLERANCE, SITS, trainings
from fastfm.experiments.common import SCALES
from fastfm.experiments.report import Report
from fastfm.training.assemble import model_for
from fastfm.training.config import TrainConfig

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return run_experiment("backbones", scale="tiny", out=tmp_path_factory.mktemp("backbones"), progress=False).parent


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_tiny_scale_trains_every_backbone_for_its_timed_steps(folder: Path) -> None:
    """Each backbone trains round(budget x its timed steps per second) steps, saves its EMA weights and has every
    measure; images/s is steps x batch / training seconds; the figures are PNGs; six claims per data set."""
    results = json.loads((folder / "results.json").read_text())
    assert results["experiment"] == "backbones" and results["scale"] == "tiny"
    assert (folder / "report.md").read_text().startswith("# Backbones: UNet against SiT")
    size = backbones.SIZES["tiny"]
    by_data = results["data"]["results"]
    assert set(by_data) == set(size["data"])
    for d, by in by_data.items():
        runs = by["runs"]
        assert set(runs) == set(BACKBONES)
        batch = size["data"][d]["batch_size"]
        for key, r in runs.items():
            assert r["steps"] == max(1, round(size["budget_s"] * r["probe_steps_per_s"])), (d, key)
            assert r["images_per_s"] == pytest.approx(r["steps"] * batch / r["train_s"])
            for name in ("nll", "nll_stderr", "nll_nfe", "quality", "quality_spread", "sample_nfe", "train_s"):
                assert _finite(r[name]) and r[name] > 0, (d, key, name, r[name])
            assert "points" not in r  # the per-point NLLs stay out of the JSON
            assert [c["step"] for c in r["curve"]][-1] == r["steps"]
            assert all(_finite(c["frechet"]) and c["train_s"] > 0 for c in r["curve"])
            assert (folder / "runs" / f"{d}-{key}" / "model.json").is_file()
        assert runs["lightning"]["model_args"] == {**runs["sit"]["model_args"], **LIGHTNING}
        assert all(_finite(v) for v in by["floor"])
    main = next(t for t in results["tables"] if t["key"] == "main")
    assert [row[1] for row in main["rows"]] == [label for label, _, _ in BACKBONES.values()] * len(by_data)
    assert {"quality_vs_time.png", *(f"samples_{d}.png" for d in by_data)} == {f["file"] for f in results["figures"]}
    for fig in results["figures"]:
        assert (folder / fig["file"]).read_bytes()[:8] == PNG
    assert len(results["claims"]) == 6 * len(by_data)


@pytest.mark.parametrize("scale", SCALES)
def test_every_scale_pairs_backbones_of_about_the_same_size(scale: str) -> None:
    """Each run of every scale (``--scale gpu`` included, which no test can train here) is a valid TrainConfig
    whose model builds for its data set; the backbones of a data set share the batch, and each SiT's parameter
    count is within PARAMS_TOLERANCE of the UNet's."""
    runs = trainings(scale)
    for d in backbones.SIZES[scale]["data"]:
        data = get_dataset(d)
        params, batches = {}, set()
        for key in BACKBONES:
            cfg = TrainConfig(**runs[f"{d}-{key}"]).validate()
            assert not cfg.class_cond
            with torch.device("meta"):
                model = model_for(cfg, data)
            assert model.config["name"] == BACKBONES[key][1]
            params[key] = sum(p.numel() for p in model.parameters())
            batches.add(cfg.batch_size)
        assert len(batches) == 1, (d, batches)
        for key in SITS:
            assert abs(params[key] / params["unet"] - 1) <= PARAMS_TOLERANCE, (scale, d, key, params)


def _run(nll: float, quality: float, wobble: float = 0.0) -> dict[str, Any]:
    """A backbone's results: test bits/dim ``nll`` over 40 test points, each nll -+ ``wobble`` in turn, and the
    Fréchet distance ``quality`` with bootstrap spread 0.1."""
    points = nll + wobble * torch.tensor([-1.0, 1.0]).repeat(20)
    return {"nll": nll, "points": points, "quality": quality, "quality_spread": 0.1}


def _verdicts(runs: dict[str, dict[str, Any]]) -> dict[str, bool | None]:
    report = Report("backbones", "B", "tiny")
    backbones._claims(report, {"d": {"runs": runs}})
    return {c["claim"]: c["holds"] for c in report.claims}


def test_claims_follow_the_numbers() -> None:
    """A SiT lower in bits/dim and Fréchet distance than the UNet beats it; higher, it does not; within twice the
    noise (the paired differences' standard error, 0.05 x 2 / sqrt(40) and more; bootstrap spreads 0.1 each) it is
    not settled; LightningDiT's options against the plain SiT alike."""
    won = _verdicts({"unet": _run(2.5, 20.0), "sit": _run(2.3, 12.0), "lightning": _run(2.1, 8.0)})
    assert len(won) == 6 and set(won.values()) == {True}, won
    lost = _verdicts({"unet": _run(2.1, 8.0), "sit": _run(2.5, 20.0), "lightning": _run(2.3, 12.0)})
    assert lost["d: the SiT beats the UNet in the same training time: lower test bits/dim"] is False
    assert lost["d: the SiT + LightningDiT beats the UNet in the same training time: lower Fréchet distance"] is False
    assert lost["d: LightningDiT's options improve the SiT in the same training time: lower Fréchet distance"] is True
    near = _verdicts({"unet": _run(2.3, 8.0), "sit": _run(2.301, 8.2, wobble=0.05),
                      "lightning": _run(2.2995, 8.1, wobble=-0.05)})
    assert set(near.values()) == {None}, near
