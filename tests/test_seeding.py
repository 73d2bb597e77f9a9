"""fastfm.seeding: every random stream of a run derived from its seed, stable and unrelated to each other; one
named stream per consumer."""

from __future__ import annotations

import itertools
import re
from types import SimpleNamespace

import pytest
import torch

from fastfm import seeding
from fastfm.data import FiniteDataset, get_dataset
from fastfm.path.densities import Gaussian
from fastfm.evaluation.frechet import train_classifier
from fastfm.evaluation.metrics import sample_quality, sliced_wasserstein
from fastfm.solve.transport import transport_report, w2_squared


def test_derive_is_a_stable_63_bit_value():
    # pinned: a resumed run re-derives its per-step seeds, so the derivation must never change
    assert seeding.derive(0, "noise", 1) == 2386180525452871386
    assert seeding.derive(0, "data/split") == 8086871697927573926
    assert seeding.derive(1234, seeding.COUPLING, 5, 1) == 146443228317031323
    for seed in (0, 1, -3, 2**63 - 1, 2**64 + 5):
        for stream in seeding.STREAMS:
            value = seeding.derive(seed, stream, 7)
            assert isinstance(value, int) and 0 <= value < 2**63
            assert value == seeding.derive(seed, stream, 7)


def test_training_and_sampler_streams_keep_their_values():
    """Saved runs and resume depend on the training streams; the samplers' stream is the former ``eval``."""
    pinned = {seeding.DATA_SPLIT: 8086871697927573926, seeding.SAMPLE: seeding.derive(0, "eval")}
    for stream, value in pinned.items():
        assert seeding.derive(0, stream) == value
    assert seeding.SAMPLE == "eval"
    assert (seeding.DATA_TEST, seeding.DATA_TEST_NOISE, seeding.DATA_DIRECTIONS) == \
        ("data/test", "data/test-noise", "data/directions")
    assert (seeding.SOURCE, seeding.INIT, seeding.RANK, seeding.BATCH, seeding.COUPLING, seeding.NOISE) == \
        ("source", "init", "rank", "batch", "coupling", "noise")


def test_every_stream_is_a_distinct_name_of_a_purpose():
    assert len(set(seeding.STREAMS)) == len(seeding.STREAMS)
    for stream in seeding.STREAMS:
        assert re.fullmatch(r"[a-z]+(/[a-z0-9_.-]+)*", stream), stream
        assert not re.search(r"(^|/)[0-9]+($|/)", stream), f"{stream}: a purpose is a name, not a number"
        assert f"``{stream}``" in seeding.__doc__ or f"    {stream} " in seeding.__doc__, f"{stream} undocumented"
    constants = {name: value for name, value in vars(seeding).items() if name.isupper() and isinstance(value, str)}
    assert set(constants.values()) == set(seeding.STREAMS)


def test_streams_indices_and_seeds_are_unrelated():
    keys = [(seed, stream, index) for seed in range(4) for stream in seeding.STREAMS
            for index in ((), (0,), (1,), (12,), (1, 2), (2, 1), (0, 0))]
    values = [seeding.derive(seed, stream, *index) for seed, stream, index in keys]
    assert len(set(values)) == len(keys)
    assert not {v for v in values} & set(range(4)), "a stream equal to the plain seed"


def test_generator_is_seeded_with_derive():
    gen = seeding.generator(3, seeding.BATCH)
    assert isinstance(gen, torch.Generator) and gen.device.type == "cpu"
    assert gen.initial_seed() == seeding.derive(3, "batch")
    same = torch.Generator().manual_seed(seeding.derive(3, "batch"))
    assert torch.equal(torch.randn(5, generator=gen), torch.randn(5, generator=same))
    on = seeding.generator(3, seeding.COUPLING, 2, 1, device="cpu")
    assert on.initial_seed() == seeding.derive(3, "coupling", 2, 1)
    # different streams draw different numbers
    a, b = (torch.randn(8, generator=seeding.generator(0, s)) for s in ("init", "eval"))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("stream", ["", "noize", "Data", "data", "data/", "data//x", "data/x:1", "data/a b", "/data",
                                    "data/5", "eval/", "eval/transport/", "eval/judge", "sample", "transport",
                                    "eval/metric", None, b"eval"])
def test_unknown_stream_names_are_refused(stream):
    with pytest.raises(ValueError, match="unknown random stream"):
        seeding.derive(0, stream)


@pytest.mark.parametrize("args", [(True, "data"), (1.0, "data"), ("1", "data"), (0, "noise", 1.5),
                                  (0, "noise", False)])
def test_seed_and_index_must_be_ints(args):
    with pytest.raises(TypeError, match="must be an int"):
        seeding.derive(*args)


def test_data_sets_use_the_data_streams():
    x = torch.arange(40.0).reshape(20, 2)
    ds = FiniteDataset.from_arrays("xs", x, test_fraction=0.25, seed=4)
    perm = torch.randperm(20, generator=seeding.generator(4, "data/split"))
    assert torch.equal(ds.test, x[perm[:5].sort().values])
    data = get_dataset("moons", seed=2)
    assert torch.equal(data.test, get_dataset("moons", seed=2).test)
    assert not torch.equal(data.test, get_dataset("moons", seed=3).test)


def test_trainer_streams_depend_on_seed_step_and_rank():
    """The per-step noise seed is a function of (seed, step) alone; coupling streams of (seed, step, rank)."""
    noise = [seeding.derive(0, seeding.NOISE, step) for step in range(1, 50)]
    assert len(set(noise)) == len(noise)
    coupling = {seeding.derive(0, seeding.COUPLING, s, r) for s, r in itertools.product(range(1, 20), range(4))}
    assert len(coupling) == 19 * 4


def test_transport_prior_draws_are_not_the_samplers():
    """The W2 prior of ``transport_report`` once replayed the sampler's first prior draws (both the stream
    ``eval``): now it has its own stream, so its x0 is not the sampler's x0 for the same seed."""
    prior, reference = Gaussian(), torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    res = SimpleNamespace(kinetic=torch.ones(64), straightness=torch.zeros(64))
    out = transport_report(res, SimpleNamespace(prior=prior), reference, w2_points=64, seed=5)
    own, sampler = (prior.sample((64, 2), generator=seeding.generator(5, stream))
                    for stream in (seeding.TRANSPORT, seeding.SAMPLE))
    assert not torch.allclose(own, sampler)
    assert out["w2_n"] == 64 and out["w2_sq_pot"] == w2_squared(own, reference) != w2_squared(sampler, reference)


def test_metrics_projections_are_their_own_stream():
    x, y = (torch.randn(200, 3, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    own, sampler = (float(sliced_wasserstein(x, y, generator=seeding.generator(3, stream)))
                    for stream in (seeding.METRICS, seeding.SAMPLE))
    assert sample_quality(x, y, seed=3)["sliced_wasserstein"] == own != sampler


def test_frechet_classifier_is_a_function_of_its_seed_alone():
    """The same seed gives the same features whatever the global RNG holds, and the global RNG is left as it was."""
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.rand(64, 1, 8, 8, generator=gen) * 2 - 1, torch.randint(0, 3, (64,), generator=gen)
    probe = torch.rand(16, 1, 8, 8, generator=gen) * 2 - 1
    features = []
    for global_seed in (11, 12):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        model = train_classifier(images, labels, 3, steps=3, batch=16, seed=7, progress=False)
        assert torch.equal(torch.get_rng_state(), state), "train_classifier moved the global RNG"
        features.append(model.features(probe))
    assert torch.equal(*features)
    other = train_classifier(images, labels, 3, steps=3, batch=16, seed=8, progress=False)
    assert not torch.equal(features[0], other.features(probe))
