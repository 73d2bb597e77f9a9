"""Turn a pytest-benchmark JSON run of test_sit_cpu.py into benchmarks/results/cpu_sit-CLASS.json: per
implementation the seconds of its step in each round (the rounds interleave the implementations), images/s at the
median and at the best round, each fastfm row's speed-up over the diffusers row of the same mode, the parameter
counts of the two models, and the goal: fastfm's best step at least 1.2x diffusers' best, measured in the same run.

    python benchmarks/summarize_sit.py RAW.json benchmarks/results/cpu_sit-cpu-avx2.json
"""

from __future__ import annotations

import statistics
from typing import Any

from summarize import machine, versions, write_summary

GOAL_SPEEDUP = 1.2


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for b in raw["benchmarks"]:
        if b["extra_info"]:
            info = {k: v for k, v in b["extra_info"].items() if k != "round"}
            rows.setdefault(info["impl"], dict(info, round_s=[]))["round_s"].append(b["stats"]["median"])
    for r in rows.values():
        r["median_s"], r["min_s"] = statistics.median(r["round_s"]), min(r["round_s"])
        r["img_per_s"], r["img_per_s_best_round"] = r["batch"] / r["median_s"], r["batch"] / r["min_s"]
    peer = {r["mode"]: r for r in rows.values() if r["loop"] == "diffusers"}
    for r in rows.values():
        if r["loop"] == "fastfm" and r["mode"] in peer:
            r["speedup_vs_diffusers"] = peer[r["mode"]]["median_s"] / r["median_s"]
    ours = [r for r in rows.values() if r["loop"] == "fastfm"]
    theirs = [r for r in rows.values() if r["loop"] == "diffusers"]
    goals = []
    if ours and theirs:
        best, rival = (max(side, key=lambda r: r["img_per_s"]) for side in (ours, theirs))
        ratio = best["img_per_s"] / rival["img_per_s"]
        goals.append({"goal": f"fastfm's best SiT-S/2 step >= {GOAL_SPEEDUP:g}x diffusers' best DiT step",
                      "fastfm": best["impl"], "diffusers": rival["impl"], "speedup": ratio,
                      "speedup_best_rounds": best["img_per_s_best_round"] / rival["img_per_s_best_round"],
                      "met": ratio >= GOAL_SPEEDUP})
    params = {r["loop"]: {k: r[k] for k in ("params", "params_counted_once") if k in r} for r in rows.values()}
    return {"machine": machine(raw), "hardware": raw["machine_info"].get("hardware"),
            "versions": versions(("torch", "diffusers")), "datetime": raw.get("datetime"), "params": params,
            "goals": goals, "results": list(rows.values())}


if __name__ == "__main__":
    out = write_summary(summarize)
    for r in out["results"]:
        sp = r.get("speedup_vs_diffusers")
        print(f"{r['impl']:24s} {r['precision']:5s} {r['median_s']:8.2f} s/step  {r['img_per_s']:6.2f} img/s "
              f"(best round {r['img_per_s_best_round']:6.2f}; rounds {r['round_s']})"
              + (f"  x{sp:.2f} vs diffusers" if sp else ""))
    print("params:", out["params"])
    for g in out["goals"]:
        print(f"goal: {g['goal']}: {g['fastfm']} / {g['diffusers']} x{g['speedup']:.2f} "
              f"(best rounds x{g['speedup_best_rounds']:.2f}): {'met' if g['met'] else 'NOT met'}")
