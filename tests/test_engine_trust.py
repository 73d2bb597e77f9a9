"""What an engine directory or a checkpoint may claim, and how ``python -m fastfm.export`` talks.

An engine's manifest is checked, not believed: its engine file must lie in the engine directory, and
its content (steps, nfe, grid, parity, ...) must be what the build wrote. A file that cannot be loaded
(a garbage engine, an unsafe pickle) is one error line naming it. One tiny ONNX engine (MLP, batch 8,
2 Euler steps) is built per module and copied per test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from conftest import call, help_text
from fastfm.export import EngineSpec, ExportError, ManifestError, export_engine, load, manifest
from fastfm.commands import export as export_cli
from fastfm.inference import DEFAULTS
from test_export import RUNS, make_run

from fastfm import sample
from fastfm.checkpoint import CHECKPOINT, CheckpointError, load_training_state


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("trust_run") / "mlp", *RUNS["mlp"])


@pytest.fixture(scope="module")
def built(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trust_engine") / "engine"
    export_engine(run_dir, EngineSpec(task="sample", solver="euler", steps=2, batch=8, backend="onnx"), out,
                  device="cpu")
    return out


@pytest.fixture
def engine_dir(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "engine"))


def _body(directory: Path) -> dict[str, Any]:
    return json.loads((directory / manifest.MANIFEST).read_text())


def _edit(directory: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """An edit by hand: the changed JSON written back as is."""
    body = _body(directory)
    change(body)
    (directory / manifest.MANIFEST).write_text(json.dumps(body, indent=1))


def _rewrite(directory: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """An edit written back the way fastfm writes manifests (so it is self-consistent)."""
    body = _body(directory)
    change(body)
    manifest.write(directory, body)


# ------------------------------------------------------------------------- the engine file


def _escape(engine: Path, outside: Path) -> str:
    return os.path.relpath(outside, engine)


def _absolute(engine: Path, outside: Path) -> str:
    return str(outside)


def _linked_file(engine: Path, outside: Path) -> str:
    (engine / "engine.onnx").unlink()
    (engine / "engine.onnx").symlink_to(outside)
    return "engine.onnx"


def _linked_directory(engine: Path, outside: Path) -> str:
    (engine / "sub").symlink_to(outside.parent)
    return f"sub/{outside.name}"


@pytest.mark.parametrize("point", [_escape, _absolute, _linked_file, _linked_directory],
                         ids=["dotdot", "absolute", "symlinked-file", "symlinked-directory"])
def test_engine_file_must_lie_in_the_engine_directory(engine_dir: Path, point: Callable[[Path, Path], str]) -> None:
    outside = engine_dir.parent / "outside" / "outside_engine.onnx"
    outside.parent.mkdir()
    shutil.copy(engine_dir / "engine.onnx", outside)  # the same bytes: the sha256 in the manifest matches
    name = point(engine_dir, outside)
    _rewrite(engine_dir, lambda b: b["engine"].update(file=name))
    with pytest.raises(ManifestError) as e:
        load(engine_dir)
    assert repr(name) in str(e.value) and "inside" in str(e.value)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------- the manifest's content


def _steps(b: dict[str, Any], steps: int) -> None:
    b["spec"]["steps"] = b["nfe"] = steps


@pytest.mark.parametrize("change, message", [
    (lambda b: _steps(b, 8), r"grid .* 8 euler steps"),
    (lambda b: b.update(grid=[0.0, 0.25, 1.0]), r"grid .* 2 euler steps"),
    (lambda b: (_steps(b, 8), b.update(grid=[i / 8 for i in range(9)])), "manifest.json was edited"),
    (lambda b: b["parity"]["outputs"]["x"].update(max_abs=0.0), "manifest.json was edited"),
    (lambda b: b["checkpoint"].update(source="elsewhere"), "manifest.json was edited"),
], ids=["steps-and-nfe", "grid", "steps-nfe-and-grid", "parity", "source"])
def test_edited_manifest_is_refused(engine_dir: Path, change: Callable[[dict[str, Any]], Any], message: str) -> None:
    _edit(engine_dir, change)
    with pytest.raises(ManifestError, match=message) as e:
        load(engine_dir)
    assert str(engine_dir / manifest.MANIFEST) in str(e.value)


def test_reformatted_manifest_is_accepted(engine_dir: Path) -> None:
    _edit(engine_dir, lambda b: None)  # other indentation, same content
    assert load(engine_dir).nfe == 2


@pytest.mark.parametrize("schema", [1, 2])
def test_manifest_of_an_older_fastfm_is_refused(engine_dir: Path, schema: int) -> None:
    """Schema 1 had no digest, schema 2 no SDE fields (diffusion, denoise) in its spec."""
    _edit(engine_dir, lambda b: (b.update(schema=schema), b["spec"].pop("diffusion"), b["spec"].pop("denoise")))
    with pytest.raises(ManifestError, match=f"schema {schema}; this fastfm reads schema 3.*rebuild"):
        load(engine_dir)


# ------------------------------------------------------------------------- engine files that do not load


@pytest.mark.parametrize("backend, filename", [("aoti", "engine.pt2"), ("onnx", "engine.onnx")])
def test_garbage_engine_file_is_one_error_line(engine_dir: Path, tmp_path: Path, backend: str, filename: str) -> None:
    (engine_dir / "engine.onnx").unlink()
    garbage = engine_dir / filename
    garbage.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                      dtype=torch.uint8).numpy().tobytes())
    _rewrite(engine_dir, lambda b: (b["spec"].update(backend=backend),
                                    b["engine"].update(file=filename, sha256=manifest.sha256(garbage))))
    with pytest.raises(ExportError) as e:
        load(engine_dir)
    assert str(garbage) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        call(sample.main, ["--engine", str(engine_dir), "--n", "3", "--out", str(tmp_path / "samples")])
    assert str(e.value.code).startswith("error: ") and str(garbage) in str(e.value.code)
    assert "\n" not in str(e.value.code)


# ------------------------------------------------------------------------- unsafe checkpoints


class _System:
    """Unpickling it would call os.system (never happens: the weights-only unpickler refuses it)."""

    def __reduce__(self):
        return (os.system, ("echo hi",))


def test_unsafe_checkpoint_is_one_line_without_advice_to_unpickle_it(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT
    torch.save({"step": 1, "model": {"w": torch.ones(2)}, "evil": _System()}, path)
    with pytest.raises(CheckpointError) as e:
        load_training_state(path)
    message = str(e.value)
    assert str(path) in message and "refused" in message and "unsafe pickle" in message
    assert "contains objects other than tensors and plain containers" in message
    assert "\n" not in message and "weights_only" not in message


def test_garbage_checkpoint_is_one_line_without_advice_to_unpickle_it(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError) as e:
        load_training_state(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value) and "weights_only" not in str(e.value)


# ------------------------------------------------------------------------- the command line


def test_cli_reports_each_stage(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stdout = call(export_cli.main, ["--checkpoint", str(run_dir), "--task", "sample", "--solver", "euler",
                                    "--steps", "2", "--batch", "8", "--backend", "onnx", "--device", "cpu",
                                    "--out", str(tmp_path / "engine")])
    assert json.loads(stdout)["nfe"] == 2  # stdout: the summary only
    stages = [line for line in capsys.readouterr().err.splitlines() if line.startswith("export: ")]
    assert all(re.fullmatch(r"export: \S.* \(\d+\.\d s\)", line) for line in stages), stages
    words = ["loaded", "traced", "built", "parity", "manifest"]
    assert len(stages) == len(words) and all(w in line for w, line in zip(words, stages)), stages


def test_cli_help_is_grouped_with_defaults() -> None:
    text = help_text(export_cli.main, columns=100)
    assert text.startswith("usage: python -m fastfm.export ")
    groups: dict[str, list[str]] = {}
    for block in text.split("\n\n"):
        title, _, rest = block.partition("\n")
        if title.endswith(":") and not title.startswith(" "):
            groups[title[:-1]] = re.findall(r"^  (?:-\w, )?(--[\w-]+)", rest, re.M)
    assert list(groups)[1:] == ["what to build", "solver", "engine", "conditioning", "SDE sampling", "likelihood"]
    assert groups["options"] == ["--help"]
    assert sorted(sum(groups.values(), [])) == sorted(
        a.option_strings[-1] for a in export_cli.parser()._actions)
    for action in export_cli.parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
    assert "(default midpoint; euler, i.e. Euler-Maruyama, with --sde)" in " ".join(text.split())
    for option, default in [("--diffusion", "1"), ("--steps", str(DEFAULTS.steps)), ("--batch", "1"), ("--backend", "auto"),
                            ("--dtype", "auto"), ("--device", "auto"), ("--divergence", "auto"), ("--probes", "1"),
                            ("--guidance", "1.0"), ("--seed", "0")]:
        entry = re.search(rf"^  {option} .*?(?=^  -|\Z)", text, re.M | re.S)
        assert entry and f"(default: {default})" in " ".join(entry[0].split()), option
    assert "(default: None)" not in text and "(default: False)" not in text
