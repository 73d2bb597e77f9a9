"""Test set-up (Triton interpreter on CPU-only machines) and helpers for the CLI and checkpoint tests."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # run Triton kernels in the interpreter; must precede `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib
import importlib.util
import io
import json
from types import ModuleType
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from fastfm import train

TINY_MLP = ["--model-args", "hidden=32", "depth=2"]
# One level, no attention below the middle block: a few thousand parameters on 8x8 digits.
TINY_UNET = ["--model-args", "model_channels=8", "channel_mult=[1]", "num_res_blocks=1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def gpu_bench_script(name: str) -> ModuleType:
    """benchmarks/gpu/<name>.py loaded as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_argv(out: str | Path, *extra: str, model: list[str] | None = None, steps: int = 3) -> list[str]:
    """Flags of a tiny, fast training run (later flags in ``extra`` override these)."""
    return ["--steps", str(steps), "--batch-size", "64", "--eval-n", "50", "--n-samples", "50",
            "--eval-steps", "2", "--device", "cpu", "--log-every", "1", "--out", str(out),
            *(TINY_MLP if model is None else model), *extra]


def call(main: Callable[[list[str]], None], argv: list[str]) -> str:
    """Run an entry point's ``main(argv)`` in-process and return what it printed."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(argv)
    return buf.getvalue()


def cli_error(main: Callable[[list[str]], None], argv: list[str]) -> str:
    """The one-line error an entry point exits with (``error: ...``) for ``argv``."""
    with pytest.raises(SystemExit) as e:
        call(main, argv)
    msg = str(e.value.code)
    assert msg.startswith("error: "), msg
    return msg


def help_text(main: Callable[[list[str]], None], columns: int = 120) -> str:
    """What ``main(["--help"])`` prints (at a fixed terminal width); it must exit with 0."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(columns)
    try:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
            main(["--help"])
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    assert e.value.code == 0
    return buf.getvalue()


def last_json(stdout: str) -> Any:
    """The JSON object a CLI prints last (train: one line; evaluate: indented, the whole tail)."""
    start = stdout.rfind("\n{")
    return json.loads(stdout[start + 1:] if start >= 0 else stdout)


def is_png(path: str | Path) -> bool:
    from PIL import Image

    path = Path(path)
    if not path.is_file() or path.read_bytes()[:8] != PNG_MAGIC:
        return False
    with Image.open(path) as im:
        im.verify()
    return True


@dataclass
class Run:
    dir: Path
    stdout: str
    summary: dict[str, Any]


def run_training(out: Path, *extra: str, **kw: Any) -> Run:
    stdout = call(train.main, train_argv(out, *extra, **kw))
    return Run(out, stdout, last_json(stdout))


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Checkerboard, tiny MLP, CondOT: 5 steps with a mid-run checkpoint."""
    out = tmp_path_factory.mktemp("toy") / "run"
    return run_training(out, "--data", "checkerboard", "--ckpt-every", "2", "--log-every", "2", "--eval-budget", "0", steps=5)
