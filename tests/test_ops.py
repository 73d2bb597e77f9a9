"""The registered ops: dispatch, autograd, torch.compile and torch.export, backends agreeing on one seed."""

from __future__ import annotations

import pytest
import torch

from fastfm.kernels import cpu, ops, reference
from fastfm.kernels.ops import KernelArgumentError
from fastfm.kernels.rng import philox_state as _rng
from fastfm.training.losses import cfm_loss
from fastfm.models import MLP
from fastfm.path.affine import get_path

KERNEL_BACKENDS = ["reference"] + (["cpp"] if cpu.available() else []) + (["triton"] if ops.triton_kernels else [])


def _coefs(b: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, generator=g) for _ in range(4)]


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setenv("FASTFM_KERNELS", request.param)
    return request.param


def test_auto_dispatch_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTFM_KERNELS", raising=False)
    assert ops.backend_for(torch.device("cpu")) == ("cpp" if cpu.available() else "reference")
    monkeypatch.setenv("FASTFM_KERNELS", "reference")
    assert ops.backend_for(torch.device("cpu")) == "reference"
    monkeypatch.setenv("FASTFM_KERNELS", "auto")
    assert ops.backend_for(torch.device("cpu")) == ops.candidates(torch.device("cpu"))[0]
    monkeypatch.setenv("FASTFM_KERNELS", "cuda-magic")
    with pytest.raises(KernelArgumentError, match="FASTFM_KERNELS.*auto, reference, cpp, triton"):
        ops.backend_for(torch.device("cpu"))
    assert ops.KERNEL_BACKENDS.names == ("reference", "cpp", "triton")


def test_backends_declare_their_rules_and_dispatch_follows_them(monkeypatch):
    """Each backend object declares its device types, dtypes and size limit: auto chooses among those built for
    the device (the reference last), and a forced backend serves exactly its dtypes and device types."""
    cpu_dev, meta = torch.device("cpu"), torch.device("meta")
    x1, one = torch.randn(2, 3), torch.ones(2)
    assert ops.candidates(cpu_dev)[-1] == ops.candidates(meta)[-1] == "reference"
    assert ops.KERNEL_BACKENDS.build("triton").max_numel == 2**31 - 1
    for name in ops.KERNEL_BACKENDS:
        backend = ops.KERNEL_BACKENDS.build(name)
        assert backend.name == name and backend.dtypes and backend.devices != ()
        assert (name in ops.candidates(cpu_dev)) == (backend.available and backend.native(cpu_dev))
        monkeypatch.setenv("FASTFM_KERNELS", name)
        if not backend.available or backend.devices is None:
            assert (ops.unusable(name, meta) is None) == backend.available
        else:
            with pytest.raises(KernelArgumentError, match=f"FASTFM_KERNELS={name} needs"):
                ops.backend_for(meta)
        if backend.unusable(cpu_dev) is not None:
            continue
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            if dtype in backend.dtypes:
                x_t, _ = ops.affine_path(x1.to(dtype), one, one, one, one, rng=_rng(0))
                assert x_t.dtype == dtype
            else:
                with pytest.raises(KernelArgumentError, match=f"for the {name} backend"):
                    ops.affine_path(x1.to(dtype), one, one, one, one, rng=_rng(0))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 3, 7, 9)])
def test_ops_match_reference_with_seed(backend, shape):
    x1 = torch.randn(shape)
    a, b, c, d = _coefs(shape[0])
    x_t, target = ops.affine_path(x1, a, b, c, d, rng=_rng(123), std=0.7)
    ref_xt, ref_target = reference.affine_path(x1, a, b, c, d, rng=_rng(123), std=0.7)
    torch.testing.assert_close(x_t, ref_xt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(target, ref_target, atol=1e-5, rtol=1e-5)
    x_only, none = ops.affine_path(x1, a, b, c, d, rng=_rng(123), std=0.7, write_target=False)
    assert none is None
    torch.testing.assert_close(x_only, ref_xt, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
@pytest.mark.parametrize("given_x0", [True, False])
def test_fused_loss_gradient_equals_autograd_of_reference(backend, given_x0):
    g = torch.Generator().manual_seed(1)
    x1, x0 = torch.randn(5, 3, 7, generator=g), torch.randn(5, 3, 7, generator=g)
    _, _, c, d = _coefs(5, 2)
    x0 = x0 if given_x0 else None
    w = torch.rand(5, generator=g)
    v = torch.randn(5, 3, 7, generator=g, requires_grad=True)
    (ops.cfm_loss(v, x1, c, d, x0, rng=_rng(9)) * w).sum().backward()
    v_ref = v.detach().clone().requires_grad_(True)
    (reference.cfm_loss(v_ref, x1, c, d, x0, rng=_rng(9)) * w).sum().backward()
    torch.testing.assert_close(v.grad, v_ref.grad, atol=1e-6, rtol=1e-5)


def test_backends_share_one_noise_stream(monkeypatch):
    """A seed gives the same x0 on every backend, up to float rounding of log/sqrt/cos (1e-5)."""
    x1 = torch.zeros(4, 301)
    one, zero = torch.ones(4), torch.zeros(4)
    streams = {}
    for name in KERNEL_BACKENDS:
        monkeypatch.setenv("FASTFM_KERNELS", name)
        streams[name], _ = ops.affine_path(x1, one, zero, zero, zero, rng=_rng(2024), write_target=False)
    for name, s in streams.items():
        torch.testing.assert_close(s, streams["reference"], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b != "triton"], indirect=True)
def test_training_step_compiles_without_graph_breaks_or_recompiles(backend):
    """The noise state is a tensor input: new seeds and offsets are new data, never a recompile (the CPU
    backends: the interpreter cannot run under fake tensors; tests/test_cuda.py compiles the Triton one
    on a GPU). The reference is an opaque op, so inductor never sees its Philox arithmetic."""
    torch.compiler.reset()
    model = MLP(2, hidden=16, depth=2)
    path = get_path("condot")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(x1: torch.Tensor, t: torch.Tensor, rng: torch.Tensor) -> torch.Tensor:
        """Forward and loss; its backward (AOTAutograd) runs the fused loss's backward op."""
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cfm_loss(model, path, None, x1, t, rng=rng).loss

    explain = torch._dynamo.explain(step)(torch.randn(8, 2), torch.rand(8), _rng(3))
    assert explain.graph_break_count == 0, explain.break_reasons
    torch.compiler.reset()
    from fastfm.compat import dynamo_counters
    counters = dynamo_counters()

    counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        opt.zero_grad()
        x1, t, rng = torch.randn(8, 2, generator=g), torch.rand(8, generator=g), _rng(2**40 + 1000 * i, 16 * i)
        loss = compiled(x1, t, rng)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(loss, cfm_loss(model, path, None, x1, t, rng=rng).loss)
        opt.step()
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every seed, offset, t and data


def test_export_traces_the_path_op():
    class PathModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.path = get_path("vp")

        def forward(self, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor):
            c = self.path.coefficients(t)
            return ops.affine_path(x1, c.a, c.b, c.c, c.d, x0)

    args = (torch.randn(3, 4), torch.randn(3, 4), torch.rand(3))
    ep = torch.export.export(PathModule(), args)
    assert any("fastfm" in str(n.target) for n in ep.graph.nodes)
    for out, ref in zip(ep.module()(*args), PathModule()(*args)):
        torch.testing.assert_close(out, ref)


def test_bad_coefficients_shape():
    with pytest.raises(KernelArgumentError, match="coefficient a"):
        ops.affine_path(torch.randn(3, 2), torch.ones(2), torch.ones(3), torch.ones(3), torch.ones(3))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
def test_every_backend_raises_the_op_layers_errors(backend):
    """One owner of the checks: the same bad call fails the same way whatever the backend, before any kernel."""
    x1, v = torch.randn(4, 3), torch.randn(4, 3)
    a, b, c, d = _coefs(4)
    calls = {
        "x0 shape": lambda: ops.affine_path(x1, a, b, c, d, x0=torch.zeros(4, 2)),
        "v dtype": lambda: ops.cfm_loss(v.double(), x1, c, d, rng=_rng(0)),
        "coefficient grad": lambda: ops.cfm_loss_grad(torch.ones(3), v, x1, c, d, rng=_rng(0)),
        "required when x0 is None": lambda: ops.cfm_loss(v, x1, c, d),
        "device mismatch: rng": lambda: ops.affine_path(x1, a, b, c, d, rng=_rng(0, device="meta")),
        "coefficient d must be float32": lambda: torch.ops.fastfm.affine_path(x1, a, b, c, d.double(), None,
                                                                               _rng(0), 1.0, True),
    }
    for message, call in calls.items():
        with pytest.raises(KernelArgumentError, match=message):
            call()


def test_dispatch_rules_are_kernel_argument_errors(monkeypatch):
    x1 = torch.randn(2, 3)
    one = torch.ones(2)
    monkeypatch.setenv("FASTFM_KERNELS", "cpp")
    with pytest.raises(KernelArgumentError, match="FASTFM_KERNELS=cpp needs CPU tensors"):
        ops.backend_for(torch.device("meta"))
    monkeypatch.setenv("FASTFM_KERNELS", "reference")
    with pytest.raises(KernelArgumentError, match=r"x1 must be float32, float64, bfloat16 or float16 for the reference"):
        ops.affine_path(x1.long(), one, one, one, one, rng=_rng(0))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
def test_noise_offset_gives_a_shard_the_rows_of_the_whole_batch(backend):
    """Rows [r, r + m) drawn with offset r equal those rows of the whole batch (DDP ranks, micro-batches)."""
    g = torch.Generator().manual_seed(3)
    x1, v = torch.randn(7, 3, 5, generator=g), torch.randn(7, 3, 5, generator=g)
    a, b, c, d = _coefs(7, 4)
    w = torch.rand(7, generator=g)
    full_xt, full_tgt = ops.affine_path(x1, a, b, c, d, rng=_rng(77), std=0.9)
    vf = v.clone().requires_grad_(True)
    full_loss = ops.cfm_loss(vf, x1, c, d, rng=_rng(77), std=0.9)
    (full_loss * w).sum().backward()
    for r, m in [(0, 3), (3, 4), (6, 1)]:
        rows, off = slice(r, r + m), r
        xt, tgt = ops.affine_path(x1[rows], a[rows], b[rows], c[rows], d[rows], rng=_rng(77, off), std=0.9)
        torch.testing.assert_close(xt, full_xt[rows], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(tgt, full_tgt[rows], atol=1e-6, rtol=1e-6)
        vs = v[rows].clone().requires_grad_(True)
        loss = ops.cfm_loss(vs, x1[rows], c[rows], d[rows], rng=_rng(77, off), std=0.9)
        torch.testing.assert_close(loss, full_loss.detach()[rows], atol=1e-6, rtol=1e-6)
        (loss * w[rows]).sum().backward()
        torch.testing.assert_close(vs.grad, vf.grad[rows], atol=1e-6, rtol=1e-6)
    shifted, _ = ops.affine_path(x1[:3], a[:3], b[:3], c[:3], d[:3], rng=_rng(77, 1), std=0.9)
    assert not torch.allclose(shifted, full_xt[:3])  # the offset is really applied


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
def test_noise_offset_out_of_the_stream_is_an_error(backend):
    x1 = torch.randn(4, 8)
    a, b, c, d = _coefs(4)
    for off in (-1, 2**32 - 3):
        with pytest.raises(KernelArgumentError, match="offset"):
            ops.affine_path(x1, a, b, c, d, rng=ops.noise_state(x1, 1, off))
    ops.affine_path(x1, a, b, c, d, rng=ops.noise_state(x1, 1, 2**32 - 4))  # the last 4 rows of the stream
    if backend != "triton":  # a CPU state built as a tensor is read and checked by the ops that run on the host
        with pytest.raises(KernelArgumentError, match="uint32 row offsets"):
            ops.affine_path(x1, a, b, c, d, rng=torch.tensor([1, 2**32 - 3]))
