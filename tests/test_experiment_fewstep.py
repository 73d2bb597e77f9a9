"""The ``fewstep`` experiment (fastfm.experiments.fewstep): its tiny scale end to end (every method at every NFE,
finite numbers, the files), its runs' configurations at every scale, and its verdicts read off the numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fastfm.data import get_dataset
from fastfm.experiments import fewstep, run_experiment
from fastfm.experiments.common import SCALES
from fastfm.experiments.fewstep import NFE, STUDENTS, SWEEP, best_at, settings_at, trainings
from fastfm.experiments.report import Report
from fastfm.training.assemble import model_for
from fastfm.training.config import TrainConfig

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return run_experiment("fewstep", scale="tiny", out=tmp_path_factory.mktemp("fewstep"), progress=False).parent


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_tiny_scale_measures_every_method_at_every_nfe(folder: Path) -> None:
    results = json.loads((folder / "results.json").read_text())
    assert results["experiment"] == "fewstep" and results["scale"] == "tiny"
    assert (folder / "report.md").read_text().startswith("# One and few calls")
    by_data = results["data"]["results"]
    assert set(by_data) == set(fewstep.SIZES["tiny"]["data"])
    for d, r in by_data.items():
        vector = r["measure"] == "sliced W2"
        assert set(r["quality"]) == set(SWEEP)
        for label, (_, solver) in SWEEP.items():
            assert list(r["quality"][label]) == [str(k) for k in NFE]
            for k in NFE:
                q, e = r["quality"][label][str(k)], r["energy"][label][str(k)]
                if settings_at(solver, k) is None:  # midpoint below 2 calls, rk4 below 4
                    assert q is None and e is None, (d, label, k)
                else:
                    assert _finite(q) and q >= 0, (d, label, k, q)
                    assert _finite(e) if vector else e is None, (d, label, k, e)
        assert all(_finite(v) for v in (r["reference"]["quality"], r["reference"]["spread"], r["reference"]["nfe"]))
        assert set(r["cost"]) == {"teacher", "pairs", *STUDENTS} and all(v > 0 for v in r["cost"].values())
        for model in ("teacher", "reflow"):
            assert all(_finite(v) and v >= 0 for v in r["transport"][model].values())
    cost = next(t for t in results["tables"] if t["key"] == "cost")
    for d, method, own, teacher, pairs, total in cost["rows"]:
        assert total == pytest.approx(own + teacher + pairs)
        assert (teacher > 0) == (method == "reflow"), (d, method)
    assert {"quality_vs_nfe.png", *(f"samples_{d}.png" for d in by_data)} <= {f["file"] for f in results["figures"]}
    for fig in results["figures"]:
        assert (folder / fig["file"]).read_bytes()[:8] == PNG
    claims = [c["claim"] for c in results["claims"]]
    assert any("1 call reaches a sliced W2 within 1.5x" in c for c in claims)
    assert any("2 calls reach a sliced W2 within 1.2x" in c for c in claims)
    assert any("digits: one call reaches a classifier Fréchet distance within 2x" in c for c in claims)


@pytest.mark.parametrize("solver, nfe, steps", [("euler", 3, 3), ("midpoint", 1, None), ("midpoint", 6, 3),
                                                ("rk4", 2, None), ("rk4", 8, 2), ("flowmap", 16, 16)])
def test_settings_at_divides_the_calls_by_the_calls_per_step(solver: str, nfe: int, steps: int | None) -> None:
    assert settings_at(solver, nfe) == (None if steps is None else {"solver": solver, "steps": steps})


@pytest.mark.parametrize("scale", SCALES)
def test_every_scale_trains_valid_configs(scale: str, tmp_path: Path) -> None:
    """Each run of every scale (``--scale gpu`` included) is a valid TrainConfig whose model builds for its data; a
    student has its teacher's model and batch, reflow trains on the teacher's pairs from the teacher's weights."""
    runs = trainings(scale, tmp_path)
    for d in fewstep.SIZES[scale]["data"]:
        teacher = runs[f"{d}-teacher"]
        data = get_dataset(d)
        for name in ("teacher", *STUDENTS):
            options = runs[f"{d}-{name}"]
            cfg = TrainConfig(**options).validate()
            assert (cfg.model_args, cfg.batch_size) == (teacher["model_args"], teacher["batch_size"])
            with torch.device("meta"):
                model = model_for(cfg, data)
            assert model.flow_map == (name in ("meanflow", "shortcut")), (d, name)
        reflow = runs[f"{d}-reflow"]
        assert reflow["data"] == f"reflow:{tmp_path / 'pairs' / d}"
        assert reflow["init"] == str(tmp_path / "runs" / f"{d}-teacher")


def _result(one: float, two: float, reference: float, straight: float) -> dict[str, Any]:
    """Results of a vector data set: every line at ``two`` (2 calls and up); one call: meanflow's at ``one``, the
    teacher's Euler at 3, the other students' at 2.5; spreads 0.01."""
    quality = {label: {str(k): None if settings_at(solver, k) is None else (2.5 if k == 1 else two) for k in NFE}
               for label, (_, solver) in SWEEP.items()}
    quality["meanflow"]["1"], quality["teacher euler"]["1"] = one, 3.0
    spread = {label: {"1": 0.01, "2": 0.01} for label in SWEEP}
    transport = {"teacher": {"straightness": 1.0, "straightness_spread": 0.01},
                 "reflow": {"straightness": straight, "straightness_spread": 0.01}}
    return {"measure": "sliced W2", "quality": quality, "spread": spread, "transport": transport,
            "reference": {"quality": reference, "spread": 0.01}}


def _verdicts(r: dict[str, Any]) -> dict[str, bool | None]:
    report = Report("fewstep", "F", "tiny")
    fewstep._claims(report, {"d": r})
    return {c["claim"]: c["holds"] for c in report.claims}


def test_goals_and_claims_follow_the_numbers() -> None:
    """The goals compare the best line at 1 and 2 calls with 1.5x and 1.2x the reference, beyond 2 x the noise
    (0.01 each: a bound noise of sqrt(0.01^2 + (ratio 0.01)^2)); the students' claims and reflow's straightness
    flip with their numbers."""
    good = _verdicts(_result(one=1.2, two=1.1, reference=1.0, straight=0.5))
    assert set(good.values()) == {True}, good
    bad = _verdicts(_result(one=1.8, two=1.3, reference=1.0, straight=1.5))
    goals = {c: v for c, v in bad.items() if "reference solve" in c}
    assert len(goals) == 2 and set(goals.values()) == {False}
    assert bad["d: one call of meanflow beats one Euler call of the teacher"] is True  # 1.8 < 3
    assert bad["d: reflow straightens the teacher's trajectories (lower straightness S)"] is False
    worse = _result(one=1.2, two=1.1, reference=1.0, straight=0.5)
    worse["quality"]["shortcut"]["1"], worse["quality"]["reflow euler"]["1"] = 3.5, 3.01
    flipped = _verdicts(worse)
    assert flipped["d: one call of shortcut beats one Euler call of the teacher"] is False
    assert flipped["d: one call of reflow euler beats one Euler call of the teacher"] is None
    near = _verdicts(_result(one=1.51, two=1.19, reference=1.0, straight=0.99))
    assert [v for c, v in near.items() if "reference solve" in c or "straightens" in c] == [None, None, None]


def test_best_at_picks_the_lowest_line_that_reaches_the_calls() -> None:
    r = _result(one=1.2, two=1.1, reference=1.0, straight=0.5)
    r["quality"]["teacher rk4"]["4"] = 0.5
    assert best_at(r, 1) == ("meanflow", 1.2)
    assert best_at(r, 4) == ("teacher rk4", 0.5)
    assert best_at(r, 4, ("teacher euler", "shortcut")) == ("teacher euler", 1.1)
