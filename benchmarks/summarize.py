"""Turn a pytest-benchmark JSON run into benchmarks/results/<name>-<class>.json: for kernels GB/s, % of the
copy bandwidth measured in the same run at the same size and speed-up over the eager reference;
for training steps the speed-up of each implementation over each plain loop (flow_matching, torchcfm) in the
same run, and the goal (fastfm's step >= 1.5x the plain loops). Every summary carries the machine's
capabilities as the run saw them (``hardware``: machine class, ISA, native precisions, threads).

    python benchmarks/summarize.py RAW.json benchmarks/results/cpu_kernels-cpu-avx2.json
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable


TRAIN_GOAL = 1.5  # fastfm's training step against each plain loop
PLAIN_LOOPS = ("flow_matching", "torchcfm")


def speedups(rows: list[dict]) -> None:
    """Rows naming a ``baseline`` impl get ``speedup_vs_<loop>`` against each plain loop's row of the same case."""
    median = {(r["case"], r["impl"]): r["median_s"] for r in rows if "case" in r}
    for r in rows:
        if "baseline" in r:
            for loop in PLAIN_LOOPS:
                base = median.get((r["case"], loop))
                r[f"speedup_vs_{loop}"] = base / r["median_s"] if base else None


def train_goals(rows: list[dict]) -> list[dict]:
    """Per case and plain loop: the best fastfm step's speed-up and whether it reaches TRAIN_GOAL."""
    goals = []
    for case in dict.fromkeys(r["case"] for r in rows if r.get("op") == "train_step"):
        ours = [r for r in rows if r.get("case") == case and r["impl"].startswith("fastfm")]
        for loop in PLAIN_LOOPS:
            sp = {r["impl"]: round(r[f"speedup_vs_{loop}"], 2) for r in ours if r.get(f"speedup_vs_{loop}")}
            if sp:
                best = max(sp, key=sp.__getitem__)
                goals.append({"case": case, "vs": loop, "goal": TRAIN_GOAL, "speedups": sp, "best": best,
                              "met": sp[best] >= TRAIN_GOAL})
    return goals


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
    out = {"machine": machine(raw), "hardware": raw["machine_info"].get("hardware"),
           "versions": versions(("torch", "flow_matching", "torchcfm")), "datetime": raw.get("datetime")}
    goals = train_goals(rows)
    return {**out, **({"goals": goals} if goals else {}), "results": rows}


def machine(raw: dict) -> dict[str, Any]:
    """The machine a pytest-benchmark run names (CPU, cores, platform, versions)."""
    info = raw["machine_info"]
    cpu = info.get("cpu", {})
    return {"cpu": cpu.get("brand_raw"), "cores": cpu.get("count"), "arch": info.get("machine"),
            "platform": f"{info.get('system')} {info.get('release')}", "python": info.get("python_version"),
            "torch": info.get("torch"), "torch_threads": info.get("torch_threads")}


def write_summary(summarize_fn: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Summarize the pytest-benchmark JSON named by argv[1] into the file argv[2] and print its machine class; returns
    the summary."""
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    out = summarize_fn(json.loads(src.read_text()))
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(out, indent=2))
    print(f"machine class: {(out['hardware'] or {}).get('machine_class')}")
    return out


if __name__ == "__main__":
    out = write_summary(summarize)
    for r in out["results"]:
        if "baseline" in r:
            sp = "  ".join(f"x{r[f'speedup_vs_{loop}'] or 0:5.2f} vs {loop}" for loop in PLAIN_LOOPS)
            print(f"{r['op']:13s} {r['case']:8s} {r['impl']:22s} {r['median_s'] * 1e3:9.2f} ms  {sp}")
        elif r["op"] != "copy":
            pct, sp = r["pct_of_copy_bandwidth"], r["speedup_vs_eager"]
            print(f"{r['op']:13s} {r['impl']:8s} {r.get('noise', ''):5s} {str(r['size']):14s} "
                  f"{r['gb_per_s']:7.2f} GB/s  {pct or 0:5.1f}% of copy  x{sp or 0:5.2f} vs eager")
    for g in out.get("goals", []):
        print(f"goal {g['case']} vs {g['vs']}: best {g['best']} x{g['speedups'][g['best']]} (goal x{g['goal']}) "
              f"{'met' if g['met'] else 'NOT met'}")
