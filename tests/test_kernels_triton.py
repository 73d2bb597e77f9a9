"""Triton kernels (fastfm.kernels.triton_kernels) against the plain-PyTorch spec (kernels/reference.py).

Without a GPU these run in the Triton interpreter on CPU tensors: tests/conftest.py sets
``TRITON_INTERPRET=1`` before anything imports triton (the setting is read at ``@triton.jit`` time).
On a CUDA machine run ``TRITON_INTERPRET=0 pytest tests/test_kernels_triton.py`` to test the compiled
kernels on the GPU.
"""

import re
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")

from fastfm.kernels import ops
from fastfm.kernels import reference as ref
from fastfm.kernels import triton_kernels as tk
from fastfm.kernels.ops import KernelArgumentError
from fastfm.kernels.rng import philox_state

DEVICE = "cpu" if tk.interpret_mode() else "cuda"
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device and TRITON_INTERPRET is not enabled")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol) for outputs stored in the given dtype: one rounding step of the dtype, plus the
# documented 1e-5 absolute agreement of the seeded noise stream for fp32.
TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (1e-3, 1e-3)}
# Tiles are 4096 elements: (3, 1500) has rows of 2 column blocks of 1024 with a partial last one (several
# loss partials per row); (5000, 2) has more rows than one tile holds; (4, 256) fills part of a tile
# exactly; (1, 33) is a batch of one; (5, 7) and (2, 3, 17, 19) have D not a multiple of 4 (a row's last
# Philox call serves fewer than four elements).
SHAPES = [(1,), (3,), (5, 7), (2, 3, 17, 19), (1, 33), (3, 1500), (4, 256), (5000, 2)]
SEED, STD = 1234, 0.7


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the kernels write starts as NaN: outputs must come back fully written."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tk, "_empty", nan_empty)


def _rng(seed, offset=0):
    """The int64 noise state [seed, offset] on the test device."""
    return philox_state(seed, offset, DEVICE)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _data(shape, dtype, seed=0):
    g = _gen(seed)
    B = shape[0]
    x1 = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    x0 = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    a, b, c, d, gr = (torch.rand(B, generator=g).mul(2).sub(0.5).to(DEVICE) for _ in range(5))
    return x1, x0, v, a, b, c, d, gr


def _2d(t):
    """Reference loss flattens from dim 1; a 1-D batch (B,) is the same as (B, 1)."""
    return t.reshape(t.shape[0], -1) if t is not None else None


def _close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not torch.isnan(actual).any(), "output not fully written"
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------- setup


def test_interpret_mode_is_effective():
    kernel = tk._affine_path_kernel
    if DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        assert isinstance(kernel, InterpretedFunction)
    else:
        from triton.runtime.jit import JITFunction

        assert isinstance(kernel, JITFunction)


def test_poisoning_is_active():
    assert torch.isnan(tk._empty((3,), torch.float32, DEVICE)).all()


def test_launches_go_through_wrap_triton(monkeypatch):
    calls = []
    real = tk.wrap_triton

    def spy(kernel):
        calls.append(kernel)
        return real(kernel)

    monkeypatch.setattr(tk, "wrap_triton", spy)
    x1, _, v, a, b, c, d, g = _data((2, 5), torch.float32)
    tk.affine_path(x1, a, b, c, d, rng=_rng(0))
    tk.cfm_loss(v, x1, c, d, rng=_rng(0))
    tk.cfm_loss_grad(g, v, x1, c, d, rng=_rng(0))
    assert len(calls) == 3


# ---------------------------------------------------------------------------------- affine path


@pytest.mark.parametrize("given_x0", [False, True], ids=["seeded", "x0"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_affine_path_matches_reference(shape, dtype, given_x0):
    x1, x0, _, a, b, c, d, _ = _data(shape, dtype)
    x0 = x0 if given_x0 else None
    xt, tg = tk.affine_path(x1, a, b, c, d, x0=x0, rng=_rng(SEED), std=STD)
    rxt, rtg = ref.affine_path(x1, a, b, c, d, x0=x0, rng=_rng(SEED), std=STD)
    _close(xt, rxt, dtype)
    _close(tg, rtg, dtype)


@pytest.mark.parametrize("given_x0", [False, True], ids=["seeded", "x0"])
def test_affine_path_without_target(monkeypatch, given_x0):
    allocs = []
    nan_empty = tk._empty

    def counting_empty(shape, dtype, device):
        allocs.append(tuple(shape))
        return nan_empty(shape, dtype, device)

    monkeypatch.setattr(tk, "_empty", counting_empty)
    x1, x0, _, a, b, c, d, _ = _data((3, 1500), torch.float32)
    x0 = x0 if given_x0 else None
    xt, tg = tk.affine_path(x1, a, b, c, d, x0=x0, rng=_rng(SEED), std=STD, write_target=False)
    assert tg is None and allocs == [(3, 1500)]
    _close(xt, ref.affine_path(x1, a, b, c, d, x0=x0, rng=_rng(SEED), std=STD)[0], torch.float32)
    # c, d are not used at all without a target: any value (even a wrong shape) is ignored
    xt2, _ = tk.affine_path(x1, a, b, None, None, x0=x0, rng=_rng(SEED), std=STD, write_target=False)
    assert torch.equal(xt, xt2)


def test_small_blocks_many_programs(monkeypatch):
    """Tiny tiles: many column blocks per row, several rows per tile, a partial last row block."""
    monkeypatch.setattr(tk, "_TILE", 64)
    assert tk.tile_shape(39) == (8, 8)
    x1, x0, v, a, b, c, d, g = _data((5, 3, 13), torch.float32)
    for z in (None, x0):
        xt, tg = tk.affine_path(x1, a, b, c, d, x0=z, rng=_rng(SEED), std=STD)
        rxt, rtg = ref.affine_path(x1, a, b, c, d, x0=z, rng=_rng(SEED), std=STD)
        _close(xt, rxt, torch.float32)
        _close(tg, rtg, torch.float32)
        loss = tk.cfm_loss(v, x1, c, d, x0=z, rng=_rng(SEED), std=STD)
        torch.testing.assert_close(loss, ref.cfm_loss(v, x1, c, d, x0=z, rng=_rng(SEED), std=STD), rtol=1e-5, atol=1e-6)
        _close(tk.cfm_loss_grad(g, v, x1, c, d, x0=z, rng=_rng(SEED), std=STD),
               ref.cfm_loss_grad(g, v, x1, c, d, x0=z, rng=_rng(SEED), std=STD), torch.float32)


def test_non_contiguous_inputs():
    x1, x0, v, a, b, c, d, g = _data((6, 40), torch.float32)
    x1t, x0t, vt = x1.t(), x0.t(), v.t()  # (40, 6), non-contiguous
    B = 40
    a, b, c, d, g = (torch.linspace(-1, 1, B, device=DEVICE) * (i + 1) for i in range(5))
    xt, tg = tk.affine_path(x1t, a, b, c, d, x0=x0t)
    rxt, rtg = ref.affine_path(x1t, a, b, c, d, x0=x0t)
    _close(xt, rxt, torch.float32)
    _close(tg, rtg, torch.float32)
    torch.testing.assert_close(tk.cfm_loss(vt, x1t, c, d, rng=_rng(3)), ref.cfm_loss(vt, x1t, c, d, rng=_rng(3)),
                               rtol=1e-5, atol=1e-6)
    _close(tk.cfm_loss_grad(g, vt, x1t, c, d, rng=_rng(3)), ref.cfm_loss_grad(g, vt, x1t, c, d, rng=_rng(3)), torch.float32)


def test_empty_batch():
    x1 = torch.zeros(0, 5, device=DEVICE)
    e = torch.zeros(0, device=DEVICE)
    xt, tg = tk.affine_path(x1, e, e, e, e, rng=_rng(0))
    assert xt.shape == tg.shape == (0, 5)
    assert tk.cfm_loss(x1, x1, e, e, rng=_rng(0)).shape == (0,)
    assert tk.cfm_loss_grad(e, x1, x1, e, e, rng=_rng(0)).shape == (0, 5)


# ---------------------------------------------------------------------------------------- noise


def _noise(seed, shape, std=1.0):
    """x_t with a = 1, b = 0 on x1 = 0: exactly the kernel's in-register noise."""
    x1 = torch.zeros(shape, device=DEVICE)
    one, zero = torch.ones(shape[0], device=DEVICE), torch.zeros(shape[0], device=DEVICE)
    return tk.affine_path(x1, one, zero, zero, zero, rng=_rng(seed), std=std, write_target=False)[0]


@pytest.mark.parametrize("seed", [0, 1, 77, 2**31 + 7, 2**40 + 3, 2**64 - 1])
def test_noise_matches_reference_stream(seed):
    shape = (3, 700)
    z = _noise(seed, shape)
    expected = ref.randn(seed, *shape, DEVICE)
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_noise(seed, shape, std=2.5), 2.5 * expected, rtol=1e-6, atol=3e-5)
    assert torch.equal(z, _noise(seed, shape)), "same seed must give bit-identical noise"


def test_noise_seeds_differ_and_statistics():
    z0, z1 = _noise(0, (4, 1024)), _noise(1, (4, 1024))
    assert (z0 != z1).float().mean() > 0.99
    assert abs(z0.mean().item()) < 0.1 and abs(z0.std().item() - 1.0) < 0.1
    # negative seeds are their 64-bit two's complement
    assert torch.equal(_noise(-5, (2, 50)), _noise(2**64 - 5, (2, 50)))


# ----------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("given_x0", [False, True], ids=["seeded", "x0"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cfm_loss_and_grad_match_reference(shape, dtype, given_x0):
    x1, x0, v, _, _, c, d, g = _data(shape, dtype, seed=1)
    x0 = x0 if given_x0 else None
    loss = tk.cfm_loss(v, x1, c, d, x0=x0, rng=_rng(SEED), std=STD)
    expected = ref.cfm_loss(_2d(v), _2d(x1), c, d, x0=_2d(x0), rng=_rng(SEED), std=STD)
    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)
    # fp32 math on the same (upcast) inputs on both sides: only the summation order differs
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    grad = tk.cfm_loss_grad(g, v, x1, c, d, x0=x0, rng=_rng(SEED), std=STD)
    _close(grad, ref.cfm_loss_grad(g, v, x1, c, d, x0=x0, rng=_rng(SEED), std=STD), dtype)


@pytest.mark.parametrize("given_x0", [False, True], ids=["seeded", "x0"])
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 17, 19), (3, 1500)], ids=str)
def test_cfm_loss_grad_matches_autograd(shape, given_x0):
    x1, x0, v, _, _, c, d, g = _data(shape, torch.float32, seed=2)
    x0 = x0 if given_x0 else None
    vr = v.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(ref.cfm_loss(vr, x1, c, d, x0=x0, rng=_rng(SEED), std=STD), vr, grad_outputs=g)
    grad = tk.cfm_loss_grad(g, v, x1, c, d, x0=x0, rng=_rng(SEED), std=STD)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_cfm_loss_is_deterministic_and_consistent_with_path():
    x1, _, v, a, b, c, d, _ = _data((3, 1500), torch.float32, seed=3)
    l1 = tk.cfm_loss(v, x1, c, d, rng=_rng(SEED), std=STD)
    assert torch.equal(l1, tk.cfm_loss(v, x1, c, d, rng=_rng(SEED), std=STD))
    _, target = tk.affine_path(x1, a, b, c, d, rng=_rng(SEED), std=STD)
    torch.testing.assert_close(l1, (v - target).pow(2).mean(1), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- validation
# The op layer (fastfm.kernels.ops) validates the arguments of every backend, the Triton rules included; these
# calls go through it with FASTFM_KERNELS=triton.


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTFM_KERNELS", "triton")


def _bad_calls():
    x1, x0, v, a, b, c, d, g = _data((3, 4), torch.float32)
    meta = torch.empty((3, 4), device="meta")
    r = _rng(0)
    cases = {
        "dtype mismatch": lambda: ops.affine_path(x1, a, b, c, d, x0=x0.half()),
        "dtype mismatch ": lambda: ops.cfm_loss(v.bfloat16(), x1, c, d, rng=r),
        "shape mismatch": lambda: ops.affine_path(x1, a, b, c, d, x0=x0[:, :3]),
        "shape mismatch ": lambda: ops.cfm_loss_grad(g, v.reshape(4, 3), x1, c, d, rng=r),
        "device mismatch": lambda: ops.affine_path(x1, a, b, c, d, x0=meta),
        "device mismatch  ": lambda: ops.cfm_loss(v, x1, c.to("meta"), d, rng=r),
        "device mismatch: rng": lambda: ops.affine_path(x1, a, b, c, d, rng=r.to("meta")),
        "shape (B,)": lambda: ops.affine_path(x1, a[:2], b, c, d, rng=r),
        "shape (B,) ": lambda: ops.cfm_loss(v, x1, c.reshape(3, 1), d, rng=r),
        "shape (B,)  ": lambda: ops.cfm_loss_grad(g[:1], v, x1, c, d, rng=r),
        "unsupported dtype": lambda: ops.affine_path(x1.double(), a, b, c, d, rng=r),
        "unsupported dtype ": lambda: ops.cfm_loss(v.int(), x1.int(), c, d, rng=r),
        # 2**31 elements, none allocated (stride 0)
        "more than the triton backend's limit of 2147483647":
            lambda: ops.affine_path(torch.empty(1, device=DEVICE).expand(2, 2**30), a[:2], b[:2], c[:2], d[:2]),
        "batch dimension": lambda: ops.affine_path(torch.tensor(1.0, device=DEVICE), a, b, c, d, rng=r),
        "64 bits": lambda: ops.affine_path(x1, a, b, c, d, rng=_rng(2**64)),
        "floating": lambda: ops.affine_path(x1, a.long(), b, c, d, rng=r),
        "is required when x0 is None": lambda: ops.cfm_loss(v, x1, c, d),
        "int64 tensor of shape (2,)": lambda: ops.affine_path(x1, a, b, c, d, rng=r[:1]),
    }
    return cases


@pytest.mark.parametrize("message", list(_bad_calls()))
def test_bad_inputs_raise_value_error(triton_backend, message):
    with pytest.raises(KernelArgumentError, match=re.escape(message.strip())):
        _bad_calls()[message]()


def test_wrong_argument_types_raise_kernel_argument_error(triton_backend):
    x1, _, _, a, b, c, d, _ = _data((3, 4), torch.float32)
    with pytest.raises(KernelArgumentError, match="seed"):
        _rng(1.5)
    with pytest.raises(KernelArgumentError, match="rng must be the int64 tensor"):
        ops.affine_path(x1, a, b, c, d, rng=7)
    with pytest.raises(KernelArgumentError, match="std"):
        ops.affine_path(x1, a, b, c, d, std="big", rng=_rng(0))
    with pytest.raises(KernelArgumentError, match="x1 must be a torch.Tensor"):
        ops.affine_path(x1.tolist(), a, b, c, d)
    with pytest.raises(KernelArgumentError, match="coefficient c"):
        ops.cfm_loss(x1, x1, 0.5, d, rng=_rng(0))


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter check")
def test_cpu_tensors_without_interpreter_raise(triton_backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x1, _, _, a, b, c, d, _ = _data((2, 3), torch.float32)
    with pytest.raises(KernelArgumentError, match="TRITON_INTERPRET"):
        ops.affine_path(x1, a, b, c, d, rng=_rng(0))


def test_import_without_triton_is_an_import_error():
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        try:
            import fastfm.kernels.triton_kernels
        except ImportError:
            print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
