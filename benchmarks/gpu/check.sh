#!/usr/bin/env bash
# The one GPU check: run it as-is, from the repository root, on a machine with one CUDA GPU and torch and
# triton preinstalled (no network needed):
#
#     bash benchmarks/gpu/check.sh OUTDIR
#
# Stages, most important first, each under its own time limit (seconds), so the whole check ends inside
# 8 minutes whatever hangs: everything is fitted to a deadline CHECK_SECONDS (default 450) after the start,
# plus at most 5 s per stage to kill what hangs and a few seconds for the summary:
#   install        40  pip install --no-deps --no-build-isolation -e . (builds fastfm._C; nothing downloaded)
#   train          75  python -m fastfm.train --compile --bf16 --device cuda (the default job) -> its test NLL
#   engines        45  export a sampling engine (cudagraph) and a likelihood engine (aoti) of that run, then
#                      python -m fastfm.sample --engine / python -m fastfm.evaluate --engine with them
#   tests          50  tests/test_cuda.py (compiled step, train CLI variants, every engine kind), then the
#                      compiled Triton kernels against the reference (tests/test_kernels_triton.py)
#   benchmarks    the time left to the deadline (>= 240 s when the stages above use their limits), split
#                 3 : 4 : 3, each share taken when its stage starts, so time an earlier stage leaves goes
#                 to the later ones; each script gets --budget (its limit - 15 s for start-up and the final
#                 JSON), runs its most important rows first, records the rows it has no time for as
#                 skipped, and rewrites its JSON after every row, so even a killed script leaves results:
#     bench_kernels   benchmarks/gpu/bench_kernels.py -> OUTDIR/gpu_kernels.json
#     bench_train     benchmarks/gpu/bench_train.py   -> OUTDIR/gpu_train.json (eager and compile-bf16,
#                     their flow_matching peers, batch 512 MFU, one-rank DDP)
#     bench_export    benchmarks/gpu/bench_export.py  -> OUTDIR/gpu_export.json
# Everything printed goes to OUTDIR/check.log; OUTDIR/check.json holds the device, versions, each
# stage's status (ok, failed with its exit code, or timed out) and seconds, the main job's test NLL,
# and the goal checks of the three benchmark JSONs. Peers that are not installed (flow_matching) are
# listed as missing, not failures.
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu/check.sh OUTDIR}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.."
LOG="$OUT/check.log"
STAGES="$OUT/stages.tsv"
RUN="$OUT/run"
: >"$LOG"
: >"$STAGES"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
DEADLINE=$(( $(date +%s) + ${CHECK_SECONDS:-450} ))

# stage NAME LIMIT CMD...: run CMD under a time limit, log its output, record status and seconds.
stage() {
    local name=$1 limit=$2 start rc status ms
    shift 2
    echo "=== $name (limit ${limit}s): $*" >>"$LOG"
    start=$(date +%s%N)
    timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out" ;;
        *) status="failed ($rc)" ;;
    esac
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    printf '%s\t%s\t%d.%03d\n' "$name" "$status" $((ms / 1000)) $((ms % 1000)) >>"$STAGES"
    echo "=== $name: $status" | tee -a "$LOG"
}

# A sampling and a likelihood engine of the main job's run, used through the CLIs.
export PY OUT RUN
ENGINES='"$PY" -m fastfm.export --checkpoint "$RUN" --task sample --solver midpoint --steps 16 --batch 1024 \
        --backend cudagraph --device cuda --out "$OUT/engines/sample" --force &&
    "$PY" -m fastfm.export --checkpoint "$RUN" --task likelihood --solver midpoint --steps 16 --batch 1024 \
        --backend aoti --device cuda --out "$OUT/engines/nll" --force &&
    "$PY" -m fastfm.sample --engine "$OUT/engines/sample" --n 4096 --out "$OUT/engine_samples" &&
    "$PY" -m fastfm.evaluate --engine "$OUT/engines/nll" --checkpoint "$RUN" --n 2000 --out "$OUT/engine_eval.json"'

# bench NAME NUM DEN CMD...: a benchmark stage whose limit is NUM/DEN of the time left to the deadline
# (at least 30 s); the script gets --budget 15 s under that limit.
bench() {
    local name=$1 num=$2 den=$3 limit
    shift 3
    limit=$(( (DEADLINE - $(date +%s)) * num / den ))
    (( limit < 30 )) && limit=30
    stage "$name" "$limit" "$@" --budget $(( limit - 15 ))
}

stage install 40 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
stage train 75 "$PY" -m fastfm.train --compile --bf16 --device cuda --out "$RUN" --force
stage engines 45 bash -c "$ENGINES"
stage tests 50 "$PY" -m pytest -q -rA -x tests/test_cuda.py tests/test_kernels_triton.py -p no:cacheprovider
bench bench_kernels 3 10 "$PY" benchmarks/gpu/bench_kernels.py "$OUT/gpu_kernels.json"
bench bench_train 4 7 "$PY" benchmarks/gpu/bench_train.py "$OUT/gpu_train.json" --modes eager,compile-bf16
bench bench_export 1 1 "$PY" benchmarks/gpu/bench_export.py "$OUT/gpu_export.json" --rounds 20

"$PY" - "$OUT" "$STAGES" "$RUN" <<'EOF'
import importlib.util, json, sys
from pathlib import Path

out, stages, run = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
report = {"stages": {}, "missing": [p for p in ("flow_matching", "torch_tensorrt") if importlib.util.find_spec(p) is None]}
for line in stages.read_text().splitlines():
    name, status, seconds = line.split("\t")
    report["stages"][name] = {"status": status, "seconds": float(seconds)}
try:
    import torch, triton
    report.update(device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda)
except Exception as e:  # the summary must be written whatever is broken
    report["versions_error"] = repr(e)
metrics = run / "metrics.jsonl"
if metrics.exists():
    final = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    final = [r["final"] for r in final if "final" in r]
    if final:
        report["train"] = {"test": final[-1].get("test"), "wall_s": final[-1].get("wall_s"),
                           "last": final[-1].get("last")}
for name in ("kernels", "train", "export"):  # goal checks of the benchmarks (partial files included)
    path = out / f"gpu_{name}.json"
    try:
        bench = json.loads(path.read_text())
        report.setdefault("goals", {})[name] = {"complete": bench.get("complete"), "goals": bench.get("goals")}
    except Exception as e:
        report.setdefault("goals", {})[name] = {"error": f"{path.name}: {type(e).__name__}: {e}"}
engine_eval = out / "engine_eval.json"
if engine_eval.exists():
    report["engine_eval"] = json.loads(engine_eval.read_text())
(out / "check.json").write_text(json.dumps(report, indent=2))
print(json.dumps(report["stages"], indent=1))
EOF
