"""TensorBoardLog: metrics.jsonl records written as event files and read back with TensorBoard's own reader
(scalar tags, values, steps; a resume's purge), and the one-line error without the tensorboard package."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fastfm.run.tensorboard import TensorBoardLog, TensorBoardMissing

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="needs the tensorboard package (pip install 'fastfm[tensorboard]')")

HEADER = {"hardware": {"device": "cpu"}, "world": 1, "resumed_at": None}


def train_row(step: int, loss: float | None) -> dict:
    return {"step": step, "loss": loss, "lr": 0.5 * step, "samples_per_s": 100.0 * step, "skipped_steps": 0}


EVAL = {"test": {"nll_nats": 3.0, "nll_nats_stderr": 0.25, "nfe": 8, "n": 50, "solver": "euler"},
        "quality": {"energy_distance": 0.125}, "samples_png": "s.png", "sample_nfe": 4,
        "eval_plan": {"seconds": 1.5, "replans": [{}]}}  # strings and lists are no scalars
FINAL = {**EVAL, "test": {"nll_nats": 2.5, "nll_nats_stderr": 0.125, "bits_per_dim": 1.75}, "steps": 3,
         "world": 1, "wall_s": 9.0, "last": train_row(3, 1.0), "skipped_steps": 0}


def logged(out: Path, records: list[dict]) -> None:
    log = TensorBoardLog(out)
    for record in records:
        log.write(record)
    log.close()


def read_back(out: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, str]]]]:
    """{tag: [(step, value)]} of every scalar under OUT/tensorboard, and {tag: [(step, text)]} of every text."""
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()
    texts = {t: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(t)] for t in tags["tensors"]}
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}, texts


def test_records_become_scalars(tmp_path: Path) -> None:
    logged(tmp_path, [{"header": HEADER}, train_row(1, 2.0), train_row(2, None), {"step": 2, "eval": EVAL},
                      train_row(3, 1.0), {"final": FINAL}])
    scalars, texts = read_back(tmp_path)
    ((step, header),) = texts.pop("run/header/text_summary")  # SummaryWriter.add_text's tag suffix
    assert step == 0 and '"device": "cpu"' in header and not texts
    assert scalars == {
        "train/loss": [(1, 2.0), (3, 1.0)],  # None (every step skipped) is left out
        "train/lr": [(1, 0.5), (2, 1.0), (3, 1.5)],
        "train/samples_per_s": [(1, 100.0), (2, 200.0), (3, 300.0)],
        "train/skipped_steps": [(1, 0.0), (2, 0.0), (3, 0.0)],
        "eval/test/nll_nats": [(2, 3.0), (3, 2.5)],  # the final evaluation at the run's last step
        "eval/test/nll_nats_stderr": [(2, 0.25), (3, 0.125)],
        "eval/test/nfe": [(2, 8.0)], "eval/test/n": [(2, 50.0)],
        "eval/test/bits_per_dim": [(3, 1.75)],
        "eval/quality/energy_distance": [(2, 0.125), (3, 0.125)],
        "eval/sample_nfe": [(2, 4.0), (3, 4.0)],
        "eval/eval_plan/seconds": [(2, 1.5), (3, 1.5)],
    }


def test_resume_hides_steps_after_checkpoint(tmp_path: Path) -> None:
    logged(tmp_path, [{"header": HEADER}, train_row(1, 4.0), train_row(2, 3.0), train_row(3, 2.0)])
    (first,) = (tmp_path / "tensorboard").iterdir()  # named by its start second: make it the earlier process's
    first.rename(first.with_name("events.out.tfevents.0000000001.host.1.0"))
    logged(tmp_path, [{"header": {**HEADER, "resumed_at": 1}}, train_row(2, 2.5)])  # killed after step 3
    scalars, texts = read_back(tmp_path)
    assert scalars["train/loss"] == [(1, 4.0), (2, 2.5)]
    assert [step for step, _ in texts["run/header/text_summary"]] == [0, 1]  # each process's start


def test_missing_tensorboard_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ModuleNotFoundError
    with pytest.raises(TensorBoardMissing, match=r"pip install tensorboard") as e:
        TensorBoardLog(tmp_path)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
