"""Tests for fastfm.run.checkpoint (atomic writes, safe loading) and fastfm.run.load.load_run."""

from __future__ import annotations

import json
import errno
import os
import pathlib
import shutil
from pathlib import Path

import pytest
import torch

import fastfm.run.checkpoint as ckpt_mod
from fastfm.run.load import load_run
from fastfm.run.checkpoint import (
    CHECKPOINT,
    COMMIT,
    EMA_WEIGHTS,
    META,
    CheckpointError,
    RunFileError,
    atomic_write,
    load_inference,
    load_training_state,
    save_inference,
    save_json,
    save_training_state,
)
from fastfm.data import get_dataset
from fastfm.models import build_model

from conftest import Run


def leftovers(d: Path) -> list[str]:
    """Temporary files atomic_write may have left behind (named .NAME.XXXX.tmp)."""
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


def assert_same(a, b) -> None:
    """Recursive equality of nested containers of tensors and plain values."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


# ---------------------------------------------------------------------------------------------
# atomic_write
# ---------------------------------------------------------------------------------------------


def test_atomic_write_replaces_and_creates_parents(tmp_path: Path) -> None:
    dest = tmp_path / "a" / "b" / "file.txt"
    atomic_write(dest, lambda tmp: Path(tmp).write_text("one"))
    assert dest.read_text() == "one"
    atomic_write(dest, lambda tmp: Path(tmp).write_text("two"))
    assert dest.read_text() == "two"
    assert leftovers(dest.parent) == []


@pytest.mark.parametrize("exc, raised", [(RuntimeError("disk full"), RunFileError), (KeyboardInterrupt(), KeyboardInterrupt)],
                         ids=["error", "interrupt"])
def test_atomic_write_failure_keeps_old_content(tmp_path: Path, exc: BaseException, raised: type) -> None:
    """A failed write: the old file as it was, no temporary, and (for an error) one line naming the file."""
    dest = tmp_path / "state.bin"
    dest.write_bytes(b"old content")

    def writer(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half of the new")
        raise exc

    with pytest.raises(raised, match=None if raised is KeyboardInterrupt else "cannot write .*state.bin: disk full"):
        atomic_write(dest, writer)
    assert dest.read_bytes() == b"old content"
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_atomic_write_failure_without_old_file(tmp_path: Path) -> None:
    def writer(tmp: str) -> None:
        Path(tmp).write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RunFileError, match="cannot write .*new.json: No space left on device"):
        atomic_write(tmp_path / "new.json", writer)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_writer_removing_tmp(tmp_path: Path) -> None:
    """A writer that fails after deleting its temporary file: the original error propagates."""
    def writer(tmp: str) -> None:
        os.unlink(tmp)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        atomic_write(tmp_path / "x", writer)
    assert list(tmp_path.iterdir()) == []


def test_save_training_state_interrupted_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / CHECKPOINT
    save_training_state({"step": 1, "w": torch.ones(3)}, path)

    def failing_save(obj, f, *a, **k):  # writes part of a file, then dies
        Path(f).write_bytes(b"PK\x03\x04 partial zip")
        raise OSError("interrupted")

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(RunFileError, match="interrupted"):
        save_training_state({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = load_training_state(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert leftovers(tmp_path) == []


def test_save_json(tmp_path: Path) -> None:
    save_json({"b": [1, 2.5, None], "a": {"x": "y"}}, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": {"x": "y"}, "b": [1, 2.5, None]}
    with pytest.raises(TypeError):
        save_json({"bad": object()}, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["a"] == {"x": "y"}
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Training state: torch.save + weights_only loading
# ---------------------------------------------------------------------------------------------


def _training_state() -> dict:
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "dim": 2, "hidden": 8, "depth": 2})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    model(torch.randn(4, 2), torch.rand(4)).pow(2).mean().backward()
    opt.step()
    sched.step()
    gen = torch.Generator().manual_seed(123)
    torch.rand(5, generator=gen)
    data = get_dataset("digits")
    data.sample(7, gen)
    return {"model": model.state_dict(), "ema": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "step": 42,
            "config": {"lr": 1e-3, "path_args": {"sigma_min": 0.0}, "model_args": {"channel_mult": [1, 2]},
                       "bf16": True, "source": "gaussian", "none": None},
            "meta": {"model": model.config, "data": {"shape": [2], "levels": None}},
            "rng": gen.get_state(), "data": data.state_dict()}


def test_training_state_round_trip(tmp_path: Path) -> None:
    state = _training_state()
    path = tmp_path / "sub" / CHECKPOINT
    save_training_state(state, path)
    loaded = load_training_state(path)
    assert_same(state, loaded)
    assert leftovers(path.parent) == []
    # The pieces restore: optimizer, generator stream, data-stream position.
    model = build_model(loaded["meta"]["model"])
    model.load_state_dict(loaded["model"])
    torch.optim.AdamW(model.parameters(), lr=1e-3).load_state_dict(loaded["optimizer"])
    g1, g2 = torch.Generator(), torch.Generator()
    g1.set_state(state["rng"])
    g2.set_state(loaded["rng"])
    assert torch.equal(torch.rand(10, generator=g1), torch.rand(10, generator=g2))
    data = get_dataset("digits")
    data.load_state_dict(loaded["data"])
    assert data.position == (0, 7)


def test_training_state_loads_only_weights(tmp_path: Path) -> None:
    """load_training_state really uses weights_only: the unpickler refuses globals."""
    path = tmp_path / CHECKPOINT
    torch.save({"step": 1, "slice": slice(1, 2)}, path)  # slice is not on the weights-only allow list
    with pytest.raises(CheckpointError, match=str(path).replace(".", r"\.")):
        load_training_state(path)


class _Payload:
    """An arbitrary object; unpickling it calls Path.touch(marker) (a stand-in for malicious code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_training_state_refuses_arbitrary_objects(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / CHECKPOINT
    torch.save({"step": 1, "model": {"w": torch.ones(2)}, "evil": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as e:
        load_training_state(path)
    assert str(path) in str(e.value) and "unsafe" in str(e.value)
    assert not marker.exists(), "unpickling ran arbitrary code"
    # A plain custom class instance is refused too.
    torch.save({"obj": _Plain()}, path)
    with pytest.raises(CheckpointError, match="corrupt or unsafe checkpoint"):
        load_training_state(path)


class _Plain:
    pass


def _truncate(p: Path) -> None:
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])


def _random(p: Path) -> None:
    p.write_bytes(os.urandom(2048))


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _flip_tail(p: Path) -> None:  # damage the zip central directory at the end
    b = bytearray(p.read_bytes())
    b[-40:] = os.urandom(40)
    p.write_bytes(bytes(b))


CORRUPTIONS = {"truncated": _truncate, "random": _random, "empty": _empty, "damaged-tail": _flip_tail}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
def test_corrupt_training_state(tmp_path: Path, corrupt: str) -> None:
    path = tmp_path / CHECKPOINT
    save_training_state({"w": torch.randn(100, 10), "step": 3}, path)
    CORRUPTIONS[corrupt](path)
    with pytest.raises(CheckpointError) as e:
        load_training_state(path)
    assert str(path) in str(e.value)


def test_missing_training_state(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_training_state(tmp_path / "nope.pt")


# ---------------------------------------------------------------------------------------------
# Inference files: ema.safetensors + model.json
# ---------------------------------------------------------------------------------------------


def test_inference_round_trip(tmp_path: Path) -> None:
    weights = {"a": torch.randn(3, 4).t(), "b": torch.arange(5), "c": torch.randn(2, dtype=torch.bfloat16),
               "nested.name": torch.zeros(1, 2, 3, 4)}
    meta = {"model": {"name": "mlp", "dim": 2}, "data": {"shape": [2], "levels": None}, "seed": 3}
    run = tmp_path / "run"
    save_inference(run, weights, meta)
    assert sorted(p.name for p in run.iterdir()) == [COMMIT, EMA_WEIGHTS, META]
    assert json.loads((run / META).read_text()) == meta
    for source in (run, run / EMA_WEIGHTS, str(run)):
        w, m = load_inference(source)
        assert m == meta and set(w) == set(weights)
        for k in weights:
            assert w[k].dtype == weights[k].dtype and torch.equal(w[k], weights[k])
    # Overwrite in place: new weights and metadata, still no temporary files.
    save_inference(run, {"a": torch.ones(1)}, {"v": 2})
    w, m = load_inference(run)
    assert m == {"v": 2} and list(w) == ["a"]
    assert leftovers(run) == []


def test_load_inference_from_training_checkpoint(tmp_path: Path) -> None:
    ema = {"w": torch.randn(2, 2)}
    save_training_state({"ema": ema, "meta": {"x": 1}, "model": ema, "step": 1}, tmp_path / CHECKPOINT)
    w, m = load_inference(tmp_path / CHECKPOINT)
    assert m == {"x": 1} and torch.equal(w["w"], ema["w"])


@pytest.mark.parametrize("content", [{"model": {}, "step": 1}, [1, 2], torch.zeros(3)], ids=["dict", "list", "tensor"])
def test_load_inference_not_a_fastfm_checkpoint(tmp_path: Path, content) -> None:
    path = tmp_path / CHECKPOINT
    torch.save(content, path)
    with pytest.raises(CheckpointError) as e:
        load_inference(path)
    assert str(path) in str(e.value) and "not a fastfm training checkpoint" in str(e.value)


def _damage_header(p: Path) -> None:  # safetensors: 8-byte length, then a JSON header
    b = bytearray(p.read_bytes())
    b[8:24] = b"\xff" * 16
    p.write_bytes(bytes(b))


# safetensors has no checksum over the tensor data, so only header/length damage is detectable.
ST_CORRUPTIONS = {"truncated": _truncate, "random": _random, "empty": _empty, "damaged-header": _damage_header}


@pytest.mark.parametrize("corrupt", list(ST_CORRUPTIONS))
def test_corrupt_ema_weights(tmp_path: Path, corrupt: str) -> None:
    save_inference(tmp_path, {"w": torch.randn(64, 64)}, {"x": 1})
    ST_CORRUPTIONS[corrupt](tmp_path / EMA_WEIGHTS)
    with pytest.raises(CheckpointError) as e:
        load_inference(tmp_path)
    assert str(tmp_path / EMA_WEIGHTS) in str(e.value) and "corrupt" in str(e.value)


def test_corrupt_model_json(tmp_path: Path) -> None:
    save_inference(tmp_path, {"w": torch.ones(2)}, {"model": {"name": "mlp"}})
    _truncate(tmp_path / META)
    with pytest.raises(CheckpointError) as e:
        load_inference(tmp_path / EMA_WEIGHTS)
    assert str(tmp_path / META) in str(e.value) and "corrupt" in str(e.value)


def test_missing_model_json(tmp_path: Path) -> None:
    save_inference(tmp_path, {"w": torch.ones(2)}, {"x": 1})
    (tmp_path / META).unlink()
    with pytest.raises(CheckpointError) as e:
        load_inference(tmp_path)
    assert str(tmp_path / META) in str(e.value) and "missing" in str(e.value)


def test_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_inference(tmp_path)  # a directory without ema.safetensors
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_run(tmp_path / "nothing" / CHECKPOINT)


# ---------------------------------------------------------------------------------------------
# load_run
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def run_copy(toy_run: Run, tmp_path: Path) -> Path:
    """A private copy of the tiny checkerboard run, free to damage."""
    dst = tmp_path / "run"
    shutil.copytree(toy_run.dir, dst)
    return dst


def test_load_run_sources_agree(toy_run: Run) -> None:
    runs = [load_run(toy_run.dir), load_run(toy_run.dir / EMA_WEIGHTS), load_run(str(toy_run.dir / CHECKPOINT))]
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    t = torch.rand(16, generator=torch.Generator().manual_seed(1))
    outs = [r.model(x, t) for r in runs]
    assert torch.isfinite(outs[0]).all()
    for o in outs[1:]:
        assert torch.equal(outs[0], o)
    for r in runs:
        assert not r.model.training and not any(p.requires_grad for p in r.model.parameters())
        assert r.meta == runs[0].meta and r.shape == (2,)
        assert type(r.path.scheduler) is type(runs[0].path.scheduler)
    # The EMA weights, not the raw training weights.
    state = load_training_state(toy_run.dir / CHECKPOINT)
    for k, v in runs[0].model.state_dict().items():
        assert torch.equal(v, state["ema"][k])
    assert state["step"] == 5
    assert state["config"] == json.loads((toy_run.dir / "config.json").read_text())
    assert state["meta"] == json.loads((toy_run.dir / META).read_text())


def test_load_run_unet_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model({"name": "unet", "in_channels": 1, "image_size": 8, "model_channels": 8,
                         "channel_mult": [1], "num_res_blocks": 1, "num_classes": 10, "low_res_channels": 1})
    with torch.no_grad():  # the output conv is zero-initialised; make the outputs informative
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    meta = {"model": model.config, "path": {"name": "vp", "args": {"beta_max": 15}}, "source": "gaussian",
            "seed": 0, "target": "x0", "superres": 2,
            "data": {"name": "digits", "shape": [1, 8, 8], "kind": "image", "levels": 17, "num_classes": 10}}
    save_inference(tmp_path, model.state_dict(), meta, state={"ema": model.state_dict(), "meta": meta})
    x, t, y, low = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 5, 10]), torch.randn(3, 1, 4, 4)
    expected = model.eval()(x, t, y=y, low_res=low)
    for source in (tmp_path, tmp_path / EMA_WEIGHTS, tmp_path / CHECKPOINT):
        run = load_run(source)
        assert torch.equal(run.model(x, t, y=y, low_res=low), expected)
        assert run.meta.target == "x0" and run.shape == (1, 8, 8)


def _commit_meta(run: Path, meta: object) -> None:
    """Replace model.json through the API (committed with the weights), not by a hand edit."""
    save_inference(run, load_inference(run)[0], meta)  # type: ignore[arg-type]


def test_load_run_weights_do_not_match_config(run_copy: Path) -> None:
    meta = json.loads((run_copy / META).read_text())
    meta["model"]["hidden"] = 16
    _commit_meta(run_copy, meta)
    with pytest.raises(CheckpointError) as e:
        load_run(run_copy)
    assert str(run_copy) in str(e.value) and "do not match the model config" in str(e.value)


@pytest.mark.parametrize("change", ["missing-key", "extra-key"])
def test_load_run_weights_keys_mismatch(run_copy: Path, change: str) -> None:
    weights, meta = load_inference(run_copy)
    if change == "missing-key":
        weights.pop(sorted(weights)[0])
    else:
        weights["extra.weight"] = torch.zeros(1)
    save_inference(run_copy, weights, meta)
    with pytest.raises(CheckpointError, match="do not match the model config"):
        load_run(run_copy)


def test_load_run_metadata_incomplete(run_copy: Path) -> None:
    meta = json.loads((run_copy / META).read_text())
    del meta["path"], meta["target"]
    _commit_meta(run_copy, meta)
    with pytest.raises(CheckpointError) as e:
        load_run(run_copy)
    assert "lacks" in str(e.value) and "path" in str(e.value) and "target" in str(e.value)


@pytest.mark.parametrize("text", ["null", "3", '"model path source target data"', "[]"],
                         ids=["null", "number", "string", "list"])
def test_load_run_model_json_not_an_object(run_copy: Path, text: str) -> None:
    """Valid JSON that is not an object is a corrupt model.json, not a TypeError deep inside."""
    _commit_meta(run_copy, json.loads(text))
    with pytest.raises(CheckpointError) as e:
        load_run(run_copy)
    assert str(run_copy) in str(e.value)


@pytest.mark.parametrize("name", [CHECKPOINT, EMA_WEIGHTS, META])
def test_load_run_corrupt_files(run_copy: Path, name: str) -> None:
    _random(run_copy / name)
    source = run_copy / CHECKPOINT if name == CHECKPOINT else run_copy
    with pytest.raises(CheckpointError) as e:
        load_run(source)
    assert str(run_copy / name) in str(e.value)
