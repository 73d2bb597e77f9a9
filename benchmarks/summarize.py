"""Turn a pytest-benchmark JSON run into benchmarks/results/<name>.json: for kernels GB/s, % of the
copy bandwidth measured in the same run at the same size and speed-up over the eager reference;
for rows naming a ``baseline`` (training steps, engines) the speed-up over it in the same run.

    python benchmarks/summarize.py RAW.json benchmarks/results/cpu_kernels.json
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable


def speedups(rows: list[dict]) -> None:
    """Rows naming a ``baseline`` impl get ``speedup_vs_<baseline>`` against that impl's row of the same case."""
    median = {(r["case"], r["impl"]): r["median_s"] for r in rows if "case" in r}
    for r in rows:
        if "baseline" in r:
            base = median.get((r["case"], r["baseline"]))
            r[f"speedup_vs_{r['baseline']}"] = base / r["median_s"] if base else None


def versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed versions of the packages a run compared (None where one is missing)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def summarize(raw: dict) -> dict:
    rows = [dict(b["extra_info"], median_s=b["stats"]["median"]) for b in raw["benchmarks"] if b["extra_info"]]
    speedups(rows)
    copy = {tuple(r["size"]): r["gb_per_s"] for r in rows if r["op"] == "copy"}
    eager = {(r["op"], r.get("noise"), tuple(r["size"])): r["median_s"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        if "size" not in r:
            continue
        size = tuple(r["size"])
        if r["op"] != "copy":
            r["pct_of_copy_bandwidth"] = 100 * r["gb_per_s"] / copy[size] if size in copy else None
            base = eager.get((r["op"], r.get("noise"), size))
            r["speedup_vs_eager"] = base / r["median_s"] if base else None
    machine = raw["machine_info"]
    cpu = machine.get("cpu", {})
    return {"machine": {"cpu": cpu.get("brand_raw"), "cores": cpu.get("count"), "arch": machine.get("machine"),
                        "python": machine.get("python_version"), "torch": machine.get("torch"),
                        "torch_threads": machine.get("torch_threads")},
            "versions": versions(("torch", "flow_matching", "torchcfm")),
            "datetime": raw.get("datetime"), "results": rows}


def write_summary(summarize_fn: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Summarize the pytest-benchmark JSON named by argv[1] into the file argv[2]; returns the summary."""
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    out = summarize_fn(json.loads(src.read_text()))
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    out = write_summary(summarize)
    for r in out["results"]:
        if "baseline" in r:
            sp = r[f"speedup_vs_{r['baseline']}"]
            print(f"{r['op']:13s} {r['case']:8s} {r['impl']:22s} {r['median_s'] * 1e3:9.2f} ms  "
                  f"x{sp or 0:5.2f} vs {r['baseline']}")
        elif r["op"] != "copy":
            pct, sp = r["pct_of_copy_bandwidth"], r["speedup_vs_eager"]
            print(f"{r['op']:13s} {r['impl']:8s} {r.get('noise', ''):5s} {str(r['size']):14s} "
                  f"{r['gb_per_s']:7.2f} GB/s  {pct or 0:5.1f}% of copy  x{sp or 0:5.2f} vs eager")
