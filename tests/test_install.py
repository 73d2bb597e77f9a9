"""What ``pip install .`` installs: the wheel built from this source tree holds every file of the package folders
(pyproject's package-dir: fastfm/, kernels/ as fastfm/kernels, export/ as fastfm/export) and the compiled
extension fastfm._C; installed (not editable) into a fresh environment outside the source tree, every
``python -m`` entry point of the tree answers ``--help``.

The wheel is built once per session, offline (``pip wheel --no-build-isolation --no-index``: the build
requirements come from the dev extra), from a copy of the tree as git sees it (tracked files and untracked ones
not ignored), so the build leaves nothing in the work tree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
    "package-dir"]
"""Import name -> source folder (fastfm.kernels -> kernels)."""
MAIN_GUARD = re.compile(r"^if __name__ == ['\"]__main__['\"]:", re.MULTILINE)
NAMED_ENTRY_POINTS = {"fastfm.train", "fastfm.sample", "fastfm.evaluate", "fastfm.export", "fastfm.experiments",
                      "fastfm.hardware", "fastfm.curves", "fastfm.reflow"}
"""The commands the README names (a subset of what is discovered)."""


def source_files() -> list[str]:
    """The tree as a fresh clone plus uncommitted work has it: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [name for name in out.splitlines() if (ROOT / name).is_file()]


def installed_name(path: str) -> str | None:
    """Where a source file lands in the wheel (``kernels/ops.py`` -> ``fastfm/kernels/ops.py``), None if outside
    the package folders."""
    for name, folder in sorted(PACKAGE_DIRS.items(), key=lambda item: -len(item[1])):
        if path.startswith(folder.rstrip("/") + "/"):
            return name.replace(".", "/") + path[len(folder.rstrip("/")):]
    return None


def module_name(installed: str) -> str:
    """``fastfm/export/__main__.py`` -> ``fastfm.export``; ``fastfm/train.py`` -> ``fastfm.train``."""
    return installed.removesuffix(".py").removesuffix("/__main__").replace("/", ".")


def entry_points() -> list[str]:
    """Every module ``python -m`` can run: a package's __main__.py, or a module with a ``__main__`` guard."""
    found = set()
    for path in source_files():
        installed = installed_name(path)
        if installed and installed.endswith(".py") and (
                path.endswith("/__main__.py") or MAIN_GUARD.search((ROOT / path).read_text())):
            found.add(module_name(installed))
    return sorted(found)


ENTRY_POINTS = entry_points()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip wheel .`` builds from a copy of the tree (C++ extension compiled: ~25 s on 2 cores)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in source_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (built,) = (tmp / "dist").glob("fastfm-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel pip-installed (not editable); the dependencies come from this environment's
    site-packages through a .pth path line (which adds the folder but runs none of its .pth files, so the
    editable install's import hook that points at the source tree stays out). Returns its python."""
    env_dir = tmp_path_factory.mktemp("env") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                           "--no-index", "-q", str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stderr[-3000:]}"
    return python


def run_outside(python: Path, args: list[str], cwd: Path) -> subprocess.Popen:
    """``python args`` started in ``cwd`` (outside the source tree) with no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen([str(python), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture(scope="module")
def help_runs(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str]]:
    """``python -m MODULE --help`` of every entry point, all started at once: (exit code, stdout, stderr)."""
    cwd = tmp_path_factory.mktemp("cwd")
    procs = {m: run_outside(installed, ["-m", m, "--help"], cwd) for m in ENTRY_POINTS}
    outputs = {m: p.communicate(timeout=300) for m, p in procs.items()}
    return {m: (procs[m].returncode, *outputs[m]) for m in procs}


def test_wheel_holds_every_source_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {installed_name(p) for p in source_files()} - {None}
    assert any(name.endswith("/train.py") for name in expected), "found no source files: check PACKAGE_DIRS"
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {len(missing)} source files (check pyproject's packages): {missing}"


def test_wheel_holds_compiled_extension(wheel: Path) -> None:
    extension = "fastfm/_C" + sysconfig.get_config_var("EXT_SUFFIX")
    assert extension in zipfile.ZipFile(wheel).namelist()


def test_entry_points_discovered() -> None:
    assert NAMED_ENTRY_POINTS <= set(ENTRY_POINTS), NAMED_ENTRY_POINTS - set(ENTRY_POINTS)


def test_install_runs_outside_source_tree(installed: Path, tmp_path: Path) -> None:
    """fastfm (and its extension) import from the fresh environment, and no editable-install hook is loaded."""
    probe = ("import sys, sysconfig, fastfm, fastfm._C; site = sysconfig.get_path('purelib') + '/'; "
             "print(fastfm.__file__.startswith(site), fastfm._C.__file__.startswith(site), "
             "any('editable' in m for m in sys.modules))")
    out, err = run_outside(installed, ["-c", probe], tmp_path).communicate(timeout=120)
    assert out.split() == ["True", "True", "False"], err


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_entry_point_help(module: str, help_runs: dict[str, tuple[int, str, str]]) -> None:
    code, out, err = help_runs[module]
    assert code == 0 and "usage:" in out, f"python -m {module} --help exited {code}:\n{err[-2000:]}"
