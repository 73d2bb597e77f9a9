"""The C++/OpenMP CPU kernels (fastfm._C via fastfm.kernels.cpu) against the plain-PyTorch spec.

Every output buffer is poisoned with NaN (an autouse fixture swaps the wrapper's allocator), so any
element a kernel forgets to write fails the comparison with the reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from fastfm.kernels import cpu as K
from fastfm.kernels import ops
from fastfm.kernels import reference as R
from fastfm.kernels.ops import KernelArgumentError
from fastfm.kernels.rng import philox_state as _rng

needs_ext = pytest.mark.skipif(not K.available(), reason="fastfm._C is not built")

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# Odd shapes: scalars per sample, tiny and prime sizes, a single huge row (several chunks per
# row), a batch not a multiple of any chunk size, and many tiny rows (several rows per chunk).
SHAPES = [(1,), (3,), (5, 7), (2, 3, 17, 19), (1, 10007), (3, 20011), (37, 211), (4099, 2)]


def test_extension_builds():
    """The build is part of the product: after `pip install -e .` the extension must import."""
    assert K.available(), f"fastfm._C failed to import: {K._IMPORT_ERROR}"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Outputs start as NaN instead of torch.empty garbage: unwritten elements cannot pass."""
    monkeypatch.setattr(K, "_alloc", lambda shape, dtype: torch.full(shape, float("nan"), dtype=dtype))


@pytest.fixture
def restore_threads():
    if not K.available():
        yield
        return
    n = K.get_num_threads()
    yield
    K.set_num_threads(n)


def _tol(dtype: torch.dtype, seeded: bool) -> dict:
    if dtype == torch.bfloat16:  # one bf16 rounding step (2^-7 relative) either way
        return {"rtol": 1e-2, "atol": 1e-2}
    if seeded:  # log/cos rounding of the noise: 1e-5 absolute for |n| < 6
        return {"rtol": 1e-6, "atol": 1e-5}
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1, x0, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    b = shape[0]
    coef = [torch.rand(b, generator=g) * 2 - 0.5 for _ in range(5)]  # a, b, c, d, grad
    return x1, x0, v, coef


def _flat(t):
    return None if t is None else t.reshape(t.shape[0], -1)


def _ref_loss(v, x1, c, d, x0=None, rng=None, std=1.0):
    # The reference reduces with flatten(1): give it (B, D) views (same loss).
    return R.cfm_loss(_flat(v), _flat(x1), c, d, x0=_flat(x0), rng=rng, std=std)


def _close(actual, expected, **tol):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "kernel left unwritten (NaN-poisoned) elements"
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


# ------------------------------------------------------------------------------------------------
# ops against the reference


@needs_ext
@pytest.mark.parametrize("seeded", [False, True], ids=["x0", "seed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_affine_path_matches_reference(shape, dtype, seeded):
    x1, x0, _, (a, b, c, d, _) = _inputs(shape, dtype)
    kw = {"rng": _rng(1234567), "std": 0.7} if seeded else {"x0": x0}
    x_t, target = K.affine_path(x1, a, b, c, d, **kw)
    rx_t, rtarget = R.affine_path(x1, a, b, c, d, **kw)
    _close(x_t, rx_t, **_tol(dtype, seeded))
    _close(target, rtarget, **_tol(dtype, seeded))

    x_t2, none = K.affine_path(x1, a, b, c, d, write_target=False, **kw)
    assert none is None
    assert torch.equal(x_t2, x_t)


@needs_ext
@pytest.mark.parametrize("seeded", [False, True], ids=["x0", "seed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cfm_loss_and_grad_match_reference(shape, dtype, seeded):
    x1, x0, v, (_, _, c, d, g) = _inputs(shape, dtype, seed=1)
    kw = {"rng": _rng(99), "std": 1.3} if seeded else {"x0": x0}
    loss = K.cfm_loss(v, x1, c, d, **kw)
    ref = _ref_loss(v, x1, c, d, **kw)
    # Losses accumulate in double (the reference in the input's math dtype).
    ltol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 and not seeded else {"rtol": 1e-5, "atol": 1e-5}
    _close(loss, ref, **ltol)

    grad = K.cfm_loss_grad(g, v, x1, c, d, **kw)
    _close(grad, R.cfm_loss_grad(g, v, x1, c, d, **kw), **_tol(dtype, seeded))


@needs_ext
@pytest.mark.parametrize("seeded", [False, True], ids=["x0", "seed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(3,), (5, 7), (2, 3, 17, 19), (2, 9001)], ids=str)
def test_cfm_loss_grad_matches_autograd(shape, dtype, seeded):
    x1, x0, v, (_, _, c, d, g) = _inputs(shape, dtype, seed=2)
    kw = {"rng": _rng(5), "std": 0.9} if seeded else {"x0": x0}
    v = v.requires_grad_(True)
    (expected,) = torch.autograd.grad(_ref_loss(v, x1, c, d, **kw), v, grad_outputs=g)
    grad = K.cfm_loss_grad(g, v.detach(), x1, c, d, **kw)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 and not seeded else {"rtol": 1e-5, "atol": 1e-7}
    _close(grad, expected, **tol)


@needs_ext
def test_noncontiguous_inputs_are_accepted():
    x1, x0, v, (a, b, c, d, g) = _inputs((6, 5, 4), torch.float32, seed=3)
    x1n, x0n, vn = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (x1, x0, v))
    assert not x1n.is_contiguous()
    a2 = torch.stack([a, a], 1)[:, 0]  # strided coefficient
    assert not a2.is_contiguous()
    for got, want in zip(K.affine_path(x1n, a2, b, c, d, x0=x0n), K.affine_path(x1, a, b, c, d, x0=x0)):
        assert torch.equal(got, want)
    assert torch.equal(K.cfm_loss(vn, x1n, c, d, x0=x0n), K.cfm_loss(v, x1, c, d, x0=x0))
    assert torch.equal(K.cfm_loss_grad(g, vn, x1n, c, d, x0=x0n), K.cfm_loss_grad(g, v, x1, c, d, x0=x0))


@needs_ext
def test_empty_inputs():
    for shape in [(0,), (0, 5)]:
        x1 = torch.zeros(shape)
        e = torch.zeros(0)
        x_t, target = K.affine_path(x1, e, e, e, e, rng=_rng(0))
        assert x_t.shape == target.shape == x1.shape
        assert K.cfm_loss(x1, x1, e, e, rng=_rng(0)).shape == (0,)
        assert K.cfm_loss_grad(e, x1, x1, e, e, rng=_rng(0)).shape == x1.shape
    x1, c = torch.zeros(3, 0), torch.ones(3)
    assert torch.isnan(K.cfm_loss(x1, x1, c, c, rng=_rng(0))).all()  # mean over no elements, like torch


# ------------------------------------------------------------------------------------------------
# noise stream


@needs_ext
@pytest.mark.parametrize("seed", [0, 1, 2**40 + 5, -3], ids=str)
def test_stream_equals_reference(seed):
    rows, dim = 37, 1031  # odd: the last Philox call of a row serves 3 elements, and blocks of 512 split rows
    ref = R.randn(seed, rows, dim)
    got = K.randn(seed, rows, dim)
    assert got.dtype == torch.float32 and got.shape == (rows, dim)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(K.randn(seed, 5, dim, offset=30), ref[30:35], rtol=0, atol=1e-5)
    # a row's first columns do not depend on the row length
    torch.testing.assert_close(K.randn(seed, rows, 7), ref[:, :7], rtol=0, atol=1e-5)
    last = R.randn(seed, 2, 9, offset=2**32 - 2)  # the last rows of the stream
    torch.testing.assert_close(K.randn(seed, 2, 9, offset=2**32 - 2), last, rtol=0, atol=1e-5)


@needs_ext
def test_ops_draw_the_seed_stream():
    """Sample r of x0 is std * row r of the seed's stream, viewed as x1's sample shape, in every op."""
    shape, seed, std = (3, 5, 701), 77, 0.25
    z = std * K.randn(seed, shape[0], math.prod(shape[1:])).reshape(shape)
    x1 = torch.randn(shape)
    one, zero = torch.ones(3), torch.zeros(3)
    x_t, target = K.affine_path(x1, one, zero, zero, one, rng=_rng(seed), std=std)
    assert torch.equal(x_t, z) and torch.equal(target, x1)
    # With the noise passed explicitly the ops agree bitwise with the seeded ones.
    _, _, v, (a, b, c, d, g) = _inputs(shape, torch.float32)
    assert all(torch.equal(p, q) for p, q in zip(K.affine_path(x1, a, b, c, d, rng=_rng(seed), std=std),
                                                  K.affine_path(x1, a, b, c, d, x0=z)))
    assert torch.equal(K.cfm_loss(v, x1, c, d, rng=_rng(seed), std=std), K.cfm_loss(v, x1, c, d, x0=z))
    assert torch.equal(K.cfm_loss_grad(g, v, x1, c, d, rng=_rng(seed), std=std), K.cfm_loss_grad(g, v, x1, c, d, x0=z))


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


@needs_ext
def test_noise_statistics():
    from scipy import stats

    n = 1 << 20
    z = K.randn(2024, 1, n)[0]
    five_sigma = 5 / math.sqrt(n)
    assert abs(z.double().mean().item()) < five_sigma
    assert abs(z.double().var().item() - 1) < 5 * math.sqrt(2 / n)
    zs = z.double().numpy()
    assert stats.kstest(zs, "norm").pvalue > 1e-3
    assert stats.normaltest(zs).pvalue > 1e-3
    for lag in (1, 2, 3, 4):  # within and across the four normals of one Philox call
        assert abs(_corr(z[:-lag], z[lag:])) < five_sigma
    for other in (2025, 2024 + 2**32):  # neighbouring seed; same low key word, other high word
        assert abs(_corr(z, K.randn(other, 1, n)[0])) < five_sigma
    # Rows of one batch are different parts of the stream: uncorrelated.
    rows = 4
    one, zero = torch.ones(rows), torch.zeros(rows)
    x_t, _ = K.affine_path(torch.zeros(rows, n // rows), one, zero, zero, zero, rng=_rng(7), write_target=False)
    row_sigma = 5 / math.sqrt(n // rows)
    for i in range(rows - 1):
        assert abs(_corr(x_t[i], x_t[i + 1])) < row_sigma


@needs_ext
def test_determinism_across_calls_threads_and_isas(restore_threads):
    from fastfm import _C

    def run():
        out = []
        for shape in [(1, 50007), (64, 1001), (4099, 2)]:
            x1, _, v, (a, b, c, d, g) = _inputs(shape, torch.float32, seed=4)
            out += list(K.affine_path(x1, a, b, c, d, rng=_rng(31), std=1.1))
            out += [K.cfm_loss(v, x1, c, d, rng=_rng(31)), K.cfm_loss_grad(g, v, x1, c, d, rng=_rng(31))]
        return out

    base = run()
    assert all(torch.equal(p, q) for p, q in zip(base, run())), "repeated calls differ"
    for threads in (1, 3, 2):
        K.set_num_threads(threads)
        assert K.get_num_threads() == threads
        assert all(torch.equal(p, q) for p, q in zip(base, run())), f"results change with {threads} threads"
    # Every noise path this CPU supports (AVX-512 / AVX2 / SSE2 / portable) gives the same bits.
    paths = _C.noise_paths()
    try:
        for path in paths:
            _C.set_noise_path(path)
            got = run()
            assert all(torch.equal(p, q) for p, q in zip(base, got)), path
    finally:
        _C.set_noise_path("auto")


# ------------------------------------------------------------------------------------------------
# input validation (the op layer's, fastfm.kernels.ops)


@needs_ext
def test_bad_inputs_raise_kernel_argument_error_naming_the_argument(monkeypatch):
    """The op layer validates for every backend (here the C++ one); KernelArgumentError is a ValueError."""
    monkeypatch.setenv("FASTFM_KERNELS", "cpp")
    x1, x0, v, (a, b, c, d, g) = _inputs((4, 6), torch.float32)
    r = _rng(0)
    assert issubclass(KernelArgumentError, ValueError)
    with pytest.raises(KernelArgumentError, match="x1 must be float32, float64 or bfloat16"):
        ops.affine_path(torch.ones(4, 6, dtype=torch.int64), a, b, c, d)
    with pytest.raises(KernelArgumentError, match="x0 shape"):
        ops.affine_path(x1, a, b, c, d, x0=torch.zeros(4, 5))
    with pytest.raises(KernelArgumentError, match="x0 dtype"):
        ops.affine_path(x1, a, b, c, d, x0=x0.double())
    with pytest.raises(KernelArgumentError, match="v dtype"):
        ops.cfm_loss(v.to(torch.bfloat16), x1, c, d, rng=r)
    with pytest.raises(KernelArgumentError, match="v shape"):
        ops.cfm_loss_grad(g, v[:, :5], x1, c, d, rng=r)
    with pytest.raises(KernelArgumentError, match=r"^coefficient b must have shape \(B,\) = \(4,\)"):
        ops.affine_path(x1, a, torch.zeros(5), c, d, rng=r)
    with pytest.raises(KernelArgumentError, match=r"^coefficient d must have shape \(B,\) = \(4,\)"):
        ops.cfm_loss(v, x1, c, torch.zeros(4, 1), rng=r)
    with pytest.raises(KernelArgumentError, match=r"^coefficient grad must have shape"):
        ops.cfm_loss_grad(torch.zeros(3), v, x1, c, d, rng=r)
    # the public functions make floating coefficients float32; the op itself takes float32 only
    with pytest.raises(KernelArgumentError, match="^coefficient c must be float32"):
        torch.ops.fastfm.cfm_loss(v, x1, c.double(), d, None, r, 1.0)
    with pytest.raises(KernelArgumentError, match="^coefficient a must be a torch.Tensor"):
        ops.affine_path(x1, [1.0] * 4, b, c, d)
    with pytest.raises(KernelArgumentError, match="x1 must have a batch dimension"):
        ops.affine_path(torch.tensor(1.0), a[:1], b[:1], c[:1], d[:1])
    with pytest.raises(KernelArgumentError, match="seed must be an int"):
        _rng(1.5)
    with pytest.raises(KernelArgumentError, match="rng .* is required when x0 is None"):
        ops.affine_path(x1, a, b, c, d)
    with pytest.raises(KernelArgumentError, match="int64 tensor of shape"):
        ops.affine_path(x1, a, b, c, d, rng=torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(KernelArgumentError, match="uint32 row offsets"):
        K.randn(0, 10, 3, offset=2**32 - 5)
    with pytest.raises(KernelArgumentError, match="uint32 row offsets"):  # an out-of-stream state made on the device
        ops.affine_path(x1, a, b, c, d, rng=torch.tensor([0, 2**32 - 2]))


@needs_ext
def test_extension_guards_memory_safety_only():
    """What the raw-pointer extension still refuses on its own (internal assertions, not argument checks)."""
    from fastfm import _C

    out, state = torch.empty(4), _rng(0)
    with pytest.raises(ValueError, match="rng .* is null"):
        _C.randn(out.data_ptr(), 2, 2, 0)
    with pytest.raises(ValueError, match="negative size"):
        _C.randn(out.data_ptr(), -1, 2, state.data_ptr())
