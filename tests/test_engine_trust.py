"""What an engine directory or a checkpoint may claim, and how ``python -m fastfm.export`` talks.

An engine's manifest is checked, not believed: its engine file must lie in the engine directory, its
content (steps, nfe, grid, parity, ...) must be what the build wrote, and what it says the engine computes
must be what the engine file itself carries (even after a consistent edit with a recomputed digest). A file
that cannot be loaded (a garbage engine, an unsafe pickle) or a malformed manifest is one error line naming
it. One tiny ONNX engine (MLP, batch 8, 2 Euler steps) is built per module and copied per test; the command
line is run once, in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest
import torch
from conftest import call, help_text
from fastfm.export import EngineSampler, EngineRequest, ExportError, ManifestError, export_engine, load, manifest
from fastfm.commands import export as export_cli
from fastfm.export.backends import STAMP, backend
from fastfm.export.quiet import quiet
from fastfm.export.spec import TensorSlot
from fastfm.solve.settings import DEFAULT_SOLVER_HELP, DEFAULT_STEPS_HELP
from test_export import RUNS, make_run

from fastfm import hardware, sample
from fastfm.run.checkpoint import CHECKPOINT, CheckpointError, load_training_state


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("trust_run") / "mlp", *RUNS["mlp"])


@pytest.fixture(scope="module")
def built(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trust_engine") / "engine"
    export_engine(run_dir, EngineRequest.of(task="sample", solver="euler", steps=2, batch=8, backend="onnx"), out,
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


@pytest.mark.parametrize("schema", [1, 2, 3])
def test_manifest_of_an_older_fastfm_is_refused(engine_dir: Path, schema: int) -> None:
    """Schema 1 had no digest, schema 2 no SDE fields (diffusion, denoise) in its spec, schema 3 no stamp in
    its engine file."""
    _edit(engine_dir, lambda b: (b.update(schema=schema), b["spec"].pop("diffusion"), b["spec"].pop("denoise")))
    with pytest.raises(ManifestError, match=f"schema {schema}; this fastfm reads schema {manifest.SCHEMA}.*rebuild"):
        load(engine_dir)


# ------------------------------------------------------------------------- the engine file's own account


def _grid(b: dict[str, Any], steps: int) -> None:
    _steps(b, steps)
    b["grid"] = [i / steps for i in range(steps + 1)]


def _batch(b: dict[str, Any], batch: int) -> None:
    b["spec"]["batch"] = batch
    for slot in b["inputs"] + b["outputs"]:
        slot["shape"][0] = batch


def _dimension(b: dict[str, Any], dim: int) -> None:
    b["checkpoint"]["meta"]["data"]["shape"] = [dim]
    for slot in b["inputs"] + b["outputs"][:1]:
        slot["shape"][1:] = [dim]


@pytest.mark.parametrize("change, differ", [
    (lambda b: _grid(b, 4), ["spec.steps: manifest 4, engine file 2", "nfe: manifest 4, engine file 2",
                             "grid: manifest [0.0, 0.25, 0.5, 0.75, 1.0], engine file [0.0, 0.5, 1.0]"]),
    (lambda b: _batch(b, 16), ["spec.batch: manifest 16, engine file 8", "inputs: manifest"]),
    (lambda b: _dimension(b, 3), ["checkpoint.meta.data.shape: manifest [3], engine file [2]"]),
    (lambda b: b["checkpoint"]["meta"]["path"].update(name="linear"), ["checkpoint.meta.path.name: manifest linear"]),
    (lambda b: b["checkpoint"].update(sha256="0" * 64), ["checkpoint.sha256: manifest 000"]),
], ids=["steps-nfe-grid", "batch", "dimension", "path", "weights"])
def test_consistently_edited_manifest_is_refused_by_its_engine_file(engine_dir: Path, change, differ) -> None:
    """A manifest edited consistently, digest recomputed, is still not what the engine file says it computes."""
    _rewrite(engine_dir, change)
    manifest.read(engine_dir)  # the manifest alone is consistent
    with pytest.raises(ManifestError) as e:
        load(engine_dir)
    message = str(e.value)
    assert message.startswith(f"{engine_dir / manifest.MANIFEST} does not describe its engine file engine.onnx: ")
    assert all(d in message for d in differ) and "\n" not in message, message


def test_sampling_an_edited_engine_is_one_error_line(engine_dir: Path, tmp_path: Path) -> None:
    """The issue: sample reported 8 steps / NFE 16 of an engine that runs 2."""
    _rewrite(engine_dir, lambda b: _grid(b, 8))
    with pytest.raises(SystemExit) as e:
        call(sample.main, ["--engine", str(engine_dir), "--n", "3", "--out", str(tmp_path / "samples")])
    assert re.fullmatch(r"error: .* spec\.steps: manifest 8, engine file 2; .*", str(e.value.code))
    assert not (tmp_path / "samples").exists()


def test_engine_file_without_a_stamp_is_refused(engine_dir: Path) -> None:
    model = onnx.load(engine_dir / "engine.onnx")
    assert [p.key for p in model.metadata_props] == [STAMP]
    del model.metadata_props[:]
    onnx.save(model, engine_dir / "engine.onnx")
    _rewrite(engine_dir, lambda b: b["engine"].update(sha256=manifest.sha256(engine_dir / "engine.onnx")))
    with pytest.raises(ManifestError, match=r"engine\.onnx carries no fastfm stamp .*rebuild the engine$"):
        load(engine_dir)


@pytest.mark.parametrize("text", [
    lambda body: "[" * 100_000 + "]" * 100_000,
    lambda body: json.dumps({**body, "parity": "deep"}).replace('"deep"', "[" * 5000 + "]" * 5000),
], ids=["document", "field"])
def test_deeply_nested_manifest_is_one_error_line(engine_dir: Path, text: Callable[[dict], str]) -> None:
    (engine_dir / manifest.MANIFEST).write_text(text(_body(engine_dir)))
    with pytest.raises(ManifestError, match=r"manifest\.json is nested too deeply") as e:
        load(engine_dir)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change, message", [
    (lambda b: b["spec"].update(guidance="x"), "spec.guidance must be a number, got 'x'"),
    (lambda b: b["spec"].update(steps=True), "spec.steps must be an integer, got True"),
    (lambda b: b["spec"].update(class_label=1.5), "spec.class_label must be an integer or null, got 1.5"),
    (lambda b: b["spec"].update(log_likelihood="no"), "spec.log_likelihood must be true or false, got 'no'"),
    (lambda b: b.update(device=5), "device must be a string"),
    (lambda b: b.update(inputs={}, grid="0,1"), "grid must be an array; inputs must be an array"),
    (lambda b: b.update(checkpoint=None), "checkpoint must be an object"),
    (lambda b: b.update(inputs=[1]), "inputs[0] must be an object with name, shape and dtype, got 1"),
], ids=["float", "int", "optional-int", "bool", "device", "arrays", "object", "slot"])
def test_manifest_values_of_the_wrong_type_are_one_error_line(engine_dir: Path, change, message: str) -> None:
    _rewrite(engine_dir, change)
    with pytest.raises(ManifestError) as e:
        load(engine_dir)
    assert message in str(e.value) and str(engine_dir / manifest.MANIFEST) in str(e.value)
    assert "\n" not in str(e.value)


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


@pytest.fixture(scope="module")
def cli(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """``python -m fastfm.export`` as a user runs it (a fresh process, umask 027), and its engine directory."""
    out = tmp_path_factory.mktemp("cli") / "engine"
    argv = [sys.executable, "-m", "fastfm.export", "--checkpoint", str(run_dir), "--task", "sample", "--solver",
            "euler", "--steps", "2", "--batch", "8", "--backend", "onnx", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o027))
    assert done.returncode == 0, done.stderr
    return done, out


def test_cli_reports_each_stage(cli: tuple[subprocess.CompletedProcess, Path]) -> None:
    done, _ = cli
    assert json.loads(done.stdout)["nfe"] == 2  # stdout: the summary only
    stages = [line for line in done.stderr.splitlines() if line.startswith("export: ")]
    assert all(re.fullmatch(r"export: \S.* \(\d+\.\d s\)", line) for line in stages), stages
    words = ["loaded", "traced", "built", "parity", "manifest"]
    assert len(stages) == len(words) and all(w in line for w, line in zip(words, stages)), stages


def test_cli_prints_no_third_party_noise(cli: tuple[subprocess.CompletedProcess, Path]) -> None:
    """Nothing but the stage lines: no torch FutureWarnings, no "torchvision is not installed", no
    (coloured) onnxruntime log lines."""
    done, _ = cli
    assert [line for line in done.stderr.splitlines() if not line.startswith("export: ")] == []


def test_engine_directory_honours_the_umask(cli: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, out = cli
    modes = {p.name: p.stat().st_mode & 0o777 for p in [out, *out.iterdir()]}
    assert modes == {"engine": 0o750, "engine.onnx": 0o640, manifest.MANIFEST: 0o640}


def test_quiet_hides_third_party_warnings_only() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet():
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning)
            warnings.warn_explicit("a torch UserWarning", UserWarning, "torch/onnx/x.py", 1, module="torch.onnx.x")
            logging.getLogger("torch.onnx._internal.exporter._registration").warning("torchvision is not installed")
            hardware.warn_once("fastfm's own warning in test_quiet_hides_third_party_warnings_only")
        warnings.warn("a FutureWarning after the block", FutureWarning)
    assert [(w.category, str(w.message)) for w in seen] == [
        (hardware.PrecisionWarning, "fastfm's own warning in test_quiet_hides_third_party_warnings_only"),
        (FutureWarning, "a FutureWarning after the block")]
    assert logging.getLogger("torch.onnx").level == logging.NOTSET  # restored


def test_onnxruntime_logs_no_warnings(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """onnxruntime warns (in colour, on the process's stderr) about e.g. unused initializers."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x0"], ["x"])], "g",
        [onnx.helper.make_tensor_value_info("x0", onnx.TensorProto.FLOAT, [8, 2])],
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [8, 2])],
        initializer=[onnx.numpy_helper.from_array(np.ones(3, np.float32), "unused")])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), tmp_path / "e.onnx")
    slot = TensorSlot("x0", (8, 2), "float32")
    loaded = backend("onnx").load(tmp_path / "e.onnx", [slot], [slot], torch.device("cpu"))
    x = torch.randn(8, 2)
    torch.testing.assert_close(loaded.run([x])[0], x)
    assert capfd.readouterr().err == ""


def test_engine_sampling_shows_a_progress_bar(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Like the eager sampler's, over the engine's calls: 20 rows in batches of 8."""
    EngineSampler(load(built)).sample(20)
    err = capsys.readouterr().err
    assert "sampling (20):" in err and " 0/3 [" in err and "batch/s" in err, err  # 3 calls of batch 8


def test_cli_help_is_grouped_with_defaults() -> None:
    text = help_text(export_cli.main, columns=100)
    assert text.startswith("usage: python -m fastfm.export ")
    groups: dict[str, list[str]] = {}
    for block in text.split("\n\n"):
        title, _, rest = block.partition("\n")
        if title.endswith(":") and not title.startswith(" "):
            groups[title[:-1]] = re.findall(r"^  (?:-\w, )?(--[\w-]+)", rest, re.M)
    assert list(groups)[1:] == ["what to build", "solver", "likelihood", "engine", "sampling"]
    assert groups["options"] == ["--help"]
    assert sorted(sum(groups.values(), [])) == sorted(
        a.option_strings[-1] for a in export_cli.parser()._actions)
    for action in export_cli.parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
    assert f"(default: {DEFAULT_SOLVER_HELP})" in " ".join(text.split())
    for option, default in [("--diffusion", "1"), ("--steps", DEFAULT_STEPS_HELP), ("--batch", "1"),
                            ("--backend", "auto"), ("--dtype", "auto"), ("--device", "auto"), ("--divergence", "auto"), ("--probes", "1"),
                            ("--guidance", "1"), ("--seed", "0")]:
        entry = re.search(rf"^  {option} .*?(?=^  -|\Z)", text, re.M | re.S)
        assert entry and f"(default: {default})" in " ".join(entry[0].split()), option
    assert "(default: None)" not in text and "(default: False)" not in text
