import itertools
import sys

import pytest
import torch

from fastfm.training.couplings import (
    ExactOTCoupling,
    IndependentCoupling,
    LabelAwareCoupling,
    SinkhornCoupling,
    get_coupling,
    ot_cost,
    sinkhorn_log_plan,
)


def _batch(seed: int, n: int = 32, shift: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g) + shift


def _ids(x0: torch.Tensor, x0_out: torch.Tensor) -> torch.Tensor:
    """Row index in x0 of each row of x0_out (rows of x0 are distinct)."""
    match = (x0_out.flatten(1)[:, None] == x0.flatten(1)[None]).all(-1)
    assert (match.sum(1) == 1).all()
    return match.float().argmax(1)


def _brute_force_cost(x0: torch.Tensor, x1: torch.Tensor) -> float:
    return min(ot_cost(x0[list(p)], x1).item() for p in itertools.permutations(range(len(x0))))


def test_independent_is_identity():
    x0, x1 = _batch(0)
    y1 = torch.arange(32)
    out = IndependentCoupling()(x0, x1, y1)
    assert out[0] is x0 and out[1] is x1 and out[2] is y1


def test_exact_ot_beats_random_permutation():
    g = torch.Generator().manual_seed(1)
    ot_costs, rand_costs = [], []
    for seed in range(5):
        x0, x1 = _batch(seed)
        a, b, _ = ExactOTCoupling()(x0, x1)
        ot_costs.append(ot_cost(a, b))
        rand_costs.append(ot_cost(x0[torch.randperm(32, generator=g)], x1))
    assert torch.stack(ot_costs).mean() < torch.stack(rand_costs).mean()
    assert all(o <= r for o, r in zip(ot_costs, rand_costs))


@pytest.mark.parametrize("n", [2, 4, 6])
def test_exact_ot_matches_brute_force(n):
    x0, x1 = _batch(10 + n, n=n, shift=0.5)
    a, b, _ = ExactOTCoupling()(x0, x1)
    assert ot_cost(a, b).item() == pytest.approx(_brute_force_cost(x0, x1), rel=1e-6)


def test_exact_ot_is_permutation_and_keeps_x1_y1():
    x0, x1 = _batch(3)
    y1 = torch.randint(0, 3, (32,))
    a, b, y = ExactOTCoupling()(x0, x1, y1)
    assert b is x1 and y is y1
    assert sorted(_ids(x0, a).tolist()) == list(range(32))


def test_scipy_and_pot_agree():
    pytest.importorskip("ot")
    x0, x1 = _batch(4, n=48)
    idx_scipy = ExactOTCoupling("scipy").assignment(x0, x1)
    idx_pot = ExactOTCoupling("pot").assignment(x0, x1)
    assert torch.equal(idx_scipy, idx_pot)  # continuous data: the optimum is unique


def test_pot_missing_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)
    with pytest.raises(ImportError, match="pip install pot"):
        ExactOTCoupling("pot")


def test_exact_ot_image_shaped():
    g = torch.Generator().manual_seed(5)
    x0, x1 = torch.randn(6, 1, 3, 5, generator=g), torch.randn(6, 1, 3, 5, generator=g)
    a, b, _ = ExactOTCoupling()(x0, x1)
    assert a.shape == x0.shape and b is x1
    assert sorted(_ids(x0, a).tolist()) == list(range(6))
    assert ot_cost(a, b).item() == pytest.approx(_brute_force_cost(x0, x1), rel=1e-6)


def test_batch_size_mismatch_raises():
    with pytest.raises(ValueError, match="batch sizes differ"):
        ExactOTCoupling()(torch.randn(4, 2), torch.randn(5, 2))


def test_sinkhorn_marginals_uniform():
    x0, x1 = _batch(6, n=24)
    log_plan = SinkhornCoupling(reg=0.1, n_iters=300).log_plan(x0, x1)
    plan = log_plan.exp()
    torch.testing.assert_close(plan.sum(0), torch.full((24,), 1 / 24), rtol=1e-4, atol=0)
    torch.testing.assert_close(plan.sum(1), torch.full((24,), 1 / 24), rtol=1e-3, atol=0)


def test_sinkhorn_approaches_exact_ot_as_reg_shrinks():
    exact, costs = [], {1.0: [], 0.05: [], 0.005: []}
    for seed in range(3):
        x0, x1 = _batch(20 + seed)
        exact.append(ot_cost(*ExactOTCoupling()(x0, x1)[:2]))
        for reg, c in costs.items():
            g = torch.Generator().manual_seed(seed)
            coupling = SinkhornCoupling(reg=reg, n_iters=300)
            c.append(torch.stack([ot_cost(*coupling(x0, x1, generator=g)[:2]) for _ in range(4)]).mean())
    exact_mean = torch.stack(exact).mean()
    means = [torch.stack(c).mean() for c in costs.values()]
    assert means[0] > means[1] > means[2] >= exact_mean
    assert means[2] < 1.1 * exact_mean


def test_sinkhorn_stable_small_reg_large_costs():
    g = torch.Generator().manual_seed(7)
    x0, x1 = 30 * torch.randn(32, 2, generator=g), 30 * torch.randn(32, 2, generator=g) + 50
    for normalize in (True, False):
        coupling = SinkhornCoupling(reg=0.01, normalize_cost=normalize)
        assert torch.isfinite(coupling.log_plan(x0, x1)).all()
        a, _, _ = coupling(x0, x1, generator=g)
        assert torch.isfinite(a).all()
    assert torch.isfinite(sinkhorn_log_plan(torch.rand(8, 8) * 1e4, reg=0.01, n_iters=50)).all()


def test_sinkhorn_is_reproducible_with_generator():
    x0, x1 = _batch(8)
    c = SinkhornCoupling()
    a1 = c(x0, x1, generator=torch.Generator().manual_seed(0))[0]
    a2 = c(x0, x1, generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(a1, a2)


def _labelled(seed: int, n: int = 30, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    x0, x1 = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
    y1 = torch.randint(0, classes, (n,), generator=g)
    return x0, x1, y1, g


@pytest.mark.parametrize("name", ["ot-label", "sinkhorn-label"])
def test_label_aware_never_crosses_classes(name):
    x0, x1, y1, g = _labelled(9)
    a, b, y = get_coupling(name)(x0, x1, y1, generator=g)
    assert torch.equal(b, x1) and y is y1
    assert torch.equal(y1[_ids(x0, a)], y1)  # x0 rows stay within the positions of their class


def test_label_aware_with_base_labels():
    x0, x1, y1, g = _labelled(10)
    y0 = y1[torch.randperm(30, generator=g)]  # same per-class counts, different positions
    a, b, y = get_coupling("ot-label")(x0, x1, y1, y0=y0)
    ids = _ids(x0, a)
    assert torch.equal(y0[ids], y1)
    assert sorted(ids.tolist()) == list(range(30))


def test_label_aware_count_mismatch_raises():
    x0, x1, y1, _ = _labelled(11)
    y0 = torch.zeros_like(y1)
    with pytest.raises(ValueError, match="equal per-class counts"):
        LabelAwareCoupling(ExactOTCoupling())(x0, x1, y1, y0=y0)


def test_label_aware_within_class_optimal():
    x0, x1, _, _ = _labelled(12, n=12)
    y1 = torch.tensor([0, 1, 2] * 4)  # 4 per class: brute force over 4! per class
    a, b, _ = LabelAwareCoupling(ExactOTCoupling())(x0, x1, y1)
    for c in range(3):
        m = y1 == c
        assert ot_cost(a[m], b[m]).item() == pytest.approx(_brute_force_cost(x0[m], x1[m]), rel=1e-6)


def test_label_aware_without_labels_is_inner():
    x0, x1 = _batch(13)
    a, _, y = LabelAwareCoupling(ExactOTCoupling())(x0, x1)
    assert y is None and torch.equal(a, ExactOTCoupling()(x0, x1)[0])


def test_get_coupling():
    assert isinstance(get_coupling("independent"), IndependentCoupling)
    assert get_coupling("ot", backend="scipy").backend == "scipy"
    assert get_coupling("sinkhorn", reg=0.1).reg == 0.1
    assert isinstance(get_coupling("sinkhorn-label").inner, SinkhornCoupling)
    with pytest.raises(ValueError, match="unknown coupling 'emd'; choose one of independent, ot, sinkhorn, ot-label, "
                                         "sinkhorn-label"):
        get_coupling("emd")


def test_ot_cost():
    x0, x1 = torch.zeros(3, 2), torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    assert ot_cost(x0, x1).item() == pytest.approx((25 + 0 + 1) / 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["independent", "ot", "sinkhorn", "ot-label", "sinkhorn-label"])
def test_couplings_on_cuda(name):
    x0, x1, y1, _ = _labelled(14)
    x0, x1, y1 = x0.cuda(), x1.cuda(), y1.cuda()
    a, b, y = get_coupling(name)(x0, x1, y1, generator=torch.Generator("cuda").manual_seed(0))
    assert a.device.type == b.device.type == y.device.type == "cuda"
    if name.endswith("label"):
        assert torch.equal(y1[_ids(x0, a)], y1)
