"""Every random stream of a run, derived from its one seed.

``derive(seed, stream, *index)`` hashes ``"fastfm/{stream}/{seed}:{index}:..."`` (BLAKE2b, 8 bytes) into a
63-bit non-negative int; ``generator(seed, stream, *index, device=...)`` is a ``torch.Generator`` seeded
with it. Distinct streams or indices give unrelated values, none of them the plain seed, so no two
consumers of a run's randomness ever share (or shift into each other's) draws, and adding a stream never
moves another. A stream name is one of the names below, optionally followed by ``/purpose``
(e.g. ``"data/split"``; lower-case letters, digits, ``_.-``); ``derive`` rejects any other name, so a typo
cannot silently open a new stream. The values are part of the checkpoint format (a resumed run re-derives
its per-step seeds): changing the derivation changes every run.

Streams:

    data       a data set's fixed draws, with the purpose in the name: ``data/split`` (the train/test
               permutation of finite arrays), ``data/test`` (the test set of a generated data set),
               ``data/test-noise`` (the dequantisation noise of a quantised test set)
    source     the data set used as an interpolant's source density (fastfm.runs.build_source)
    init       model initialisation: the global torch RNG while the model is built
    rank       the global torch RNG of DDP rank r after initialisation (per-rank dropout), index (r,)
    batch      training data draws: batches, times, label dropout, source samples (``Trainer.gen``;
               its state is checkpointed)
    coupling   the coupling's generator (e.g. ties of minibatch OT), index (step, rank)
    noise      the seed of the in-kernel Philox noise of one optimizer step, index (step,); a function of
               the step alone, so a resumed run draws the same noise without saving it
    eval       evaluation: prior draws, Hutchinson probes, SDE noise, sliced-Wasserstein projections
"""

from __future__ import annotations

import hashlib
import operator
import re

import torch

DATA = "data"
SOURCE = "source"
INIT = "init"
RANK = "rank"
BATCH = "batch"
COUPLING = "coupling"
NOISE = "noise"
EVAL = "eval"
STREAMS = (DATA, SOURCE, INIT, RANK, BATCH, COUPLING, NOISE, EVAL)
"""The stream names ``derive`` accepts (as the first ``/``-separated part of its ``stream``)."""
_NAME = re.compile(r"[a-z]+(/[a-z0-9_.-]+)*")


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    return operator.index(value)


def derive(seed: int, stream: str, *index: int) -> int:
    """The seed of ``stream`` (at ``index``, e.g. a step or a rank) of a run seeded with ``seed``: a
    non-negative int below 2**63, stable across processes, platforms and releases."""
    seed = _int(seed, "seed")
    parts = [str(_int(i, "stream index")) for i in index]
    if not (isinstance(stream, str) and _NAME.fullmatch(stream) and stream.split("/")[0] in STREAMS):
        raise ValueError(f"unknown random stream {stream!r}: expected one of {', '.join(STREAMS)} "
                         f"(optionally followed by '/purpose')")
    key = ":".join([f"fastfm/{stream}/{seed}", *parts])
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def generator(seed: int, stream: str, *index: int, device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` (on ``device``, default CPU) seeded with ``derive(seed, stream, *index)``."""
    gen = torch.Generator() if device is None else torch.Generator(device)
    return gen.manual_seed(derive(seed, stream, *index))
