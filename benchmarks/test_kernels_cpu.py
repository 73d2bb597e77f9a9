"""CPU throughput of the fused ops: C++ kernels vs the eager reference vs torch.compile of the reference.

Bytes that must move: inputs read once and outputs written once (x0 is not counted when the
kernel draws it from a seed). `copy` measures this machine's memcpy bandwidth in the same run.
Run: pytest benchmarks/test_kernels_cpu.py --benchmark-json=out.json, then summarize.py.

torch.compile of the seeded reference is left out: inductor did not finish compiling the
int64-emulated Philox rounds (past 20 minutes and 20 GB of memory on the 2-core machine).
"""

from __future__ import annotations

import pytest
import torch

from fastfm.kernels import cpu, reference
from fastfm.kernels.rng import philox_state

SIZES = [(256, 2), (256, 64), (256, 1024), (256, 12288)]
IMPLS = ["cpp", "eager", "compile"]
pytestmark = pytest.mark.skipif(not cpu.available(), reason="fastfm._C not built")

_compiled: dict[str, object] = {}


def _impl(op: str, impl: str):
    fns = {"path": (cpu.affine_path, reference.affine_path), "loss": (cpu.cfm_loss, reference.cfm_loss),
           "loss_grad": (cpu.cfm_loss_grad, reference.cfm_loss_grad)}
    if impl == "cpp":
        return fns[op][0]
    if impl == "eager":
        return fns[op][1]
    if op not in _compiled:
        _compiled[op] = torch.compile(fns[op][1], dynamic=False)
    return _compiled[op]


def _skip_uncompilable(impl: str, noise: str) -> None:
    if impl == "compile" and noise == "seed":
        pytest.skip("inductor cannot compile the Philox reference in reasonable time (see module doc)")


def _inputs(b: int, d: int):
    g = torch.Generator().manual_seed(0)
    x1, x0, v = (torch.randn(b, d, generator=g) for _ in range(3))
    coefs = [torch.rand(b, generator=g) for _ in range(4)]
    return x1, x0, v, coefs


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_copy(benchmark, record_bandwidth, size):
    x = torch.randn(*size)
    y = torch.empty_like(x)
    benchmark.group = f"path {size[0]}x{size[1]}"
    benchmark(y.copy_, x)
    record_bandwidth(2 * x.numel() * 4, op="copy", impl="torch", size=list(size))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("noise", ["x0", "seed"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_path(benchmark, record_bandwidth, size, noise, impl):
    _skip_uncompilable(impl, noise)
    x1, x0, _, (a, b, c, d) = _inputs(*size)
    fn = _impl("path", impl)
    x0 = x0 if noise == "x0" else None
    benchmark.group = f"path {size[0]}x{size[1]}"
    benchmark(fn, x1, a, b, c, d, x0, None if x0 is not None else philox_state(7), 1.0)
    n = x1.numel() * 4
    record_bandwidth(n * (4 if x0 is not None else 3), op="path", impl=impl, noise=noise, size=list(size))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("noise", ["x0", "seed"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_loss_forward_backward(benchmark, record_bandwidth, size, noise, impl):
    _skip_uncompilable(impl, noise)
    x1, x0, v, (_, _, c, d) = _inputs(*size)
    fwd, bwd = _impl("loss", impl), _impl("loss_grad", impl)
    x0 = x0 if noise == "x0" else None
    grad = torch.ones(size[0])
    rng = None if x0 is not None else philox_state(7)

    def step():
        fwd(v, x1, c, d, x0, rng, 1.0)
        return bwd(grad, v, x1, c, d, x0, rng, 1.0)

    benchmark.group = f"loss {size[0]}x{size[1]}"
    benchmark(step)
    n = x1.numel() * 4
    reads = 2 + (x0 is not None)
    record_bandwidth(n * (reads + reads + 1), op="loss_fwd_bwd", impl=impl, noise=noise, size=list(size))
