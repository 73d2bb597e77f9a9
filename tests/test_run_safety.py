"""Run safety of ``python -m fastfm.train``: an existing run is never overwritten by accident, --resume
needs a checkpoint and has something to do, numeric options are range-checked, a resumed run
cleans up after a kill (stale temporary files, metrics rows past the checkpoint), the warm-up step
stays out of the throughput, and --help is grouped and complete."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest

from fastfm import train

from fastfm.training import trainer
from fastfm.commands.train import parse_config
from fastfm.training.config import TrainConfig
from fastfm.data import DATASETS

from conftest import call, cli_error, help_text, run_training, train_argv

RUN_MARKERS = ("checkpoint.pt", "ema.safetensors", "commit.json")
STALE_TEMPS = (".checkpoint.pt.a1b2c3.tmp", ".ema.safetensors.x9y8.tmp", ".model.json.q_w3.tmp",
               ".metrics.jsonl.zz01.tmp")


def train_error(argv: list[str]) -> str:
    return cli_error(train.main, argv)


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-step run (checkpoint at step 3); tests work on copies of it."""
    out = tmp_path_factory.mktemp("base") / "run"
    run_training(out, "--data", "moons")
    return out


@pytest.fixture
def run_copy(base_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# 1. An existing run directory is not replaced without --force
# ---------------------------------------------------------------------------------------------


def test_training_into_an_existing_run_needs_force(run_copy: Path) -> None:
    before = snapshot(run_copy)
    msg = train_error(train_argv(run_copy, "--data", "moons", steps=2))
    assert str(run_copy) in msg and "--force" in msg and "--resume" in msg, msg
    assert snapshot(run_copy) == before  # nothing written
    run = run_training(run_copy, "--data", "moons", "--force", steps=2)
    assert [r["step"] for r in metric_rows(run_copy) if "loss" in r] == [1, 2]
    assert run.summary["steps"] == 2


@pytest.mark.parametrize("marker", RUN_MARKERS)
def test_any_run_file_marks_a_run_directory(tmp_path: Path, marker: str) -> None:
    (tmp_path / marker).write_text("x")
    msg = train_error(train_argv(tmp_path, "--data", "moons"))
    assert marker in msg and "--force" in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == [marker]


def test_metrics_of_a_run_without_a_checkpoint_do_not_block_a_retry(tmp_path: Path) -> None:
    """A run that ended before its first checkpoint (killed, or stopped by a full disk) left its metrics and
    config (even empty ones): the same command again trains, no --force needed."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (tmp_path / "config.json").write_text("")
    run = run_training(tmp_path, "--data", "moons", steps=2)
    assert run.summary["steps"] == 2 and [r["step"] for r in metric_rows(tmp_path) if "loss" in r] == [1, 2]


# ---------------------------------------------------------------------------------------------
# 2. --resume needs a checkpoint
# ---------------------------------------------------------------------------------------------


def test_resume_without_a_checkpoint_is_an_error(tmp_path: Path) -> None:
    out = tmp_path / "typo"
    msg = train_error(train_argv(out, "--data", "moons", "--resume"))
    assert str(out) in msg and "no checkpoint.pt" in msg, msg
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 3. Every numeric option is range-checked
# ---------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("grad_clip", "-1", ">= 0"), ("grad_clip", "nan", ">= 0"),
    ("lr", "0", "positive"), ("lr", "inf", "positive"), ("lr", "nan", "positive"),
    ("weight_decay", "-0.01", ">= 0"),
    ("warmup", "-1", ">= 0"),
    ("steps", "0", ">= 1"), ("batch_size", "0", ">= 1"), ("grad_accum", "0", ">= 1"),
    ("eval_steps", "-1", ">= 0"), ("eval_n", "0", ">= 1"), ("n_samples", "0", ">= 1"),
    ("ema_halflife_kimg", "-1", "positive"), ("ema_rampup", "-0.1", ">= 0"),
    ("label_dropout", "1", "in [0, 1)"), ("label_dropout", "-0.1", "in [0, 1)"),
    ("superres", "-2", ">= 0"), ("max_bad_steps", "0", ">= 1"),
    ("log_every", "0", ">= 1"), ("ckpt_every", "0", ">= 1"), ("eval_every", "-1", ">= 0"),
    ("seed", "-1", "in [0, 9223372036854775808)"),
]


@pytest.mark.parametrize("name,value,allowed", BAD_VALUES, ids=[f"{n}={v}" for n, v, _ in BAD_VALUES])
def test_numeric_option_out_of_range(tmp_path: Path, name: str, value: str, allowed: str) -> None:
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        parse_config(train_argv(out, f"--{name.replace('_', '-')}={value}"))
    msg = str(e.value.code)
    assert msg.startswith(f"error: {name} must be {allowed}, got "), msg


def test_every_numeric_option_has_a_range() -> None:
    hints = typing.get_type_hints(TrainConfig)
    numeric = [f for f in dataclasses.fields(TrainConfig) if hints[f.name] in (int, float)]
    assert numeric
    assert [f.name for f in numeric if f.metadata.get("range") is None] == []


def test_range_boundaries_are_accepted() -> None:
    TrainConfig(grad_clip=0.0, weight_decay=0.0, warmup=0, ema_rampup=0.0, label_dropout=0.0, superres=0,
                eval_every=0, seed=0, steps=1, batch_size=1, log_every=1, ckpt_every=1).validate()


# ---------------------------------------------------------------------------------------------
# 4. --resume with nothing left to do
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [3, 2])
def test_resume_with_nothing_to_do(run_copy: Path, steps: int) -> None:
    before = snapshot(run_copy)
    stdout = call(train.main, train_argv(run_copy, "--data", "moons", "--resume", steps=steps))
    assert stdout.strip() == f"nothing to do: the run in {run_copy} is complete at step 3 (raise --steps to go on)"
    assert snapshot(run_copy) == before


# ---------------------------------------------------------------------------------------------
# 5. and 6. A resumed run cleans up after a kill
# ---------------------------------------------------------------------------------------------


def test_resume_removes_stale_temporary_files(run_copy: Path) -> None:
    for name in (*STALE_TEMPS, ".notes.tmp"):
        (run_copy / name).write_bytes(b"half a file")
    run_training(run_copy, "--data", "moons", "--resume", steps=4)
    assert not [n for n in STALE_TEMPS if (run_copy / n).exists()]
    assert (run_copy / ".notes.tmp").exists()  # not a file of this run's atomic writers


def test_new_run_removes_stale_temporary_files(tmp_path: Path) -> None:
    for name in STALE_TEMPS:
        (tmp_path / name).write_bytes(b"half a file")
    run_training(tmp_path, "--data", "moons", steps=1)
    assert not [p.name for p in tmp_path.glob(".*")]


def test_resume_drops_metric_rows_logged_after_the_checkpoint(run_copy: Path) -> None:
    """The killed run logged steps 4 and 5 (and an evaluation, and half a line) after its checkpoint at 3."""
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.0}\n{"step": 4, "eval": {}}\n{"step": 5, "loss": 1.0}\n{"step": 6, "lo')
    run_training(run_copy, "--data", "moons", "--resume", steps=5)
    rows = metric_rows(run_copy)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
    assert not [r for r in rows if "eval" in r]
    assert "final" in rows[-1] and rows[-1]["final"]["steps"] == 5


# ---------------------------------------------------------------------------------------------
# 7. The warm-up (compilation) step is not counted into the throughput and the ETA
# ---------------------------------------------------------------------------------------------


def test_first_step_is_kept_out_of_rate_and_eta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock: the first step takes 100 s (compilation), every later one 0.01 s."""
    clock = {"t": 0.0, "first_done": None}
    real_step = trainer.Trainer.train_step

    def timed_step(self: trainer.Trainer, step: int):
        result = real_step(self, step)
        clock["t"] += 0.01 if clock["first_done"] else 100.0
        clock["first_done"] = clock["first_done"] or time.time()
        return result

    bars: list = []

    class Bar(trainer.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=lambda: clock["t"]))
    monkeypatch.setattr(trainer.Trainer, "train_step", timed_step)
    monkeypatch.setattr(trainer, "tqdm", Bar)
    run = run_training(tmp_path / "run", "--data", "moons", "--log-every", "2", steps=4)
    rates = [r["samples_per_s"] for r in metric_rows(run.dir) if "loss" in r]
    assert rates == [pytest.approx(64 / 0.01), pytest.approx(2 * 64 / 0.02)]
    assert run.summary["wall_s"] == pytest.approx(100.03)  # the wall time still counts it
    (bar,) = bars
    assert bar.start_t >= clock["first_done"], "the progress bar's timer counts the warm-up step"


def test_a_first_interval_of_only_the_warm_up_step_still_has_a_rate(tmp_path: Path) -> None:
    run = run_training(tmp_path / "run", "--data", "moons", "--log-every", "1", steps=2)
    assert all(r["samples_per_s"] > 0 for r in metric_rows(run.dir) if "loss" in r)


# ---------------------------------------------------------------------------------------------
# 8. --help
# ---------------------------------------------------------------------------------------------

GROUPS = ("data", "model", "path and target", "training", "optimisation", "evaluation", "output and checkpoints",
          "device and performance")


def help_sections(text: str) -> dict[str, dict[str, str]]:
    """{group title: {--flag: its help text}} from argparse's --help output."""
    sections: dict[str, dict[str, str]] = {}
    entries: dict[str, str] = {}
    flag = ""
    for line in text.splitlines():
        if re.match(r"^\S.*:$", line):
            entries = sections.setdefault(line[:-1], {})
        elif m := re.match(r"^  (--[\w-]+)\S*(?: \S+)*?(?:\s{2,}(.*))?$", line):  # flag, metavar, help
            flag = m.group(1)
            entries[flag] = m.group(2) or ""
        elif line.startswith("   ") and flag:
            entries[flag] += " " + line.strip()
    return {title: {k: " ".join(v.split()) for k, v in e.items()} for title, e in sections.items()}


def test_help_is_grouped_with_defaults() -> None:
    text = help_text(train.main)
    assert text.startswith("usage: python -m fastfm.train "), text[:200]
    sections = help_sections(text)
    assert [t for t in sections if t in GROUPS] == list(GROUPS), list(sections)
    grouped = {flag: (title, h) for title in GROUPS for flag, h in sections[title].items()}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in grouped, f"{flag} is in no group"
        title, h = grouped[flag]
        assert re.match(r"[a-zA-Z]", h), f"{flag} has no help text: {h!r}"
        if f.default is not False and f.default is not dataclasses.MISSING:  # off flags, empty dicts: none
            assert f"(default: {f.default})" in h, f"{flag} shows no default: {h!r}"
    assert grouped["--steps"][1] == "optimizer steps; >= 1 (default: 5000)"
    assert grouped["--grad-clip"][1] == "max gradient norm (0: off); >= 0 (default: 1.0)"
    assert grouped["--force"][0] == grouped["--resume"][0] == "output and checkpoints"
    data_help = grouped["--data"][1]
    assert all(name in data_help for name in DATASETS), data_help
