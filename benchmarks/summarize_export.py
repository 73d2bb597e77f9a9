"""Turn a pytest-benchmark JSON run of test_export_cpu.py into benchmarks/results/cpu_export-CLASS.json:
median latency, rows/s, and speed-ups over flow_matching's ODESolver and the eager fastfm loop
measured in the same run, plus the goals (batch-1 sampling >= 8x, exact 2D likelihood at
batch 1024 >= 4x faster than flow_matching).

    python benchmarks/summarize_export.py RAW.json benchmarks/results/cpu_export-cpu-avx2.json
"""

from __future__ import annotations

from typing import Any

from summarize import machine, versions, write_summary

GOALS = {("mlp", "sample", 1): 8.0, ("mlp", "likelihood", 1024): 4.0}


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    rows = [dict(b["extra_info"], median_s=b["stats"]["median"], rounds=b["stats"]["rounds"])
            for b in raw["benchmarks"] if b["extra_info"]]
    by_case: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_case.setdefault((r["model"], r["task"], r["batch"]), {})[r["impl"]] = r
    for impls in by_case.values():
        for r in impls.values():
            for base in ("flow_matching", "eager"):
                r[f"speedup_vs_{base}"] = impls[base]["median_s"] / r["median_s"] if base in impls else None
    goals = []
    for case, target in GOALS.items():
        engines = {k: v for k, v in by_case.get(case, {}).items() if k not in ("flow_matching", "eager", "compile")}
        if not engines:
            continue
        speedups = {k: round(v["speedup_vs_flow_matching"], 2) for k, v in engines.items()}
        best = max(speedups, key=speedups.__getitem__)
        goals.append({"model": case[0], "task": case[1], "batch": case[2], "goal_speedup_vs_flow_matching": target,
                      "speedups": speedups, "best": best, "met": speedups[best] >= target})
    return {"machine": machine(raw), "hardware": raw["machine_info"].get("hardware"),
            "versions": versions(("torch", "onnxruntime", "onnx", "flow_matching")),
            "datetime": raw.get("datetime"), "goals": goals, "results": rows}


if __name__ == "__main__":
    out = write_summary(summarize)
    for r in out["results"]:
        fm, eager = r["speedup_vs_flow_matching"], r["speedup_vs_eager"]
        print(f"{r['model']:5s} {r['task']:10s} b{r['batch']:<5d} {r['impl']:14s} {1e3 * r['median_s']:10.3f} ms "
              f"{r['rows_per_s']:12.0f} rows/s  x{fm or 0:6.2f} vs flow_matching  x{eager or 0:6.2f} vs eager")
    for g in out["goals"]:
        print(f"goal {g['model']} {g['task']} batch {g['batch']}: best {g['best']} x{g['speedups'][g['best']]} "
              f"(goal x{g['goal_speedup_vs_flow_matching']}) {'met' if g['met'] else 'NOT met'}")
