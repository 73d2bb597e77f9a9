"""GPU check and benchmark of the Triton kernels (run on a CUDA machine):

    python benchmarks/gpu/bench_kernels.py OUT.json [--budget SECONDS]

1. Correctness: the Triton kernels against kernels/reference.py on odd shapes, fp32/bf16/fp16, x0 given
   and seeded (same stream as the reference), loss gradient against the reference gradient.
2. Speed, for every (op, noise, dtype, size): op in path (x_t and target), loss_fwd (per-sample loss),
   loss_bwd (dL/dv); noise x0 given or seeded (drawn in the kernel); fp32 and bf16; sizes from 1M
   elements to 128M (each tensor >= 256 MiB in both dtypes), rows of D = 3072 (a CIFAR-10 image):
     triton         the public functions of fastfm.kernels.triton_kernels
     compile        torch.compile (inductor) of the same function of kernels/reference.py, compiled
                    fresh per row (dynamo reset: no recompile limit), fullgraph, static shapes, every
                    call counted: a row that did not run compiled code says so (``compiled`` false and
                    ``reason``) instead of timing eager code. Seeded: the exact Philox reference, tried
                    once under a time limit (inductor has not finished compiling it); when it does not
                    compile every seeded ``compile`` row records why.
     compile_randn  seeded only: the reference math with x0 = torch.randn inside the compiled function
                    (inductor fuses its own Philox into the kernel: the same math, its own stream)
     copy           a device-to-device copy of one tensor of the size (the bandwidth yardstick)
   Bytes: each input read once, each output written once. ``ms`` is device time (replays of a CUDA
   graph of many calls), ``ms_launch`` the same calls launched eagerly; GB/s and % of copy use ``ms``.
3. ``cases`` joins the rows per (op, noise, dtype, size): Triton GB/s, % of copy, the fastest compiled
   inductor row and Triton's speedup over it; ``goals`` checks >= 85 % of copy where each tensor is
   >= 256 MiB and >= 1.2x inductor from 1M elements up, as booleans with the failing cases.

The JSON is rewritten after every row (``complete`` false until the end), so a run stopped by its
time limit keeps what it measured; ``--budget`` skips (and records) rows once the seconds are spent,
cheapest and most important rows first: all Triton and copy rows, then inductor x0-given, then
inductor seeded. ``--device cpu --quick`` runs the same code on tiny sizes on the CPU (Triton in its
interpreter); the test suite runs it so, with ``--compile-backend aot_eager``; ``--dry`` is that, marked
``dry`` in the JSON (check.sh's dry run). A dtype the device does not run natively (bf16 below compute
capability 8.0 or on a CPU without AVX512-BF16 / AMX-BF16; fp16 on such a CPU) is left out of the check and
the rows, and recorded as skipped with the reason (``common.unsupported``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

if not torch.cuda.is_available():  # the Triton interpreter on CPU-only machines; must precede `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (Budget, Results, add_common_args, compile_checked, environment, log, parse_args,  # noqa: E402
                    time_kernel, timed, unsupported)

from fastfm.hardware import Capabilities, capabilities  # noqa: E402
from fastfm.kernels import reference, triton_kernels  # noqa: E402
from fastfm.kernels.rng import philox_state  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
OPS = ("path", "loss_fwd", "loss_bwd")
NOISES = ("x0", "seed")
D = 3072  # elements per sample: one CIFAR-10 image
SIZES = (2**20, 2**24, 2**27)  # elements: 1M, 16M, 128M (>= 256 MiB per tensor in fp32 and bf16)
QUICK_SIZES = (2**12,)
BIG_BYTES = 2**28  # 256 MiB: where the copy-bandwidth goal applies
GOAL_PCT_OF_COPY, GOAL_VS_INDUCTOR, GOAL_MIN_NUMEL = 85.0, 1.2, 2**20
REFERENCE = {"path": reference.affine_path, "loss_fwd": reference.cfm_loss, "loss_bwd": reference.cfm_loss_grad}
TRITON = {"path": triton_kernels.affine_path, "loss_fwd": triton_kernels.cfm_loss,
          "loss_bwd": triton_kernels.cfm_loss_grad}


# ----------------------------------------------------------------------------- correctness


def check(caps: Capabilities, quick: bool) -> list[dict]:
    """Triton against the reference per dtype, shape and noise; a dtype the device cannot run is one skipped row."""
    device = torch.device(caps.device).type
    out: list[dict] = []
    shapes = [(3,), (5, 7)] if quick else [(1,), (3,), (5, 7), (2, 3, 17, 19), (1, 100003),
                                                                  (257, 1025)]
    for dtype, tol in TOL.items():
        reason = unsupported(caps, NAMES[dtype])
        if reason is not None:
            out.append({"dtype": str(dtype), "skipped": reason})
            continue
        for shape in shapes:
            g = torch.Generator(device=device).manual_seed(0)
            x1 = torch.randn(shape, device=device, generator=g).to(dtype)
            x0 = torch.randn(shape, device=device, generator=g).to(dtype)
            v = torch.randn(shape, device=device, generator=g).to(dtype)
            a, b, c, d = (torch.randn(shape[0], device=device, generator=g) for _ in range(4))
            for noise in (x0, None):
                rng = philox_state(11, device=device) if noise is None else None
                xt, tg = triton_kernels.affine_path(x1, a, b, c, d, noise, rng, 0.5)
                rxt, rtg = reference.affine_path(x1, a, b, c, d, noise, rng, 0.5)
                loss = triton_kernels.cfm_loss(v, x1, c, d, noise, rng, 0.5)
                rloss = reference.cfm_loss(v, x1, c, d, noise, rng, 0.5)
                grad = triton_kernels.cfm_loss_grad(torch.ones_like(loss), v, x1, c, d, noise, rng, 0.5)
                rgrad = reference.cfm_loss_grad(torch.ones_like(loss), v, x1, c, d, noise, rng, 0.5)
                err = max(float((p.float() - q.float()).abs().max()) for p, q in
                          [(xt, rxt), (tg, rtg), (loss, rloss), (grad, rgrad)])
                scale = max(1.0, float(rxt.float().abs().max()), float(rloss.abs().max()))
                out.append({"dtype": str(dtype), "shape": list(shape), "noise": "x0" if noise is not None else "seed",
                            "max_abs_err": err, "ok": err <= tol * scale * 4})
    return out


# ----------------------------------------------------------------------------- cases


class Case:
    """Tensors of one (dtype, size): rows of D elements, per-sample fp32 coefficients, a noise state."""

    def __init__(self, numel: int, dtype: torch.dtype, device: str) -> None:
        self.batch = max(1, math.ceil(numel / D))
        self.dtype, self.device = dtype, device
        shape = (self.batch, D)
        g = torch.Generator(device=device).manual_seed(0)
        self.x1, self.x0, self.v = (torch.randn(shape, device=device, generator=g, dtype=torch.float32).to(dtype)
                                    for _ in range(3))
        self.a, self.b, self.c, self.d, self.g = (torch.rand(self.batch, device=device, generator=g)
                                                  for _ in range(5))
        self.rng = philox_state(3, device=device)
        self.numel = self.x1.numel()
        self.tensor_bytes = self.numel * self.x1.element_size()

    def args(self, op: str, noise: str) -> tuple:
        """Arguments of the triton / reference function of ``op`` (same signature)."""
        z, rng = (self.x0, None) if noise == "x0" else (None, self.rng)
        if op == "path":
            return (self.x1, self.a, self.b, self.c, self.d, z, rng, 1.0)
        if op == "loss_fwd":
            return (self.v, self.x1, self.c, self.d, z, rng, 1.0)
        return (self.g, self.v, self.x1, self.c, self.d, z, rng, 1.0)

    def nbytes(self, op: str, noise: str) -> int:
        """Each input read once, each output written once (coefficients and per-sample outputs included)."""
        x0 = noise == "x0"
        per_sample = 4 * self.batch
        if op == "path":  # read x1 [, x0], a, b, c, d; write x_t, target
            return self.tensor_bytes * (3 + x0) + 4 * per_sample
        if op == "loss_fwd":  # read v, x1 [, x0], c, d; write the loss (B,)
            return self.tensor_bytes * (2 + x0) + 3 * per_sample
        return self.tensor_bytes * (3 + x0) + 3 * per_sample  # read g, v, x1 [, x0], c, d; write dv


def _randn_fn(op: str) -> Callable:
    """The reference math with x0 = std * torch.randn drawn inside the function (inductor fuses its RNG)."""
    ref = REFERENCE[op]

    def path(x1, a, b, c, d, x0, rng, std):
        return ref(x1, a, b, c, d, std * torch.randn(x1.shape, device=x1.device), None, 1.0)

    def loss_fwd(v, x1, c, d, x0, rng, std):
        return ref(v, x1, c, d, std * torch.randn(x1.shape, device=x1.device), None, 1.0)

    def loss_bwd(g, v, x1, c, d, x0, rng, std):
        return ref(g, v, x1, c, d, std * torch.randn(x1.shape, device=x1.device), None, 1.0)

    return {"path": path, "loss_fwd": loss_fwd, "loss_bwd": loss_bwd}[op]


def _copier(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A device-to-device copy of ``x`` into a buffer of its size (freed with the closure)."""
    y = torch.empty_like(x)
    return lambda: y.copy_(x)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class Bench:
    def __init__(self, results: Results, budget: Budget, device: str, sizes: list[int], dtypes: list[str],
                 ops: list[str], backend: str, seeded_limit: float, target_ms: float, eager: bool) -> None:
        self.results, self.budget, self.device = results, budget, device
        self.sizes, self.dtypes, self.ops = sizes, dtypes, ops
        self.backend, self.seeded_limit, self.target_ms, self.eager = backend, seeded_limit, target_ms, eager
        self.reps = 3 if device == "cpu" else 5
        self.copy: dict[tuple[str, int], float] = {}
        self.triton_out: dict[tuple, torch.Tensor] = {}
        self._case: tuple[tuple[str, int], Case] | None = None

    def case(self, dtype: str, numel: int) -> Case:
        key = (dtype, numel)
        if self._case is None or self._case[0] != key:
            self._case = None
            if self.device == "cuda":
                torch.cuda.empty_cache()
            self._case = (key, Case(numel, DTYPES[dtype], self.device))
        return self._case[1]

    def row(self, op: str, noise: str, dtype: str, numel: int, impl: str) -> dict[str, Any]:
        return {"op": op, "noise": noise, "dtype": dtype, "numel": numel, "impl": impl}

    def emit(self, row: dict[str, Any]) -> None:
        self.results.append("bench", row)
        log(row)

    def measure(self, row: dict[str, Any], case: Case, fn: Callable[[], Any], nbytes: int) -> None:
        t = time_kernel(fn, self.device, target_ms=self.target_ms, reps=self.reps)
        gbs = nbytes / t["ms"] / 1e6
        row.update(shape=[case.batch, D], tensor_mb=case.tensor_bytes / 2**20, bytes=nbytes, **t, gb_per_s=gbs,
                   gb_per_s_launch=nbytes / t["ms_launch"] / 1e6)
        copy = self.copy.get((row["dtype"], row["numel"]))
        if copy:
            row.update(copy_gb_per_s=copy, pct_of_copy=100 * gbs / copy)

    # --------------------------------------------------------------- passes (most important first)

    def pass_triton(self) -> None:
        """Copy and Triton rows of every case: no compilation, the numbers every goal needs."""
        for dtype in self.dtypes:
            for numel in self.sizes:
                if not self.budget.allows():
                    for op in self.ops:
                        for noise in NOISES:
                            self.emit(self.budget.skipped(self.row(op, noise, dtype, numel, "triton")))
                    continue
                case = self.case(dtype, numel)
                row = {"op": "copy", "noise": None, "dtype": dtype, "numel": numel, "impl": "copy"}
                self.measure(row, case, _copier(case.x1), 2 * case.tensor_bytes)
                self.copy[(dtype, numel)] = row["gb_per_s"]
                row.update(copy_gb_per_s=row["gb_per_s"], pct_of_copy=100.0)
                self.emit(row)
                for op in self.ops:
                    for noise in NOISES:
                        row = self.row(op, noise, dtype, numel, "triton")
                        args, fn = case.args(op, noise), TRITON[op]
                        try:
                            self.measure(row, case, lambda: fn(*args), case.nbytes(op, noise))
                            if noise == "x0":
                                self.triton_out[(op, dtype, numel)] = _first(fn(*args)).float().flatten()[:1 << 20]
                        except Exception as e:
                            row["error"] = f"{type(e).__name__}: {e}"[:1000]
                        self.emit(row)
                        if self.eager:
                            row = self.row(op, noise, dtype, numel, "eager")
                            args, ref = case.args(op, noise), REFERENCE[op]
                            self.measure(row, case, lambda: ref(*args), case.nbytes(op, noise))
                            self.emit(row)

    def compiled_row(self, op: str, noise: str, dtype: str, numel: int, impl: str, fn: Callable,
                     limit: float | None) -> dict[str, Any]:
        row = self.row(op, noise, dtype, numel, impl)
        if not self.budget.allows():
            return self.budget.skipped(row)
        case = self.case(dtype, numel)
        args = case.args(op, noise)
        left = self.budget.left()  # a compile never runs past the budget (then the row says so)
        limit = None if limit is None and left == float("inf") else max(1.0, min(limit or left, left))
        cc, info = compile_checked(fn, args, backend=self.backend, fresh=True, time_limit_s=limit)
        row["compile"] = info
        row["compiled"] = info["compiled"]
        if cc is None:
            row["reason"] = info["reason"]
            return row
        try:
            with timed(cc, info):
                self.measure(row, case, lambda: cc(*args), case.nbytes(op, noise))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:1000]
        row["compiled"] = info["compiled"]
        if not info["compiled"]:  # some call ran eager: the time is not inductor's
            row["reason"] = info["reason"]
        ref = self.triton_out.get((op, dtype, numel))
        if noise == "x0" and ref is not None and "error" not in row:
            row["max_abs_vs_triton"] = float((_first(cc(*args)).float().flatten()[:ref.numel()] - ref).abs().max())
        return row

    def pass_compile(self, noise: str) -> None:
        for dtype in self.dtypes:
            for numel in self.sizes:
                for op in self.ops:
                    fn = REFERENCE[op] if noise == "x0" else _randn_fn(op)
                    impl = "compile" if noise == "x0" else "compile_randn"
                    self.emit(self.compiled_row(op, noise, dtype, numel, impl, fn, None))

    def pass_compile_seeded_exact(self) -> None:
        """The exact Philox reference under inductor: one attempt first (smallest case), under a time limit;
        when it does not compile, every other seeded ``compile`` row records that instead of trying."""
        first_fail: str | None = None
        if self.seeded_limit <= 0:
            first_fail = "not attempted (--seeded-compile-limit 0)"
        for dtype in self.dtypes:
            for numel in self.sizes:
                for op in self.ops:
                    if first_fail is not None:
                        row = self.row(op, "seed", dtype, numel, "compile")
                        row.update(compiled=False, reason=first_fail)
                        self.emit(row)
                        continue
                    row = self.compiled_row(op, "seed", dtype, numel, "compile", REFERENCE[op], self.seeded_limit)
                    self.emit(row)
                    if not row.get("compiled") and "skipped" not in row:
                        first_fail = (f"not attempted: the exact Philox reference did not compile for {op} {dtype} "
                                      f"{numel}: {row.get('reason')}")


# ----------------------------------------------------------------------------- summary and goals


def summarize(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One entry per (op, noise, dtype, numel): Triton vs copy and vs the fastest compiled inductor row."""
    cases: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r["impl"] in ("copy", "all"):
            continue
        key = (r["op"], r["noise"], r["dtype"], r["numel"])
        c = cases.setdefault(key, {"op": r["op"], "noise": r["noise"], "dtype": r["dtype"], "numel": r["numel"]})
        if r.get("gb_per_s") is None or "error" in r:
            continue
        if r["impl"] == "triton":
            c.update(triton_gb_per_s=r["gb_per_s"], pct_of_copy=r.get("pct_of_copy"), tensor_mb=r["tensor_mb"],
                     each_tensor_ge_256mb=r["tensor_mb"] * 2**20 >= BIG_BYTES)
        elif r["impl"].startswith("compile") and r.get("compiled"):
            if r["gb_per_s"] > c.get("inductor_gb_per_s", 0.0):
                c.update(inductor_impl=r["impl"], inductor_gb_per_s=r["gb_per_s"])
    out = []
    for c in cases.values():
        if "triton_gb_per_s" in c and "inductor_gb_per_s" in c:
            c["speedup_vs_inductor"] = c["triton_gb_per_s"] / c["inductor_gb_per_s"]
        if c.get("each_tensor_ge_256mb") and c.get("pct_of_copy") is not None:
            c["meets_copy_goal"] = c["pct_of_copy"] >= GOAL_PCT_OF_COPY
        if c["numel"] >= GOAL_MIN_NUMEL and "speedup_vs_inductor" in c:
            c["meets_inductor_goal"] = c["speedup_vs_inductor"] >= GOAL_VS_INDUCTOR
        out.append(c)

    def goal(flag: str, applies: Callable[[dict], bool]) -> dict[str, Any]:
        relevant = [c for c in out if applies(c)]
        fails = [_name(c) for c in relevant if c.get(flag) is False]
        unmeasured = [_name(c) for c in relevant if flag not in c]
        met = None if len(unmeasured) == len(relevant) else (not fails and not unmeasured)
        return {"met": met, "cases": len(relevant), "measured": len(relevant) - len(unmeasured),
                "failing": fails, "unmeasured": unmeasured}

    goals = {
        "pct_of_copy_ge_85_at_256mb": goal("meets_copy_goal", _big),
        "speedup_vs_inductor_ge_1_2_from_1m": goal("meets_inductor_goal", lambda c: c["numel"] >= GOAL_MIN_NUMEL),
        "thresholds": {"pct_of_copy": GOAL_PCT_OF_COPY, "tensor_bytes": BIG_BYTES,
                       "speedup_vs_inductor": GOAL_VS_INDUCTOR, "min_numel": GOAL_MIN_NUMEL},
    }
    return out, goals


def _big(c: dict[str, Any]) -> bool:
    return c["numel"] * (4 if c["dtype"] == "fp32" else 2) >= BIG_BYTES


def _count(text: str) -> int:
    """An element count: 1048576, 2^20 or 2**20."""
    base, sep, exp = text.strip().replace("**", "^").partition("^")
    return int(base) ** int(exp) if sep else int(base)


def _name(c: dict[str, Any]) -> str:
    return f"{c['op']}/{c['noise']}/{c['dtype']}/{c['numel']}"


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="GPU check and benchmark of the Triton kernels")
    p.add_argument("out", nargs="?", default="gpu_kernels.json")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a short check (a check of this script)")
    p.add_argument("--sizes", default=None, help="comma-separated element counts (default 2^20,2^24,2^27)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile rows")
    p.add_argument("--seeded-compile-limit", type=float, default=20.0,
                   help="seconds for inductor to compile the exact seeded (Philox) reference; 0 skips it")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check")
    p.add_argument("--eager", action="store_true", help="also time the eager reference")
    p.add_argument("--target-ms", type=float, default=None, help="length of one timing repetition")
    add_common_args(p)
    args = parse_args(p, argv)
    caps = capabilities(args.device)
    sizes = [_count(s) for s in args.sizes.split(",")] if args.sizes else list(QUICK_SIZES if args.quick else SIZES)
    dtypes, ops = args.dtypes.split(","), args.ops.split(",")
    if any(d not in DTYPES for d in dtypes) or any(o not in OPS for o in ops):
        p.error(f"--dtypes must be a subset of {tuple(DTYPES)} and --ops of {OPS}")
    skipped = {d: reason for d in dtypes if (reason := unsupported(caps, d)) is not None}
    budget = Budget(args.budget)
    results = Results(args.out, **environment(caps, args.dry), quick=args.quick, sizes=sizes, row_length=D,
                      compile_backend=args.compile_backend,
                      timing="ms: CUDA-graph replay of n calls (device time, L2 warm); ms_launch: eager calls "
                             "timed by CUDA events; wall clock on CPU",
                      triton_interpreter=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
    if not args.no_check and budget.allows():
        checks = check(caps, args.quick)
        results.data.update(checks_ok=all(c["ok"] for c in checks if "skipped" not in c), checks=checks)
        print("checks ok:", results.data["checks_ok"], flush=True)
    results["bench"] = []
    runnable = [d for d in dtypes if d not in skipped]
    bench = Bench(results, budget, args.device, sizes, runnable, ops, args.compile_backend, args.seeded_compile_limit,
                  args.target_ms or (2.0 if args.device == "cpu" else 20.0), args.eager)
    for dtype, reason in skipped.items():
        bench.emit({"dtype": dtype, "impl": "all", "skipped": reason})
    bench.pass_triton()
    bench.pass_compile("x0")
    bench.pass_compile("seed")
    bench.pass_compile_seeded_exact()
    cases, goals = summarize(results["bench"])
    results.data.update(cases=cases, goals=goals, **budget.record())
    out = results.finish()
    print("goals:", {k: v["met"] for k, v in goals.items() if isinstance(v, dict) and "met" in v}, flush=True)
    return out


if __name__ == "__main__":
    main()
