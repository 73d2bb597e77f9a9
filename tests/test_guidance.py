"""Classifier-free guidance: one batched guided call, the v_u + w (v_c - v_u) combination, label dropout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastfm.solve.guidance import drop_labels, guided_model
from fastfm.path.affine import get_path
from fastfm.solve.ode import ode_sample

B, D, K = 5, 3, 4  # batch, dims, classes (null class = K)


class CondModel(nn.Module):
    """v(x, t, y) = x * (1 + e1[y]) + t e2[y] (+ s x for an extra per-sample conditioning s); counts calls."""

    def __init__(self, num_classes: int | None = K) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.num_classes = num_classes
        n = (num_classes or 0) + 1
        self.e1 = torch.randn(n, D, generator=g)
        self.e2 = torch.randn(n, D, generator=g)
        self.calls: list[tuple[int, torch.Tensor | None]] = []

    def forward(self, x, t, y=None, s=None):
        self.calls.append((x.shape[0], y))
        idx = torch.full((x.shape[0],), self.e1.shape[0] - 1) if y is None else y
        out = x * (1 + self.e1[idx]) + t[:, None] * self.e2[idx]
        return out if s is None else out + s[:, None] * x


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.rand(B, generator=g), torch.randint(0, K, (B,), generator=g)


def test_scale_one_is_the_conditional_model():
    x, t, y = _inputs()
    model = CondModel()
    field = guided_model(model, y, 1.0)
    out = field(x, t)
    assert len(model.calls) == 1 and model.calls[0][0] == B  # a single, un-doubled pass
    torch.testing.assert_close(out, model(x, t, y=y))


@pytest.mark.parametrize("w", [0.0, 2.5, 7.0, -1.0])
def test_guided_combination(w):
    x, t, y = _inputs(2)
    model = CondModel()
    v_c = model(x, t, y=y)
    v_u = model(x, t, y=torch.full_like(y, K))
    model.calls.clear()
    field = guided_model(model, y, w)
    out = field(x, t)
    torch.testing.assert_close(out, v_u + w * (v_c - v_u))
    if w == 0.0:
        torch.testing.assert_close(out, v_u)
    # exactly one batched call of 2B per evaluation, conditional half first, null class second
    assert len(model.calls) == 1
    n, y2 = model.calls[0]
    assert n == 2 * B and torch.equal(y2, torch.cat([y, torch.full_like(y, K)]))
    field(x, t)
    field(x + 1, t)
    assert len(model.calls) == 3


def test_guidance_duplicates_extra_conditioning():
    x, t, y = _inputs(3)
    s = torch.linspace(-1, 1, B)
    model = CondModel()
    v_c = model(x, t, y=y, s=s)
    v_u = model(x, t, y=torch.full_like(y, K), s=s)
    out = guided_model(model, y, 3.0, s=s)(x, t)
    torch.testing.assert_close(out, v_u + 3.0 * (v_c - v_u))
    torch.testing.assert_close(guided_model(model, y, 1.0, s=s)(x, t), v_c)


def test_no_labels_is_the_unconditional_model():
    x, t, _ = _inputs(4)
    model = CondModel()
    expected = model(x, t)
    model.calls.clear()
    for w in (1.0, 4.0):
        out = guided_model(model, None, w)(x, t)
        torch.testing.assert_close(out, expected)
    assert [c[0] for c in model.calls] == [B, B] and all(c[1] is None for c in model.calls)


@pytest.mark.parametrize("model", [CondModel(num_classes=None), nn.Identity()])
def test_guidance_on_unconditional_model_raises(model):
    x, t, y = _inputs(5)
    with pytest.raises(ValueError, match="class-conditional"):
        guided_model(model, y, 2.0)


def test_guided_sampling_makes_one_call_per_evaluation():
    x0, _, y = _inputs(6)
    model = CondModel()
    path = get_path("condot")
    res = ode_sample(model, path, x0, solver="heun", steps=3, y=y, guidance=2.0)
    assert res.nfe == 6 and len(model.calls) == 6 and all(n == 2 * B for n, _ in model.calls)

    # the same solve by hand, with two separate model calls per evaluation
    def v(x, t):
        tb = torch.full((B,), float(t))
        v_c, v_u = model(x, tb, y=y), model(x, tb, y=torch.full_like(y, K))
        return v_u + 2.0 * (v_c - v_u)

    x, grid = x0, torch.linspace(0, 1, 4)
    for i in range(3):
        h = grid[i + 1] - grid[i]
        k1 = v(x, grid[i])
        k2 = v(x + h * k1, grid[i] + h)
        x = x + h * (k1 + k2) / 2
    torch.testing.assert_close(res.x, x)


# ---------------------------------------------------------------- label dropout

def test_drop_labels_p0_keeps_labels():
    y = torch.arange(10) % K
    for p in (0.0, -0.5):
        out = drop_labels(y, p, K, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, y)


def test_drop_labels_p1_drops_all():
    y = torch.arange(10) % K
    out = drop_labels(y, 1.0, K, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, torch.full_like(y, K)) and out.dtype == y.dtype


def test_drop_labels_fraction():
    n, p = 200_000, 0.3
    y = torch.randint(0, K, (n,), generator=torch.Generator().manual_seed(1))
    out = drop_labels(y, p, K, generator=torch.Generator().manual_seed(2))
    assert out.shape == y.shape and out.dtype == y.dtype
    dropped = out == K
    assert torch.equal(out[~dropped], y[~dropped])  # kept labels are untouched
    frac = float(dropped.double().mean())
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n)
    # independent of the label value: each class loses about p of its members
    for c in range(K):
        m = y == c
        assert abs(float(dropped[m].double().mean()) - p) < 4 * math.sqrt(p * (1 - p) / int(m.sum()))
    # seeded: reproducible; another seed drops other positions
    again = drop_labels(y, p, K, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out, again)
    other = drop_labels(y, p, K, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(out == K, other == K)
