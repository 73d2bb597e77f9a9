"""A/B of the C++ kernels in one process: this checkout's ``fastfm._C`` against another build of it.

    python benchmarks/ab_cpu_noise.py OLD_C_SO OUT.json

Used for the change of the noise stream (one Philox call per element -> one per four elements): both
extensions take the same raw-pointer arguments, so the same inputs go through both, interleaved (rounds
of A then B, median of rounds), on the sizes of ``benchmarks/test_kernels_cpu.py``. Writes medians,
ratios old / new and the machine.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
import time

import torch

from fastfm import _C as new

SIZES = [(256, 2), (256, 64), (256, 1024), (256, 12288)]


def load(path: str):
    spec = importlib.util.spec_from_file_location("old_build._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def calls(lib, b: int, d: int, seeded: bool):
    g = torch.Generator().manual_seed(0)
    x1, x0, v = (torch.randn(b, d, generator=g) for _ in range(3))
    a, bb, c, dd, gr = (torch.rand(b, generator=g) for _ in range(5))
    xt, tg, loss, dv = torch.empty(b, d), torch.empty(b, d), torch.empty(b), torch.empty(b, d)
    rng = torch.tensor([7, 0], dtype=torch.int64)
    p0 = 0 if seeded else x0.data_ptr()
    path = lambda: lib.affine_path(xt.data_ptr(), tg.data_ptr(), x1.data_ptr(), p0, a.data_ptr(), bb.data_ptr(),  # noqa: E731
                                   c.data_ptr(), dd.data_ptr(), b, d, 0, rng.data_ptr(), 1.0)

    def fwd_bwd():
        lib.cfm_loss(loss.data_ptr(), v.data_ptr(), x1.data_ptr(), p0, c.data_ptr(), dd.data_ptr(), b, d, 0,
                     rng.data_ptr(), 1.0)
        lib.cfm_loss_grad(dv.data_ptr(), gr.data_ptr(), v.data_ptr(), x1.data_ptr(), p0, c.data_ptr(), dd.data_ptr(),
                          b, d, 0, rng.data_ptr(), 1.0)

    return {"path": path, "loss_fwd_bwd": fwd_bwd}


def seconds(fn, budget: float = 0.05) -> float:
    n, t = 1, 0.0
    while t < budget:
        n *= 2
        start = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - start
    return t / n


def main() -> None:
    old = load(sys.argv[1])
    rows = []
    for b, d in SIZES:
        for seeded in (True, False):
            fa, fb = calls(old, b, d, seeded), calls(new, b, d, seeded)
            for op in fa:
                ta, tb = [], []
                for _ in range(7):
                    ta.append(seconds(fa[op]))
                    tb.append(seconds(fb[op]))
                ma, mb = sorted(ta)[3], sorted(tb)[3]
                rows.append({"op": op, "size": [b, d], "noise": "seed" if seeded else "x0", "old_us": ma * 1e6,
                             "new_us": mb * 1e6, "speedup": ma / mb})
                print(f"{op:13s} {b}x{d:<6d} {rows[-1]['noise']:4s} old {ma*1e6:9.1f} us  new {mb*1e6:9.1f} us  "
                      f"x{ma/mb:.2f}", flush=True)
    out = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "threads": new.get_max_threads(), "python": platform.python_version(),
                       "torch": torch.__version__, "noise_path": new.noise_path()},
           "old": sys.argv[1], "rows": rows}
    with open(sys.argv[2], "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
