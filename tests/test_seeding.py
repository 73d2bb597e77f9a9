"""fastfm.seeding: every random stream of a run derived from its seed, stable and unrelated to each other."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastfm import seeding
from fastfm.data import FiniteDataset, get_dataset


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


def test_streams_indices_and_seeds_are_unrelated():
    streams = [*seeding.STREAMS, "data/split", "data/test", "data/test-noise", "data/5"]
    keys = [(seed, stream, index) for seed in range(4) for stream in streams
            for index in ((), (0,), (1,), (12,), (1, 2), (2, 1), (0, 0))]
    values = [seeding.derive(seed, stream, *index) for seed, stream, index in keys]
    assert len(set(values)) == len(keys)
    assert not {v for v in values} & set(range(4)), "a stream equal to the plain seed"
    # the seed / index boundary is unambiguous: "data/5" at seed 3 is not "data" at seed 5, index 3
    assert seeding.derive(3, "data/5") != seeding.derive(5, "data", 3)


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


@pytest.mark.parametrize("stream", ["", "noize", "Data", "data/", "data//x", "data/x:1", "data/a b", "/data"])
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
