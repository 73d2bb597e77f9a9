"""Clean-up of a traced engine graph (functional ATen from make_fx), before it is exported.

Forward-mode AD (the divergence's JVPs) leaves work in the graph that eager PyTorch skips:

1. Zero tangents. d(x W) = dx W + x dW with dW = 0 for every weight: eager autograd skips the
   second product (an efficient zero tensor), a traced graph materialises full(0) and runs a real
   GEMM or convolution on it. Every value known to be zero is folded to full(0), the products
   that made it die, and a + 0 becomes a.
2. Repeated primal passes. The exact divergence runs one JVP per coordinate and each recomputes
   v(x, t); identical pure ops on identical inputs are merged (common subexpressions).
3. Ops with no ONNX translation: the activations' *_backward ops that JVP formulas emit are
   decomposed into elementwise ops while tracing (``JVP_DECOMPOSITIONS``, a make_fx table:
   ``run_decompositions`` keeps them).

4. Products with concatenated inputs. The MLP's first layer multiplies [x, e(t)] (and its
   tangents [dx, 0]) by W: split by blocks of W's rows, x W_x + e(t) W_e, zero blocks dropped,
   so the constant block e(t) W_e can be precomputed (``split_cat_products``).

Then everything that depends only on constants (the weights and the baked time grid: the time
embedding of every solver stage and its product with the first layer) is precomputed; a large
constant that is one row broadcast over the batch is kept as that row and expanded.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Container

import torch
from torch import fx

from fastfm.compat import get_decompositions, op_schema

aten = torch.ops.aten

# Ops the JVP formulas of the models' activations and norms emit; ONNX has no translation for them.
JVP_DECOMPOSITIONS: dict[Any, Callable] = get_decompositions([
    aten.silu_backward, aten.gelu_backward, aten.elu_backward, aten.softplus_backward, aten.tanh_backward,
    aten.sigmoid_backward, aten.threshold_backward, aten._softmax_backward_data, aten.native_group_norm_backward])

_ZERO_SOURCES = {aten.full.default, aten.full_like.default, aten.zeros.default, aten.zeros_like.default,
                 aten.new_zeros.default, aten._new_zeros_with_same_feature_meta.default,
                 aten._efficientzerotensor.default}
_VIEWS = ("expand", "view", "reshape", "permute", "t", "transpose", "unsqueeze", "squeeze", "select", "slice",
          "alias", "_unsafe_view", "unbind", "split", "chunk")
# Ops whose output is zero when their first tensor argument is (views, also as *_copy, and linear maps).
_ZERO_IF_FIRST = {n for v in _VIEWS for n in (v, v + "_copy")} | {
    "clone", "_to_copy", "neg", "sum", "mean", "div", "repeat", "copy", "constant_pad_nd"}
# Products: zero when either factor is.
_ZERO_IF_ANY = {"mul", "mm", "bmm", "matmul"}


def _is_zero_source(n: fx.Node) -> bool:
    if n.target in (aten.full.default, aten.full_like.default):
        return n.args[1] == 0
    return n.target in _ZERO_SOURCES


def _zero(n: fx.Node, zeros: set[fx.Node]) -> bool:
    """Whether node n is all zeros, given the set of nodes already known to be."""
    a = [x if isinstance(x, fx.Node) else None for x in n.args]  # non-tensor arguments are never zero
    name = _name(n)
    if n.target is operator.getitem:  # an output of a multi-output op that is all zero
        return a[0] in zeros
    if _is_zero_source(n):
        return True
    if name in _ZERO_IF_FIRST:
        return (a[1] if name == "copy" else a[0]) in zeros  # copy(dst, src) returns src's values
    if name in _ZERO_IF_ANY:
        return a[0] in zeros or a[1] in zeros
    if name == "convolution":  # (input, weight, bias, ...)
        return (a[0] in zeros or a[1] in zeros) and (a[2] is None or a[2] in zeros)
    if name == "addmm":  # bias + m1 @ m2
        return a[0] in zeros and (a[1] in zeros or a[2] in zeros)
    if name in ("add", "sub"):
        return a[0] in zeros and a[1] in zeros
    if name == "cat":
        return all(x in zeros for x in n.args[0])
    return False


def _name(n: fx.Node) -> str:
    """'mm' for aten.mm.default and prims.mm.default; '' for non-ops."""
    schema = op_schema(n.target)
    return "" if schema is None else schema.name.split("::")[-1]


def _same_meta(a: Any, b: fx.Node) -> bool:
    va, vb = getattr(a, "meta", {}).get("val"), b.meta.get("val")
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape
            and va.dtype == vb.dtype)


def _passthrough(n: fx.Node, zeros: set[fx.Node]) -> fx.Node | None:
    """The operand n equals, if any: a for a + 0, 0 + a, a - 0 and copy(dst, a) of the same shape and dtype."""
    a = [x if isinstance(x, fx.Node) else None for x in n.args]
    if n.target in (aten.add.Tensor, aten.sub.Tensor) and a[1] in zeros:
        same = a[0]
    elif n.target is aten.add.Tensor and a[0] in zeros or n.target is aten.copy.default:
        same = a[1]
    else:
        return None
    return same if _same_meta(same, n) else None


def fold_zeros(gm: fx.GraphModule) -> int:
    """Replace every zero-valued tensor by full(0), and a + 0, a - 0, copy(dst, a) by a; returns the
    number of nodes removed."""
    g = gm.graph
    before = len(g.nodes)
    zeros: set[fx.Node] = set()
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        val = n.meta.get("val")
        if _zero(n, zeros):
            if isinstance(val, torch.Tensor) and n.target is not aten.full.default:
                with g.inserting_before(n):
                    z = g.call_function(aten.full.default, (list(val.shape), 0),
                                        {"dtype": val.dtype, "layout": torch.strided, "device": val.device,
                                         "pin_memory": False})
                z.meta = dict(n.meta)
                n.replace_all_uses_with(z)
                n = z
            zeros.add(n)
        elif (same := _passthrough(n, zeros)) is not None:
            n.replace_all_uses_with(same)
    g.eliminate_dead_code()
    return before - len(g.nodes)


def _pure(n: fx.Node) -> bool:
    if n.op == "get_attr":  # make_fx gives each access to a parameter its own node
        return True
    if n.op != "call_function":
        return False
    if n.target is operator.getitem:
        return True
    schema = op_schema(n.target)
    if schema is None or schema.is_mutable:
        return False
    name = schema.name
    return "empty" not in name and torch.Tag.nondeterministic_seeded not in n.target.tags


def _key(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_key(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _key(x)) for k, x in v.items()))
    if isinstance(v, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(v)
    return v


def merge_common(gm: fx.GraphModule) -> int:
    """Merge identical pure ops on identical inputs; returns the nodes removed."""
    g = gm.graph
    seen: dict[Any, fx.Node] = {}
    removed = 0
    for n in list(g.nodes):
        if not _pure(n):
            continue
        key = (n.op, n.target, _key(n.args), _key(n.kwargs))
        if key in seen:
            n.replace_all_uses_with(seen[key])
            g.erase_node(n)
            removed += 1
        else:
            seen[key] = n
    return removed


def _computable(n: fx.Node, known: Container[fx.Node]) -> bool:
    """Whether pure op n can be evaluated from the ``known`` constants: its tensor inputs are all
    known, or it has none (eye, arange); zero sources stay in the graph for ``fold_zeros``."""
    return (n.op == "call_function" and _pure(n) and _name(n) not in ("full", "full_like", "zeros")
            and all(x in known for x in n.all_input_nodes))


def _constant_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on constants only (parameters, buffers, the baked time grid)."""
    const: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" or _computable(n, const):
            const.add(n)
    return const


def split_cat_products(gm: fx.GraphModule) -> int:
    """Rewrite mm(cat([a_1, ..., a_m], -1), W) (and addmm(b, ...)) as the sum of a_i W_i over the
    row blocks W_i of W where a block a_i is zero (dropped) or constant: b + sum_const a_i W_i is a
    constant to precompute, and the rest stays addmm(that, a_j, W_j). Returns the products rewritten."""
    g = gm.graph
    const = _constant_nodes(gm)
    rewritten = 0
    for n in list(g.nodes):
        if n.target not in (aten.mm.default, aten.addmm.default) or n.kwargs:  # addmm with beta, alpha: left as is
            continue
        lhs, rhs = n.args[-2], n.args[-1]
        if not (isinstance(lhs, fx.Node) and lhs.target is aten.cat.default and lhs.args[1:] in ((), (1,), (-1,))
                and any(_is_zero_source(p) or p in const for p in lhs.args[0])):
            continue
        val = n.meta["val"]
        blocks: list[tuple[fx.Node, fx.Node]] = []
        with g.inserting_before(n):
            offset = 0
            for piece in lhs.args[0]:
                width = piece.meta["val"].shape[1]
                if not _is_zero_source(piece):
                    block = g.call_function(aten.slice.Tensor, (rhs, 0, offset, offset + width))
                    block.meta["val"] = rhs.meta["val"][offset:offset + width]
                    blocks.append((piece, block))
                offset += width
            total = n.args[0] if n.target is aten.addmm.default else None
            for piece, block in sorted(blocks, key=lambda pb: pb[0] not in const):  # constant terms first
                args = (piece, block) if total is None else (total, piece, block)
                total = g.call_function(aten.mm.default if total is None else aten.addmm.default, args)
                total.meta["val"] = val
            if total is None:
                total = g.call_function(aten.full.default, (list(val.shape), 0),
                                        {"dtype": val.dtype, "layout": torch.strided, "device": val.device,
                                         "pin_memory": False})
        total.meta = dict(n.meta)
        n.replace_all_uses_with(total)
        g.erase_node(n)
        rewritten += 1
    g.eliminate_dead_code()
    return rewritten


_VIEW_OPS = (aten.view.default, aten._unsafe_view.default)


def _broadcast_row(value: torch.Tensor) -> bool:
    """Whether every row (index along dim 0) of ``value`` equals the first."""
    return value.dim() > 0 and value.shape[0] > 1 and torch.equal(value, value[:1].expand_as(value))


def fold_constants(gm: fx.GraphModule, max_numel: int = 1 << 16, max_computed: int = 1 << 24) -> int:
    """Precompute the ops whose inputs are all constants (parameters, buffers, the baked time grid):
    the time embedding of every solver stage, for one. A result above ``max_numel`` elements is kept
    only when it is one row broadcast over the batch (held, and stored, as the row expanded);
    others, and anything above ``max_computed``, stay computed at run time. Returns the number of
    nodes removed."""
    g = gm.graph
    before = len(g.nodes)
    known: dict[fx.Node, Any] = {}
    for n in g.nodes:
        if n.op == "get_attr":
            known[n] = getattr(gm, n.target)
        elif _computable(n, known):
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor) and val.numel() <= max_computed:
                # reshape for view: a view of an expanded row may need a copy
                op = aten.reshape.default if n.target in _VIEW_OPS else n.target
                value = op(*fx.map_arg(n.args, known.__getitem__), **fx.map_arg(n.kwargs, known.__getitem__))
                if value.numel() <= max_numel:
                    known[n] = value
                elif _broadcast_row(value):
                    known[n] = value[:1].clone().expand(value.shape)
    frontier = [n for n in known if n.op == "call_function" and any(u not in known for u in n.users)]
    for i, n in enumerate(frontier):
        name = f"_folded_{i}"
        value = known[n]
        row = value.numel() > max_numel
        gm.register_buffer(name, value[:1].clone() if row else value)
        with g.inserting_before(n):
            c = g.get_attr(name)
            if row:
                c.meta = {"val": n.meta["val"][:1]}
                c = g.call_function(aten.expand.default, (c, list(value.shape)))
        c.meta = dict(n.meta)
        n.replace_all_uses_with(c)
        for u in c.users if row else ():  # an expanded row is not contiguous: a view of it may need a copy
            if u.target in _VIEW_OPS:
                u.target = aten.reshape.default
    g.eliminate_dead_code()
    return before - len(g.nodes)


def drop_unused_tensors(gm: fx.GraphModule) -> int:
    """Delete the module's own tensors (traced constants, buffers) that no node reads any more: a folded
    constant's source (a data-dependent density's parameters moved to the input's device, say) would
    otherwise still be exported with the engine, on its original device. Returns how many went."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    stale = [k for k, v in vars(gm).items() if isinstance(v, torch.Tensor) and k not in used]
    stale += [k for k in gm._buffers if k not in used]
    for name in stale:
        delattr(gm, name)
    return len(stale)


def simplify(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold zeros, merge common subexpressions and split products of concatenations until none
    changes the graph, then precompute constant subgraphs and drop the tensors left unread (in place)."""
    while fold_zeros(gm) + merge_common(gm) + split_cat_products(gm):
        pass
    fold_constants(gm)
    drop_unused_tensors(gm)
    gm.graph.lint()
    gm.recompile()
    return gm
