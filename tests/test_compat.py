"""fastfm.compat: each private PyTorch API fastfm relies on still exists in this torch and still behaves.

A failure here names the torch version and the missing attribute: update fastfm/compat.py for that release.
"""

from __future__ import annotations

import inspect
import operator
import re

import pytest
import torch

from fastfm import compat

aten = torch.ops.aten


def test_missing_private_api_fails_loudly():
    missing = re.escape(f"torch {torch.__version__} has no torch._decomp.no_such_api")
    with pytest.raises(compat.CompatError, match=missing):
        compat.private("torch._decomp", "no_such_api")
    with pytest.raises(compat.CompatError, match=r"has no torch\._no_such_module\.x"):
        compat.private("torch._no_such_module", "x")


def test_foreach_lerp_():
    assert callable(compat.private("torch", "_foreach_lerp_"))
    gen = torch.Generator().manual_seed(0)
    starts = [torch.randn(5, generator=gen), torch.randn(2, 3, generator=gen, dtype=torch.float64)]
    ends = [torch.randn(5, generator=gen), torch.randn(2, 3, generator=gen, dtype=torch.float64)]
    expected = [torch.lerp(a, b, 0.3) for a, b in zip(starts, ends)]
    compat.foreach_lerp_(starts, ends, 0.3)
    for got, want in zip(starts, expected):
        torch.testing.assert_close(got, want)


def test_set_found_inf_skips_a_fused_adamw_step():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    assert getattr(opt, "_step_supports_amp_scaling", False), \
        f"torch {torch.__version__}: fused AdamW lost _step_supports_amp_scaling (the found_inf contract)"
    p.grad = torch.ones(3)
    compat.set_found_inf(opt, torch.ones((), dtype=torch.bool))
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)), f"torch {torch.__version__}: fused AdamW ignored found_inf = 1"
    assert float(opt.state[p]["step"]) == 0  # and the skipped step is not counted
    compat.set_found_inf(opt, torch.zeros((), dtype=torch.bool))
    opt.step()
    assert (p.detach() < 1).all() and float(opt.state[p]["step"]) == 1
    with pytest.raises(compat.CompatError, match="does not read found_inf"):
        compat.set_found_inf(torch.optim.SGD([p], lr=0.1), torch.zeros(()))


def test_dynamo_counters_count_compiled_graphs():
    counters = compat.dynamo_counters()
    assert counters is compat.private("torch._dynamo.utils", "counters")
    torch.compiler.reset()
    counters.clear()
    assert compat.compiled_graph_count() == 0
    f = torch.compile(lambda x: x * 2 + 1, backend="eager", fullgraph=True)
    for i in range(3):
        assert torch.equal(f(torch.full((4,), float(i))), torch.full((4,), 2.0 * i + 1))
    assert compat.compiled_graph_count() == 1 == counters["stats"]["unique_graphs"]
    torch.compiler.reset()


def test_dynamo_config_and_lookup_backend():
    cfg = compat.dynamo_config()
    assert hasattr(cfg, "patch") and (hasattr(cfg, "recompile_limit") or hasattr(cfg, "cache_size_limit")), \
        f"torch {torch.__version__}: torch._dynamo.config lost patch / recompile_limit"
    backend = compat.lookup_backend("eager")
    assert callable(backend)
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    assert torch.equal(backend(gm, [torch.zeros(2)])(torch.zeros(2)), torch.ones(2))


def test_get_decompositions():
    assert callable(compat.private("torch._decomp", "get_decompositions"))
    table = compat.get_decompositions([aten.silu_backward, aten.gelu_backward])
    assert aten.silu_backward.default in table and aten.gelu_backward.default in table
    g, x = torch.randn(6), torch.randn(6)
    torch.testing.assert_close(table[aten.silu_backward.default](g, x), aten.silu_backward(g, x))


def test_op_schema():
    assert isinstance(aten.mm.default, compat.private("torch._ops", "OpOverload"))
    schema = compat.op_schema(aten.mm.default)
    assert isinstance(schema, torch.FunctionSchema)
    assert schema.name == "aten::mm" and not schema.is_mutable
    assert compat.op_schema(aten.add_.Tensor).is_mutable
    assert compat.op_schema(operator.getitem) is None and compat.op_schema("mm") is None
    assert compat.op_schema(aten.mm) is None  # the packet, not an overload


def test_trace_fake_with_real_tensors():
    assert callable(compat.private("torch.fx.experimental.proxy_tensor", "make_fx"))
    assert "_allow_non_fake_inputs" in inspect.signature(compat.private("torch.fx.experimental.proxy_tensor",
                                                                         "make_fx")).parameters
    lin = torch.nn.Linear(3, 4)  # real parameters held by the traced function
    x = torch.randn(2, 3)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(lin(x))

    with torch.no_grad():
        gm = compat.trace_fake(fn, compat.get_decompositions([aten.silu]))(x)  # a real input
        targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        assert aten.silu.default not in targets and aten.sigmoid.default in targets  # decomposed
        torch.testing.assert_close(gm(x), fn(x))


def test_aoti_functions_exist():
    compile_and_package = compat.private("torch._inductor", "aoti_compile_and_package")
    load_package = compat.private("torch._inductor", "aoti_load_package")
    params = inspect.signature(compile_and_package).parameters
    assert {"package_path", "inductor_configs"} <= set(params), \
        f"torch {torch.__version__}: aoti_compile_and_package takes {list(params)}"
    params = inspect.signature(load_package).parameters
    assert "device_index" in params, f"torch {torch.__version__}: aoti_load_package takes {list(params)}"
    from torch._inductor import config

    assert isinstance(config.aot_inductor.metadata, dict), \
        f"torch {torch.__version__}: no inductor config aot_inductor.metadata (an AOTI engine's stamp)"
