"""Entry points on bad or unusual input: one clear line instead of a traceback or a silent change, and sample
PNGs that say what drew them. Tiny in-process runs (see test_cli.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from fastfm import evaluate, sample, train
from fastfm.commands import common
from fastfm.commands import export as export_cli
from fastfm.data import to_pixels
from fastfm.evaluation.plotting import save_samples_png, tile
from fastfm.run.load import LoadedRun, load_run

from conftest import call, cli_error, last_json, train_argv

INFER = ["--device", "cpu", "--steps", "2"]
N_TEST = 40


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkerboard with a test split of N_TEST points, tiny MLP, 2 steps."""
    out = tmp_path_factory.mktemp("small") / "run"
    call(train.main, train_argv(out, "--data", "checkerboard", "--data-args", f"n_test={N_TEST}", steps=2))
    return out


@pytest.fixture
def png_titles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The texts of every figure saved while the test runs (titles included)."""
    titles: list[str] = []
    savefig = Figure.savefig

    def spy(fig: Figure, *args: object, **kwargs: object) -> None:
        titles.extend(t.get_text() for t in fig.texts)
        savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return titles


@pytest.mark.parametrize("kind, arg, needle", [
    ("image", "channel_mult=1", "unet model option channel_mult=1: expected a non-empty list of integers >= 1"),
    ("vector", "hidden=abc", "mlp model option hidden='abc': expected an integer >= 1"),
], ids=["unet", "mlp"])
def test_train_wrong_typed_model_args(tmp_path: Path, kind: str, arg: str, needle: str) -> None:
    data = tmp_path / "data.npy"
    np.save(data, np.zeros((40, 8, 8), np.uint8) if kind == "image" else np.zeros((40, 2), np.float32))
    out = tmp_path / "run"
    msg = cli_error(train.main, train_argv(out, "--data", f"npy:{data}", model=["--model-args", arg]))
    assert needle in msg and "\n" not in msg, msg
    assert not out.exists()


def test_evaluate_says_when_the_test_split_is_smaller(small_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--n and --n-samples above the test split evaluate all of it, say so on stderr and record both numbers."""
    res = last_json(call(evaluate.main, ["--checkpoint", str(small_run), "--n", "200000", "--n-samples", "300",
                                         *INFER]))
    assert (res["test"]["n"], res["test"]["n_asked"]) == (N_TEST, 200000)
    assert (res["quality"]["n"], res["quality"]["n_asked"]) == (N_TEST, 300)
    err = capsys.readouterr().err
    assert f"only {N_TEST} test points" in err and f"--n evaluates {N_TEST} of the 200000 asked" in err, err
    assert f"--n-samples evaluates {N_TEST} of the 300 asked" in err, err


def test_sample_refuses_nonfinite_samples(small_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model with NaN weights: one line saying how many samples are non-finite and why; nothing written."""
    def nan_weights(*args: object, **kwargs: object) -> LoadedRun:
        run = load_run(*args, **kwargs)
        for p in run.model.parameters():
            p.fill_(float("nan"))
        return run

    monkeypatch.setattr(common, "load_run", nan_weights)
    out = tmp_path / "s"
    msg = cli_error(sample.main, ["--checkpoint", str(small_run), "--n", "10", "--out", str(out), *INFER])
    assert "10 of 10 samples hold NaN/Inf" in msg and "weights" in msg and "\n" not in msg, msg
    assert not out.exists()


def test_sample_png_title_names_solver_steps_and_nfe(small_run: Path, tmp_path: Path, png_titles: list[str]) -> None:
    call(sample.main, ["--checkpoint", str(small_run), "--n", "20", "--out", str(tmp_path / "s"), *INFER])
    assert png_titles == ["checkerboard, condot, midpoint x 2, NFE 4"]


@pytest.mark.parametrize("kind, shape", [("vector", (5, 2)), ("image", (5, 1, 8, 8))])
def test_png_refuses_nonfinite_samples(tmp_path: Path, kind: str, shape: tuple[int, ...]) -> None:
    x = torch.zeros(shape)
    x[1].view(-1)[0], x[3].view(-1)[-1] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="2 of 5 samples hold NaN/Inf values"):
        save_samples_png(x, tmp_path / "s.png", kind, 17, title="t")
    assert not (tmp_path / "s.png").exists()


def test_digit_grid_is_readable_and_titled(tmp_path: Path, png_titles: list[str]) -> None:
    """64 8x8 digits: each drawn 64x64 pixels (nearest neighbour, pixel for pixel), under the given title."""
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_samples_png(x, tmp_path / "s.png", "image", 17, title="digits, condot, midpoint x 2, NFE 4")
    assert png_titles == ["digits, condot, midpoint x 2, NFE 4"]
    pixels = (to_pixels(x, 17).float() * 255 / 16).round().to(torch.uint8)
    canvas = tile(pixels)
    assert canvas.shape == (8 * 66 + 2, 8 * 66 + 2, 1)  # 8 x 8 cells of 64 pixels, 2-pixel gaps
    np.testing.assert_array_equal(canvas[2:66, 2:66, 0], np.kron(pixels[0, 0].numpy(), np.ones((8, 8), np.uint8)))
    with Image.open(tmp_path / "s.png") as im:
        png = np.asarray(im.convert("RGB"))[..., 0]
    assert png.shape[0] > canvas.shape[0] and png.shape[1] == canvas.shape[1]  # a title band above the grid
    np.testing.assert_array_equal(png[-canvas.shape[0]:], canvas[..., 0])


@pytest.mark.parametrize("argv, needle", [
    (["--diffusion", "0.5"], "--diffusion 0.5 applies to SDE sampling: add --sde"),
    (["--sde", "--solver", "dopri5"], "Euler-Maruyama: --solver dopri5 does not apply"),
    (["--grid", "0,0.5"], "--grid must span the solve from t = 0 to t = 1, got 0 .. 0.5"),
], ids=["diffusion-without-sde", "sde-with-dopri5", "short-grid"])
def test_sample_refuses_settings_it_would_ignore(small_run: Path, tmp_path: Path, argv: list[str],
                                                 needle: str) -> None:
    """Options that would be ignored or give wrong samples (exit 0 before): one line, nothing written."""
    out = tmp_path / "s"
    msg = cli_error(sample.main, ["--checkpoint", str(small_run), "--out", str(out), "--device", "cpu", *argv])
    assert needle in msg and "\n" not in msg, msg
    assert not out.exists()


def test_export_refuses_diffusion_without_sde(small_run: Path, tmp_path: Path) -> None:
    msg = cli_error(export_cli.main, ["--checkpoint", str(small_run), "--task", "sample", "--diffusion", "2",
                                      "--out", str(tmp_path / "e")])
    assert "--diffusion 2 applies to SDE sampling: add --sde" in msg
    assert not (tmp_path / "e").exists()


def test_a_grid_may_be_written_either_way(small_run: Path, tmp_path: Path) -> None:
    """Sampling runs noise -> data and the likelihood data -> noise whichever way the grid's times are written
    (the same samples and NLL both ways); a short grid is refused by evaluate too."""
    results = []
    for i, grid in enumerate(("0,0.5,1", "1,0.5,0")):
        argv = ["--checkpoint", str(small_run), "--device", "cpu", "--grid", grid]
        res = last_json(call(evaluate.main, [*argv, "--n", "8"]))
        call(sample.main, [*argv, "--n", "16", "--out", str(tmp_path / str(i))])
        results.append((res["test"]["nll_nats"], np.load(tmp_path / str(i) / "samples.npy")))
    assert results[0][0] == results[1][0] and np.array_equal(results[0][1], results[1][1])
    msg = cli_error(evaluate.main, ["--checkpoint", str(small_run), "--device", "cpu", "--grid", "0.5,1"])
    assert "--grid must span the solve from t = 0 to t = 1, got 0.5 .. 1" in msg


def test_interpolant_parameters_need_the_learned_path(tmp_path: Path) -> None:
    out = tmp_path / "run"
    msg = cli_error(train.main, train_argv(out, "--path", "condot", "--path-args", "lr=0.01"))
    assert "bad parameters for path 'condot'" in msg and "'lr'" in msg
    assert not out.exists()
