"""The papers' experiments (fastfm.experiments): each runs end to end at the tiny scale, writes its report,
figures and JSON, and the Markdown shows exactly the JSON's numbers; the report pieces and metrics on their own."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable

import pytest
import torch

from fastfm.training.config import TrainConfig
from fastfm.data import get_dataset
from fastfm.experiments import EXPERIMENTS, conditional, interpolants, paths, run_experiment
from fastfm.experiments.__main__ import main
from fastfm.experiments.common import SCALES
from fastfm.experiments.conditional import _diversity, psnr
from fastfm.experiments.paths import _claims
from fastfm.experiments.report import Report, fmt
from fastfm.training.assemble import model_for

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The folder of an experiment's tiny-scale report, run once per module."""
    done: dict[str, Path] = {}

    def folder(name: str) -> Path:
        if name not in done:
            torch.manual_seed(0)
            out = tmp_path_factory.mktemp("experiments")
            done[name] = run_experiment(name, scale="tiny", out=out, progress=False).parent
        return done[name]
    return folder


@pytest.fixture(scope="module", params=list(EXPERIMENTS))
def written(request: pytest.FixtureRequest, reports: Callable[[str], Path]) -> tuple[str, Path]:
    return request.param, reports(request.param)


def _tables(markdown: str) -> dict[str, list[list[str]]]:
    """Markdown tables by the heading above them: rows of cell texts (header and rule left out)."""
    tables, title, lines = {}, None, markdown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            title = line[3:]
        elif line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip("|").split("|")])
            tables[title] = rows
    return tables


def _same(text: str, value: object) -> bool:
    """A Markdown cell shows the JSON value: the same text, and for numbers the same value to 4 digits."""
    if text != fmt(value):
        return False
    if isinstance(value, float) and math.isfinite(value):
        return math.isclose(float(text), value, rel_tol=5e-4, abs_tol=1e-300)
    return True


def test_report_files_are_written(written: tuple[str, Path]) -> None:
    name, folder = written
    results = json.loads((folder / "results.json").read_text())
    assert results["experiment"] == name and results["scale"] == "tiny"
    assert results["machine"]["torch"] == torch.__version__ and results["wall_s"] > 0
    assert results["tables"] and results["claims"] and results["figures"]
    markdown = (folder / "report.md").read_text()
    for fig in results["figures"]:
        png = folder / fig["file"]
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 2000, fig
        assert f"![{fig['caption']}]({fig['file']})" in markdown


def test_markdown_numbers_are_the_json_numbers(written: tuple[str, Path]) -> None:
    _, folder = written
    results = json.loads((folder / "results.json").read_text())
    tables = _tables((folder / "report.md").read_text())
    assert set(tables) == {t["title"] for t in results["tables"]}
    for t in results["tables"]:
        shown = tables[t["title"]]
        assert len(shown) == len(t["rows"]) and t["rows"]
        for row, cells in zip(t["rows"], shown):
            assert len(cells) == len(row)
            bad = [(c, v) for c, v in zip(cells, row) if not _same(c, v)]
            assert not bad, f"{t['title']}: {bad}"
    markdown = (folder / "report.md").read_text()
    verdicts = {True: "**holds**", False: "**does not hold**", None: "**not settled**"}
    for c in results["claims"]:
        line = next(ln for ln in markdown.splitlines() if c["claim"] in ln and ln.startswith("- "))
        assert line.startswith(f"- {verdicts[c['holds']]}:"), line
        for value in c["values"].values():
            assert fmt(value) in line, (value, line)


def test_every_number_is_finite_or_explained(written: tuple[str, Path]) -> None:
    """A table cell is a finite number or text; a missing one (None) has a note saying which solve failed."""
    _, folder = written
    results = json.loads((folder / "results.json").read_text())
    for t in results["tables"]:
        for row in t["rows"]:
            for cell in row:
                assert cell is None or not isinstance(cell, float) or math.isfinite(cell), (t["title"], row)
                if cell is None:
                    assert results["notes"], (t["title"], row)


def test_fmt_is_four_significant_digits() -> None:
    assert [fmt(v) for v in (3.14159, 12345.678, 1e-7, 7, None, True, "x")] == \
        ["3.142", "1.235e+04", "1e-07", "7", "n/a", "yes", "x"]


def test_report_claims_and_tables() -> None:
    r = Report("x", "X", "tiny")
    r.claim("a beats b", True, "a {a} vs b {b}", a=1.23456, b=2.0)
    assert r.claims[0]["evidence"] == "a 1.235 vs b 2"
    with pytest.raises(ValueError, match="do not have 2 cells"):
        r.table("t", "T", ["p", "q"], [[1, 2], [3]])


def test_paths_claims_follow_the_numbers() -> None:
    """The claims are read off the results: swap CondOT's and VP's numbers and each verdict flips."""
    def result(nll: float, nfe: int, q: float, bend: float) -> dict:
        points = nll + 0.01 * torch.randn(50, generator=torch.Generator().manual_seed(1))
        return {"nll": nll, "nll_unit": "nats", "sample_nfe": nfe, "sample_nfes": [nfe - 6, nfe, nfe + 6, nfe],
                "quality": q, "quality_spread": 0.001, "bend": bend, "bend_spread": 0.001, "points": points,
                "quality_at": {"euler": {"2": q}}, "euler_low_spread": 0.001,
                "curve": [{"step": 5, "nll": nll, "points": points}, {"step": 10, "nll": nll, "points": points}]}
    good, bad = result(3.0, 50, 0.1, 0.01), result(3.5, 90, 0.2, 0.2)
    size = {"nfe": [2, 4], "solve": {"solver": "dopri5"}}
    r1, r2 = Report("p", "P", "tiny"), Report("p", "P", "tiny")
    _claims(r1, {"d": {"CondOT": good, "VP": bad, "VP-eps": result(4.0, 120, 0.3, 0.3)}}, size)
    _claims(r2, {"d": {"CondOT": bad, "VP": good, "VP-eps": result(4.0, 120, 0.3, 0.3)}}, size)
    assert all(c["holds"] for c in r1.claims)
    flipped = [c["holds"] for c in r2.claims if "noise prediction" not in c["claim"]]
    assert flipped and not any(flipped)
    missing = {**good, "sample_nfes": None}
    r3 = Report("p", "P", "tiny")
    _claims(r3, {"d": {"CondOT": missing, "VP": bad, "VP-eps": bad}}, size)
    assert [c["holds"] for c in r3.claims if "FM-OT samples with fewer" in c["claim"]] == [None]
    # a fixed-step reference solve cannot test an NFE claim: 16 vs 16 is not settled, not 'does not hold'
    r5 = Report("p", "P", "tiny")
    _claims(r5, {"d": {"CondOT": good, "VP": bad, "VP-eps": bad}}, {"nfe": [2, 4], "solve": {"solver": "rk4",
                                                                                               "steps": 4}})
    nfe = [c for c in r5.claims if "NFE than" in c["claim"]]
    assert len(nfe) == 2 and all(c["holds"] is None and "fixed-step solver" in c["evidence"] for c in nfe)
    # an NLL difference within two paired standard errors is not settled either way
    # (the final NLL and the one half-way through training alike)
    near_points = good["points"] + 0.0005 + 0.05 * torch.randn(50, generator=torch.Generator().manual_seed(2))
    near = {**bad, "nll": 3.0005, "points": near_points,
            "curve": [{"step": 5, "nll": 3.0005, "points": near_points}, {"step": 10, "nll": 3.0005}]}
    r4 = Report("p", "P", "tiny")
    _claims(r4, {"d": {"CondOT": good, "VP": near, "VP-eps": bad}}, size)
    paired = [c for c in r4.claims if "FM-OT reaches" in c["claim"] or "trains faster" in c["claim"]]
    assert len(paired) == 2
    assert all(c["holds"] is None and "within 2 x the noise" in c["evidence"] for c in paired)


NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.]*\w)")
"""A number in text, not part of a name (x1, W2, 2D, 8x8, sin2)."""


def _json_numbers(value: object) -> list[float]:
    """Every number of a results.json: its numeric values, numeric keys and the numbers written in its texts."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, str):
        return [float(t) for t in NUMBER.findall(value)]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _json_numbers(k) + _json_numbers(v)]
    return [n for v in value for n in _json_numbers(v)]


def test_every_number_of_the_report_is_in_the_json(written: tuple[str, Path]) -> None:
    """Each number of report.md (introduction included) is one of results.json's, as shown (rounded to the
    digits the text gives): the introductions once quoted settings of another scale (dopri5's 1e-5 at the tiny
    scale, which solves with RK4 x 4)."""
    _, folder = written
    numbers = _json_numbers(json.loads((folder / "results.json").read_text()))
    shown = {d: {f"{v:.{d}g}" for v in numbers} for d in range(1, 17)}
    missing = []
    for token in NUMBER.findall((folder / "report.md").read_text()):
        digits = min(max(len(re.sub(r"e.*|[-.]", "", token).lstrip("0")), 1), 16)
        if f"{float(token):.{digits}g}" not in shown[digits]:
            missing.append(token)
    assert not missing, missing


def test_interpolants_report_tests_the_sde_explanation(reports: Callable[[str], Path]) -> None:
    """The SDE sweep runs the learned and the exact field at more steps, and the report states which explains
    the gap, from the numbers."""
    folder = reports("interpolants")
    results = json.loads((folder / "results.json").read_text())
    sweep = results["data"]["sde_sweep"]
    size = interpolants.SIZES["tiny"]
    assert set(sweep) == set(size["sde_sweep"]["eps"])
    for eps, s in sweep.items():
        assert s["steps"] == size["sde_steps"] + size["sde_sweep"]["more_steps"]
        assert len(s["learned"]) == len(s["exact"]) == len(s["steps"])
        claim = next(c for c in results["claims"] if f"at eps = {eps} misses the ODE" in c["claim"])
        assert any(words in claim["evidence"] for words in ("more steps close", "learned score's error",
                                                            "still improves", "exact field"))
def test_psnr_closed_form() -> None:
    ref = torch.rand(3, 1, 5, 7) * 1.6 - 0.8
    assert torch.allclose(psnr(ref + 0.2, ref), torch.full((3,), 20.0), atol=1e-4)  # [0,1] MSE 0.01
    assert torch.allclose(psnr(ref - 0.02, ref), torch.full((3,), 40.0), atol=1e-3)


def test_diversity_is_mean_pairwise_distance_within_classes() -> None:
    f = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0], [1.0, 3.0]])
    y = torch.tensor([0, 0, 1, 1, 1])
    # class 0: one pair at 5; class 1: distances 0, 2, 2 -> mean 4/3
    assert _diversity(f, y) == pytest.approx((5.0 + 4.0 / 3.0) / 2)


def test_cli_refuses_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["nosuch", "--scale", "tiny"])
    assert "unknown experiment 'nosuch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["paths", "--scale", "huge"])
    with pytest.raises(ValueError, match="unknown scale"):
        run_experiment("paths", scale="huge")
    assert re.search("paths", EXPERIMENTS.help_text())


@pytest.mark.parametrize("module", [paths, interpolants, conditional], ids=lambda m: m.__name__.rsplit(".", 1)[1])
@pytest.mark.parametrize("scale", SCALES)
def test_every_scale_trains_valid_configs(module: object, scale: str) -> None:
    """Each run of every scale (``--scale gpu`` included, which no test can train here) is a valid TrainConfig
    whose model builds for its data set."""
    runs = module.trainings(scale)
    assert runs
    for key, options in runs.items():
        cfg = TrainConfig(**options).validate()
        data = get_dataset(cfg.data, **cfg.data_args)
        with torch.device("meta"):
            model = model_for(cfg, data)
        assert sum(p.numel() for p in model.parameters()) > 0, key
