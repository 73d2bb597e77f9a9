#!/usr/bin/env bash
# The one GPU check: run it as-is, from the repository root, on a machine with one CUDA GPU and torch and
# triton preinstalled (no network needed):
#
#     bash benchmarks/gpu/check.sh OUTDIR
#
# Stages, most important first, each under its own time limit (seconds), so the whole check ends inside
# 9.6 minutes whatever hangs: everything is fitted to a deadline CHECK_SECONDS (default 525) after the start,
# plus at most 5 s per stage to kill what hangs and a few seconds for the summary:
#   install        40  pip install --no-deps --no-build-isolation -e . (builds fastfm._C; nothing downloaded)
#   wheels         30  the peers' wheels carried in CHECK_WHEELS (default .whl; `make gpu-wheels` downloads
#                      diffusers' and flow_matching's) installed with pip --no-index --no-deps into a temporary
#                      folder put on PYTHONPATH for the later stages; skipped, with the reason, where there are none
#   train          75  python -m fastfm.train --compile --bf16 --device cuda (the default job) -> its test NLL
#   engines        45  export a sampling engine (cudagraph) and a likelihood engine (aoti) of that run, then
#                      python -m fastfm.sample --engine / python -m fastfm.evaluate --engine with them
#   tests          50  tests/test_cuda.py (compiled step, train CLI variants, every engine kind), then the
#                      compiled Triton kernels against the reference (tests/test_kernels_triton.py)
#   benchmarks    the time left to CHECK_SIT_SECONDS (default 150) before the deadline (>= 135 s when the
#                 stages above use their limits), split 3 : 4 : 3, each share taken when its stage starts, so
#                 time an earlier stage leaves goes to the later ones; then bench_sit, until the deadline; each
#                 script gets --budget (its limit - 15 s for start-up and the final JSON), runs its most
#                 important rows first, records the rows it has no time for as skipped, and rewrites its JSON
#                 after every row, so even a killed script leaves results:
#     bench_kernels   benchmarks/gpu/bench_kernels.py -> OUTDIR/gpu_kernels.json
#     bench_train     benchmarks/gpu/bench_train.py   -> OUTDIR/gpu_train.json (eager and compile-bf16,
#                     their flow_matching peers, batch 512 MFU, one-rank DDP)
#     bench_export    benchmarks/gpu/bench_export.py  -> OUTDIR/gpu_export.json
#     bench_sit       benchmarks/gpu/bench_train.py --model sit -> OUTDIR/gpu_sit.json (SiT-B/2, then XL/2, at
#                     batch 256, compile-bf16 with regional compilation, beside diffusers' DiT of the same size;
#                     then one-rank FSDP); 150 s is meant for the B/2 rows (GPU compile times not measured);
#                     XL/2 needs more (CHECK_SIT_SECONDS=400 with CHECK_SECONDS raised alike, or bench_train.py
#                     --model sit run on its own), and its activations at batch 256 may not fit an 80 GB GPU
#                     (the row then records the out-of-memory error)
# Everything printed goes to OUTDIR/check.log; OUTDIR/check.json holds the device, versions, the device's
# capabilities (fastfm.hardware) and what it cannot do, each stage's status (ok, failed with its exit code,
# timed out, or skipped with the reason), seconds and message (the main job's precision, the tests'
# counts and skip reasons, the benchmark rows skipped and why), the main job's test NLL, and the goal
# checks of the four benchmark JSONs. Peers that are not installed (flow_matching, diffusers) are listed as
# missing, not failures. What the device cannot do is skipped with the reason, not failed: the trainer
# runs fp32 where --bf16 is not native, and the scripts record their bf16 rows (bench_kernels' bf16
# dtype, bench_train's compile-bf16 mode and its peer, bench_export's *_bf16 engines) as skipped below
# compute capability 8.0; no stage forces flash attention (check.json says whether the device has it).
#
# Dry run, to check this script end to end before a GPU session (tests/test_gpu_scripts.py runs it):
#
#     CHECK_DRY=1 bash benchmarks/gpu/check.sh OUTDIR
#
# runs every stage for real on the CPU at tiny sizes (about two minutes on two cores), each fixed stage
# under 3x its limit above; check.json and every benchmark JSON say "dry": true:
#   install        skipped, recorded as "skipped (dry): ..." (it would rebuild fastfm._C into the environment
#                  in use)
#   wheels         as above (a temporary folder: the environment in use is left as it is)
#   train          the same command with --device cpu, a tiny MLP, 20 steps and a small evaluation
#   engines        both engines with aoti on the CPU (2 steps, batch 16), the CLIs on 64 points
#   tests          tests/test_cuda.py (it skips without CUDA: check.json records the skips; the Triton kernels'
#                  tests run in the suite, in the Triton interpreter)
#   benchmarks     each script with --dry (the CPU, its --quick sizes): bench_kernels in the Triton
#                  interpreter with aot_eager compile rows, bench_train without the batch 512 and DDP rows,
#                  bench_export on the flow_matching, eager and aoti_bf16 rows, bench_sit on tiny SiTs'
#                  eager and compile-bf16 rows and their diffusers peers, without FSDP
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
rm -f "$OUT/tests.xml"  # the tests stage's JUnit report: none unless this run's tests stage writes one
DEADLINE=$(( $(date +%s) + ${CHECK_SECONDS:-525} ))
SIT_SECONDS=${CHECK_SIT_SECONDS:-150}
WHEELS=${CHECK_WHEELS:-.whl}
DRY=${CHECK_DRY:-0}
if [[ $DRY == 1 ]]; then  # the CPU at tiny sizes, under 3x the GPU's stage limits
    DEVICE=cpu SCALE=3 TRITON_INTERPRET=1
    TRAIN_ARGS=(--steps 20 --batch-size 64 --model-args hidden=32 depth=2 --eval-n 50 --n-samples 200
                --eval-steps 4 --log-every 10)
    SAMPLE_BACKEND=aoti ENGINE_SIZE="--steps 2 --batch 16" SAMPLE_N=64 EVAL_N=64
    TESTS=(tests/test_cuda.py)
    KERNELS_ARGS=(--dry --compile-backend aot_eager --seeded-compile-limit 10 --target-ms 0.5)
    TRAIN_BENCH_ARGS=(--dry --large-batch 0 --no-ddp)
    EXPORT_ARGS=(--dry --rounds 2 --impls flow_matching,eager,aoti_bf16)
    SIT_BENCH_ARGS=(--dry --modes eager,compile-bf16 --no-ddp)
else
    DEVICE=cuda SCALE=1 TRITON_INTERPRET=0
    TRAIN_ARGS=()
    SAMPLE_BACKEND=cudagraph ENGINE_SIZE="--steps 16 --batch 1024" SAMPLE_N=4096 EVAL_N=2000
    TESTS=(tests/test_cuda.py tests/test_kernels_triton.py)
    KERNELS_ARGS=()
    TRAIN_BENCH_ARGS=()
    EXPORT_ARGS=(--rounds 20)
    SIT_BENCH_ARGS=(--modes compile-bf16)
fi
export PYTHONUNBUFFERED=1 TRITON_INTERPRET

# record NAME STATUS MILLISECONDS: one line of stages.tsv.
record() {
    printf '%s\t%s\t%d.%03d\n' "$1" "$2" $(($3 / 1000)) $(($3 % 1000)) >>"$STAGES"
    echo "=== $1: $2" | tee -a "$LOG"
}

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
    record "$name" "$status" "$ms"
}

# A sampling and a likelihood engine of the main job's run, used through the CLIs.
export PY OUT RUN DEVICE SAMPLE_BACKEND ENGINE_SIZE SAMPLE_N EVAL_N
ENGINES='"$PY" -m fastfm.export --checkpoint "$RUN" --task sample --solver midpoint $ENGINE_SIZE \
        --backend "$SAMPLE_BACKEND" --device "$DEVICE" --out "$OUT/engines/sample" --force &&
    "$PY" -m fastfm.export --checkpoint "$RUN" --task likelihood --solver midpoint $ENGINE_SIZE \
        --backend aoti --device "$DEVICE" --out "$OUT/engines/nll" --force &&
    "$PY" -m fastfm.sample --engine "$OUT/engines/sample" --n "$SAMPLE_N" --out "$OUT/engine_samples" &&
    "$PY" -m fastfm.evaluate --engine "$OUT/engines/nll" --checkpoint "$RUN" --n "$EVAL_N" \
        --out "$OUT/engine_eval.json"'

# bench NAME NUM DEN CMD...: a benchmark stage whose limit is NUM/DEN of the time left to BENCH_END
# (at least 30 s); the script gets --budget 15 s under that limit.
bench() {
    local name=$1 num=$2 den=$3 limit
    shift 3
    limit=$(( (BENCH_END - $(date +%s)) * num / den ))
    (( limit < 30 )) && limit=30
    stage "$name" "$limit" "$@" --budget $(( limit - 15 ))
}

if [[ $DRY == 1 ]]; then
    record install "skipped (dry): pip install -e . would rebuild fastfm._C into the environment in use" 0
else
    stage install 40 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    stage wheels 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
        "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    record wheels "skipped: no wheels in $WHEELS (make gpu-wheels downloads the peers' wheels there)" 0
fi
stage train $((75 * SCALE)) "$PY" -m fastfm.train --compile --bf16 --device "$DEVICE" --out "$RUN" --force \
    "${TRAIN_ARGS[@]}"
stage engines $((45 * SCALE)) bash -c "$ENGINES"
stage tests $((50 * SCALE)) "$PY" -m pytest -q -rA -x "${TESTS[@]}" -p no:cacheprovider --junitxml="$OUT/tests.xml"
BENCH_END=$((DEADLINE - SIT_SECONDS))
bench bench_kernels 3 10 "$PY" benchmarks/gpu/bench_kernels.py "$OUT/gpu_kernels.json" "${KERNELS_ARGS[@]}"
bench bench_train 4 7 "$PY" benchmarks/gpu/bench_train.py "$OUT/gpu_train.json" --modes eager,compile-bf16 \
    "${TRAIN_BENCH_ARGS[@]}"
bench bench_export 1 1 "$PY" benchmarks/gpu/bench_export.py "$OUT/gpu_export.json" "${EXPORT_ARGS[@]}"
BENCH_END=$DEADLINE
bench bench_sit 1 1 "$PY" benchmarks/gpu/bench_train.py "$OUT/gpu_sit.json" --model sit "${SIT_BENCH_ARGS[@]}"

"$PY" - "$OUT" "$STAGES" "$RUN" "$DEVICE" "$DRY" <<'EOF'
import collections, importlib.util, json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, stages, run, device = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
report = {"dry": sys.argv[5] == "1", "stages": {},
          "missing": [p for p in ("flow_matching", "diffusers", "torch_tensorrt")
                      if importlib.util.find_spec(p) is None]}
for line in stages.read_text().splitlines():
    name, status, seconds = line.split("\t")
    report["stages"][name] = {"status": status, "seconds": float(seconds)}


def message(stage, text):
    """A stage's message in check.json (what it did instead of, or beside, what was asked)."""
    if stage in report["stages"] and text:
        report["stages"][stage]["message"] = text


try:
    import torch, triton
    report.update(device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda)
except Exception as e:  # the summary must be written whatever is broken
    report["versions_error"] = repr(e)
try:  # what the device does natively, and the messages its rows are skipped with
    sys.path.insert(0, "benchmarks/gpu")
    from common import unsupported_needs
    from fastfm.hardware import capabilities

    caps = capabilities(device)
    report.update(hardware=caps.to_json(), unsupported=unsupported_needs(caps))
except Exception as e:
    report["hardware_error"] = f"{device}: {type(e).__name__}: {e}"
metrics = run / "metrics.jsonl"
if metrics.exists():
    records = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    header = next((r["header"] for r in records if "header" in r), {})
    final = [r["final"] for r in records if "final" in r]
    report["train"] = {"precision": header.get("precision")}
    message("train", (header.get("precision") or {}).get("reason"))
    if final:
        report["train"].update(test=final[-1].get("test"), wall_s=final[-1].get("wall_s"), last=final[-1].get("last"))
junit = out / "tests.xml"
if junit.exists():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    reasons = sorted({s.get("message", "") for s in suite.iter("skipped")})
    report["tests"] = {**counts, "skip_reasons": reasons}
    message("tests", "{tests} tests: {failures} failed, {errors} errors, {skipped} skipped".format(**counts)
            + "".join(f"; skipped: {r}" for r in reasons))
for name in ("kernels", "train", "export", "sit"):  # goal checks of the benchmarks (partial files included)
    path = out / f"gpu_{name}.json"
    try:
        bench = json.loads(path.read_text())
    except Exception as e:
        report.setdefault("goals", {})[name] = {"error": f"{path.name}: {type(e).__name__}: {e}"}
        continue
    rows = [r for v in bench.values() if isinstance(v, list) for r in v if isinstance(r, dict) and "skipped" in r]
    skipped = collections.Counter("time budget spent" if r["skipped"].startswith("time budget") else r["skipped"]
                                  for r in rows)
    report.setdefault("goals", {})[name] = {"complete": bench.get("complete"), "dry": bench.get("dry"),
                                            "goals": bench.get("goals")}
    message(f"bench_{name}", "; ".join(f"{n} rows skipped: {why}" for why, n in skipped.items()))
engine_eval = out / "engine_eval.json"
if engine_eval.exists():
    report["engine_eval"] = json.loads(engine_eval.read_text())
(out / "check.json").write_text(json.dumps(report, indent=2))
print(json.dumps(report["stages"], indent=1))
EOF
