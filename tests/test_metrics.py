import math

import pytest
import torch
from scipy.stats import norm, wasserstein_distance

from fastfm.evaluation.metrics import energy_distance, mmd_rbf, sliced_wasserstein


def _gauss(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


def _expected_abs_normal(mu: float, sigma: float) -> float:
    """E|Z| for Z ~ N(mu, sigma^2)."""
    folded = sigma * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * sigma**2))
    return folded + mu * (1 - 2 * norm.cdf(-mu / sigma))


def test_energy_distance_same_distribution_near_zero():
    ed = energy_distance(_gauss(1000, 2, 0), _gauss(1000, 2, 1))
    assert abs(ed.item()) < 0.01


def test_energy_distance_grows_with_shift():
    x = _gauss(500, 2, 0)
    eds = [energy_distance(x, _gauss(500, 2, 1, shift=s)).item() for s in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(eds, eds[1:]))
    assert eds[1] > 0.05


def test_energy_distance_matches_closed_form_1d():
    mu = 1.0
    closed = 2 * _expected_abs_normal(mu, math.sqrt(2)) - 2 * _expected_abs_normal(0.0, math.sqrt(2))
    eds = [energy_distance(_gauss(2000, 1, 2 * s), _gauss(2000, 1, 2 * s + 1, shift=mu)) for s in range(4)]
    assert torch.stack(eds).mean().item() == pytest.approx(closed, abs=0.08)  # std of the mean ~0.035


def test_energy_distance_symmetric_and_unbiased_terms():
    x, y = _gauss(5, 2, 4), _gauss(7, 2, 5)
    dxy = torch.cdist(x, y).mean()
    dxx = torch.cdist(x, x).sum() / (5 * 4)
    dyy = torch.cdist(y, y).sum() / (7 * 6)
    torch.testing.assert_close(energy_distance(x, y), 2 * dxy - dxx - dyy)
    torch.testing.assert_close(energy_distance(x, y), energy_distance(y, x))


def test_sliced_wasserstein_translation():
    m = torch.tensor([1.5, -2.0])
    x = _gauss(2000, 2, 6)
    g = torch.Generator().manual_seed(0)
    sw = sliced_wasserstein(x, x + m, n_projections=4000, generator=g)
    # per direction W2^2 = (theta . m)^2 exactly; E_theta[(theta . m)^2] = |m|^2 / d
    assert (sw**2).item() == pytest.approx(m.pow(2).sum().item() / 2, rel=0.05)
    sw_indep = sliced_wasserstein(x, _gauss(2000, 2, 7) + m, n_projections=1000, generator=g)
    assert (sw_indep**2).item() == pytest.approx(m.pow(2).sum().item() / 2, rel=0.1)


def test_sliced_wasserstein_symmetric_and_zero_on_self():
    x, y = _gauss(300, 2, 8), _gauss(300, 2, 9, shift=1.0)
    a = sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(1))
    b = sliced_wasserstein(y, x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert sliced_wasserstein(x, x).item() == 0.0
    assert sliced_wasserstein(x, torch.cat([x, x])).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("p", [1, 2])
def test_sliced_wasserstein_unequal_sizes_exact_in_1d(p):
    x, y = _gauss(37, 1, 10), _gauss(53, 1, 11, shift=0.7)
    sw = sliced_wasserstein(x.double(), y.double(), n_projections=3, p=p)  # in 1D theta = +-1
    if p == 1:
        expected = wasserstein_distance(x[:, 0].numpy(), y[:, 0].numpy())
    else:
        # W2^2 = int_0^1 (F^-1 - G^-1)^2 on a fine grid of quantile levels (step functions)
        t = (torch.arange(37 * 53, dtype=torch.float64) + 0.5) / (37 * 53)
        xs, ys = x[:, 0].double().sort().values, y[:, 0].double().sort().values
        expected = ((xs[(t * 37).long()] - ys[(t * 53).long()]) ** 2).mean().sqrt().item()
    assert sw.item() == pytest.approx(expected, rel=1e-9)


def test_mmd_rbf():
    x = _gauss(400, 2, 12)
    same = mmd_rbf(x, _gauss(400, 2, 13)).item()
    shifted = mmd_rbf(x, _gauss(400, 2, 13, shift=1.0)).item()
    assert abs(same) < 0.02 and shifted > 0.2


@pytest.mark.parametrize("fn", [energy_distance, sliced_wasserstein, mmd_rbf])
def test_bad_inputs(fn):
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        fn(x, torch.randn(10, 3))
    with pytest.raises(ValueError, match="2D tensor"):
        fn(x[:, 0], x)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fn(x, bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_metrics_on_cuda():
    x, y = _gauss(200, 2, 14), _gauss(300, 2, 15, shift=1.0)
    g_cpu, g_gpu = torch.Generator().manual_seed(0), torch.Generator("cuda").manual_seed(0)
    for fn in (energy_distance, mmd_rbf):
        torch.testing.assert_close(fn(x.cuda(), y.cuda()).cpu(), fn(x, y), rtol=1e-4, atol=1e-5)
    sw = sliced_wasserstein(x.cuda(), y.cuda(), generator=g_gpu)
    assert sw.device.type == "cuda"
    assert sw.item() == pytest.approx(sliced_wasserstein(x, y, generator=g_cpu).item(), rel=0.2)
