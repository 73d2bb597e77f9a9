"""The layers, read off the imports: kernels <- core <- export <- entry points, and inside the core its concepts:
data, models <- path <- run <- solve <- evaluation <- training.

Every ``import`` / ``from ... import`` statement of every module (at any depth, lazy ones included) is
checked against the layer it may reach; ``fastfm.registry``, ``fastfm.compat``, ``fastfm.hardware`` and
``fastfm.seeding`` are leaf utilities (they import nothing from fastfm) that any layer may use.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fastfm": ROOT / "fastfm", "fastfm.kernels": ROOT / "kernels", "fastfm.export": ROOT / "export"}
LEAVES = ("fastfm.registry", "fastfm.compat", "fastfm.hardware", "fastfm.seeding")
LAUNCHERS = ("fastfm.train", "fastfm.sample", "fastfm.evaluate", "fastfm.curves", "fastfm.reflow",
             "fastfm.export.__main__")
CONCEPTS = {"data": 0, "models": 0, "path": 1, "run": 2, "solve": 3, "evaluation": 4, "training": 5}
"""The core's subpackages, each importing only from those at its rank or below."""
"""``python -m`` targets: entry points by role, kept where ``python -m fastfm.X`` finds them."""


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = f.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            if package == "fastfm" and parts[0] in ("kernels", "export"):
                continue
            out[name] = f
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of the fastfm modules ``path`` imports (relative imports resolved)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*pkg.split(".")[: len(pkg.split(".")) - node.level + 1], *filter(None, [base])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] == "fastfm"}


def layer(module: str) -> int:
    """0 kernels (with the C++ extension fastfm._C), 1 core, 2 export, 3 entry points (the commands and the
    experiments); the leaves count as 0."""
    if module in LAUNCHERS or module.startswith(("fastfm.commands", "fastfm.experiments")):
        return 3
    if module.startswith("fastfm.export"):
        return 2
    bottom = ("fastfm.kernels", "fastfm._C", *LEAVES)
    if module == "fastfm" or any(module == m or module.startswith(m + ".") for m in bottom):
        return 0
    return 1


MODULES = _modules()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_only_reach_down(name: str) -> None:
    """No module imports a layer above its own; the leaves import nothing from fastfm at all."""
    mine = layer(name)
    imported = {m for m in _imports(name, MODULES[name]) if m != "fastfm"}
    if name in LEAVES:
        assert not imported, f"{name} is a leaf utility but imports {sorted(imported)}"
    up = sorted(m for m in imported if layer(m) > mine)
    assert not up, f"{name} (layer {mine}) imports {up} from a layer above"


def concept(module: str) -> str | None:
    """The core subpackage (``CONCEPTS``) a module belongs to, if any."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "fastfm" and parts[1] in CONCEPTS else None


def test_the_core_holds_no_loose_modules() -> None:
    """Every core module lives in one of the concept subpackages; only the leaves and launchers sit beside them."""
    loose = sorted(n for n in MODULES if layer(n) == 1 and n.count(".") == 1 and concept(n + ".x") is None)
    assert not loose, f"core modules outside {sorted(CONCEPTS)}: {loose}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if concept(n)))
def test_concepts_import_only_their_own_rank_or_below(name: str) -> None:
    mine = CONCEPTS[concept(name)]
    up = sorted(m for m in _imports(name, MODULES[name]) if concept(m) and CONCEPTS[concept(m)] > mine)
    assert not up, f"{name} ({concept(name)}) imports {up} from a concept above it"


def test_the_core_never_names_export() -> None:
    """Not even lazily: only entry points import fastfm.export."""
    offenders = {n for n, p in MODULES.items() if layer(n) < 2
                 and any(m.startswith("fastfm.export") for m in _imports(n, p))}
    assert not offenders


@pytest.mark.parametrize("command", ["sample", "evaluate", "train", "reflow", "experiments"])
def test_an_eager_command_loads_no_export(command: str) -> None:
    """``python -m fastfm.sample`` without --engine imports none of the export layer."""
    code = (f"import sys, fastfm.{command}; bad = sorted(m for m in sys.modules if m.startswith('fastfm.export')); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
