"""Turn a pytest-benchmark JSON run of test_fewstep_cpu.py into benchmarks/results/cpu_fewstep-CLASS.json: median
latency per implementation and batch, speed-ups over flow_matching's 16-step midpoint ODESolver measured in the
same run, each implementation's sample quality (sliced W2 at batch 1024's function) beside the teacher's dopri5
samples, and the goal: a 1-step engine at batch 1 at least 50x faster than flow_matching at equal or better
sliced W2 (the fastest 1-step engine of that quality; where none has it, the best-quality one, not met).

    python benchmarks/summarize_fewstep.py RAW.json benchmarks/results/cpu_fewstep-cpu-avx2.json
"""

from __future__ import annotations

from typing import Any

from summarize import machine, versions, write_summary

GOAL_SPEEDUP = 50.0


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    rows = [dict(b["extra_info"], median_s=b["stats"]["median"]) for b in raw["benchmarks"] if b["extra_info"]]
    base = {r["batch"]: r["median_s"] for r in rows if r["impl"] == "flow_matching"}
    w2 = {r["impl"]: r["quality"]["sliced_wasserstein"] for r in rows if "quality" in r}  # from the batch-1024 rows
    for r in rows:
        r["speedup_vs_flow_matching"] = base[r["batch"]] / r["median_s"] if r["batch"] in base else None
        r["sliced_w2"] = w2.get(r["impl"])
        if "teacher-dopri5" in w2 and r["sliced_w2"] is not None:
            r["w2_vs_dopri5"] = r["sliced_w2"] / w2["teacher-dopri5"]
    one_step = [r for r in rows if r.get("nfe") == 1 and r["batch"] == 1 and r["sliced_w2"] is not None]
    goals = []
    if one_step and "flow_matching" in w2:
        good = [r for r in one_step if r["sliced_w2"] <= w2["flow_matching"]]
        best = max(good or one_step, key=lambda r: r["speedup_vs_flow_matching"] if good else -r["sliced_w2"])
        goals.append({"goal": f"1-step engine at batch 1 >= {GOAL_SPEEDUP:g}x flow_matching (midpoint x 16) at "
                              "equal or better sliced W2", "best": best["impl"],
                      "speedup": best["speedup_vs_flow_matching"], "sliced_w2": best["sliced_w2"],
                      "flow_matching_sliced_w2": w2["flow_matching"],
                      "met": bool(good) and (best["speedup_vs_flow_matching"] or 0.0) >= GOAL_SPEEDUP})
    return {"machine": machine(raw), "hardware": raw["machine_info"].get("hardware"),
            "versions": versions(("torch", "onnxruntime", "onnx", "flow_matching")), "datetime": raw.get("datetime"),
            "goals": goals, "results": rows}


if __name__ == "__main__":
    out = write_summary(summarize)
    for r in out["results"]:
        sp, w2 = r["speedup_vs_flow_matching"], r["sliced_w2"]
        print(f"{r['impl']:20s} b{r['batch']:<5d} {1e3 * r['median_s']:10.3f} ms  x{sp or 0:7.1f} vs flow_matching"
              + (f"  sliced W2 {w2:.4f}" if w2 is not None else ""))
    for g in out["goals"]:
        print(f"goal: {g['goal']}: {g['best']} x{g['speedup']:.1f}, sliced W2 {g['sliced_w2']:.4f} vs "
              f"{g['flow_matching_sliced_w2']:.4f}: {'met' if g['met'] else 'NOT met'}")
