"""An experiment's report: every number lives once, in ``results.json``; ``report.md`` is rendered from it.

    report = Report("paths", "Flow Matching paths", scale="cpu", intro="...")
    report.table("nll", "Test NLL", ["data", "path", "NLL"], rows, note="...")
    report.claim("OT beats VP on NLL", holds=a < b, evidence="CondOT {ot} nats vs VP {vp}", ot=a, vp=b)
    report.figure("curves.png", "NLL vs training step")
    report.write(out_dir)

Table cells and claim values are formatted by :func:`fmt` alone, so the Markdown shows exactly the JSON's
numbers at 4 significant digits (the test suite parses both and compares them).
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastfm.run.checkpoint import atomic_write
from fastfm.experiments.verdicts import Verdict

Cell = float | int | str | bool | None


def fmt(value: Cell) -> str:
    """The one rendering of a number in a report: 4 significant digits, integers whole, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def machine() -> dict[str, Any]:
    """Where the experiment ran: CPU, cores, accelerator and versions."""
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


@dataclass
class Report:
    """Tables, claims and figures of one experiment, with its free-form ``data`` (curves, raw numbers)."""

    name: str
    title: str
    scale: str
    intro: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    tables: list[dict[str, Any]] = field(default_factory=list)
    claims: list[dict[str, Any]] = field(default_factory=list)
    figures: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    wall_s: float | None = None

    def table(self, key: str, title: str, columns: list[str], rows: list[list[Cell]], note: str = "") -> None:
        """A table of ``rows`` (one cell per column)."""
        bad = [r for r in rows if len(r) != len(columns)]
        if bad:
            raise ValueError(f"table {key!r}: rows {bad[:2]} do not have {len(columns)} cells")
        self.tables.append({"key": key, "title": title, "columns": columns, "rows": rows, "note": note})

    def claim(self, claim: str, holds: bool | None, evidence: str, **values: Cell) -> None:
        """A paper's claim and whether it holds here (None: not settled at this scale, a difference within the
        noise or a solve that failed); ``evidence`` is a format string over ``values``, filled with :func:`fmt`."""
        text = evidence.format(**{k: fmt(v) for k, v in values.items()})
        self.claims.append({"claim": claim, "holds": holds, "evidence": text, "values": values})

    def judge(self, claim: str, verdict: Verdict, evidence: str, **values: Cell) -> None:
        """A claim judged by a rule of ``fastfm.experiments.verdicts``; why it is not settled joins the evidence."""
        self.claim(claim, verdict.holds, evidence + (f": {verdict.why}" if verdict.why else ""), **values)

    def figure(self, file: str, caption: str) -> None:
        self.figures.append({"file": file, "caption": caption})

    def to_json(self) -> dict[str, Any]:
        return {"experiment": self.name, "title": self.title, "scale": self.scale, "settings": self.settings,
                "machine": machine(), "wall_s": self.wall_s, "tables": self.tables, "claims": self.claims,
                "figures": self.figures, "notes": self.notes, "data": self.data}

    def markdown(self) -> str:
        verdict = {True: "**holds**", False: "**does not hold**", None: "**not settled**"}
        lines = [f"# {self.title}", ""]
        if self.intro:
            lines += [self.intro, ""]
        wall = "" if self.wall_s is None else f", {fmt(self.wall_s)} s in all"
        lines += [f"Scale `{self.scale}`{wall}. Every number here is in `results.json` beside this file.", ""]
        if self.claims:
            lines += ["## The papers' claims, here", ""]
            lines += [f"- {verdict[c['holds']]}: {c['claim']} ({c['evidence']})" for c in self.claims]
            lines.append("")
        for t in self.tables:
            lines += [f"## {t['title']}", ""]
            if t["note"]:
                lines += [t["note"], ""]
            lines += ["| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
            lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in t["rows"]]
            lines.append("")
        if self.figures:
            lines += ["## Figures", ""]
            for f in self.figures:
                lines += [f"![{f['caption']}]({f['file']})", "", f"*{f['caption']}*", ""]
        if self.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        return "\n".join(lines)

    def write(self, out: Path) -> Path:
        """``results.json`` and ``report.md`` in ``out``, each written atomically; returns the report's path."""
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "results.json", json.dumps(self.to_json(), indent=1, default=_plain) + "\n")
        _atomic_write(out / "report.md", self.markdown())
        return out / "report.md"


def _plain(value: Any) -> Any:
    """JSON for the tensors and numpy scalars a report may hold."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _atomic_write(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
