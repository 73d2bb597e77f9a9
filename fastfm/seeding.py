"""Every random stream of a run, derived from its one seed: one named stream per consumer.

``derive(seed, stream, *index)`` hashes ``"fastfm/{stream}/{seed}:{index}:..."`` (BLAKE2b, 8 bytes) into a
63-bit non-negative int; ``generator(seed, stream, *index, device=...)`` is a ``torch.Generator`` seeded
with it. Distinct streams or indices give unrelated values, none of them the plain seed, so no two
consumers of a run's randomness ever share (or shift into each other's) draws, and adding a stream never
moves another. A stream is named by its purpose, never by a number: ``/``-separated parts of lower-case
letters, digits and ``_.-``, the first of letters only (no ``:``, the separator of the indices).
``derive`` accepts only the names in ``STREAMS``, so a typo cannot silently open a new stream; an index
counts repetitions of one purpose (a step, a rank, a draw), never tells purposes apart.
The values are part of the checkpoint format (a resumed run re-derives its per-step seeds): changing the
derivation changes every run.

Training (the values of saved runs: never change them):

    data/split       the train/test permutation of a finite data set (``FiniteDataset.from_arrays``)
    data/test        the test set of a generated data set (``GeneratedDataset.create``)
    data/test-noise  the dequantisation noise of a quantised test set
    data/directions  the random component means of a mixture (``sphere_mixture``, dimensions > 2)
    source           the data set used as an interpolant's source density (``build_source``)
    init             model initialisation: the global torch RNG while the model is built
    rank             the global torch RNG of DDP rank r after initialisation (per-rank dropout), index (r,)
    batch            training data draws: batches, times, label dropout, source samples (``Trainer.gen``;
                     its state is checkpointed)
    coupling         the coupling's generator (e.g. ties of minibatch OT), index (step, rank)
    noise            the seed of the in-kernel Philox noise of one optimizer step, index (step,); a function
                     of the step alone, so a resumed run draws the same noise without saving it

Generated data (the values of saved data sets: never change them):

    reflow           the sampler seed of chunk j of shard k of a reflow data set, index (k, j)
                     (``fastfm.training.reflow``): a shard is a function of its index alone

Evaluation (a measurement's own draws, apart from the samples it measures):

    eval                   ``SAMPLE``: a sampler's prior draws, Hutchinson probes and SDE noise (the eager,
                           budgeted and exported samplers: ``SolvePlan.draw``; ``experiments.common``); the
                           name predates the others and is kept for its values
    eval/transport         the prior draws of the exact W2 in ``transport.transport_report``
    eval/metrics           the sliced-Wasserstein projections of ``metrics.sample_quality``
    eval/frechet/init      the Fréchet classifier's initial weights (``frechet.train_classifier``)
    eval/frechet/batch     the Fréchet classifier's training batches and shifts
    eval/judge/train       an experiment judge's draw of the training images its classifier learns
                           (``experiments.judges.ImageJudge``)
    eval/judge/reference   a judge's reference draw of a generated data set (``experiments.judges.Judge``)
    eval/judge/floor       a judge's fresh data draws of its floor, index (draw,)
    eval/judge/projections a judge's sliced-W2 projections
    eval/bootstrap         the resamples of a bootstrap spread (``experiments.verdicts.bootstrap_std``)
    eval/trajectory        the prior draws of an experiment's trajectory figure (``experiments.common``)
    eval/parity            an engine build's parity probe batch (``export.parity.probe_inputs``)
"""

from __future__ import annotations

import hashlib
import operator

import torch

DATA_SPLIT = "data/split"
DATA_TEST = "data/test"
DATA_TEST_NOISE = "data/test-noise"
DATA_DIRECTIONS = "data/directions"
SOURCE = "source"
INIT = "init"
RANK = "rank"
BATCH = "batch"
COUPLING = "coupling"
NOISE = "noise"
REFLOW = "reflow"
SAMPLE = "eval"
TRANSPORT = "eval/transport"
METRICS = "eval/metrics"
FRECHET_INIT = "eval/frechet/init"
FRECHET_BATCH = "eval/frechet/batch"
JUDGE_TRAIN = "eval/judge/train"
JUDGE_REFERENCE = "eval/judge/reference"
JUDGE_FLOOR = "eval/judge/floor"
JUDGE_PROJECTIONS = "eval/judge/projections"
BOOTSTRAP = "eval/bootstrap"
TRAJECTORY = "eval/trajectory"
PARITY = "eval/parity"
STREAMS = (DATA_SPLIT, DATA_TEST, DATA_TEST_NOISE, DATA_DIRECTIONS, SOURCE, INIT, RANK, BATCH, COUPLING, NOISE,
           REFLOW, SAMPLE, TRANSPORT, METRICS, FRECHET_INIT, FRECHET_BATCH, JUDGE_TRAIN, JUDGE_REFERENCE, JUDGE_FLOOR,
           JUDGE_PROJECTIONS, BOOTSTRAP, TRAJECTORY, PARITY)
"""The stream names ``derive`` accepts, one per consumer (the module text says whose)."""


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    return operator.index(value)


def derive(seed: int, stream: str, *index: int) -> int:
    """The seed of ``stream`` (at ``index``, e.g. a step or a rank) of a run seeded with ``seed``: a
    non-negative int below 2**63, stable across processes, platforms and releases."""
    seed = _int(seed, "seed")
    parts = [str(_int(i, "stream index")) for i in index]
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}: expected one of {', '.join(STREAMS)}")
    key = ":".join([f"fastfm/{stream}/{seed}", *parts])
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def generator(seed: int, stream: str, *index: int, device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` (on ``device``, default CPU) seeded with ``derive(seed, stream, *index)``."""
    gen = torch.Generator() if device is None else torch.Generator(device)
    return gen.manual_seed(derive(seed, stream, *index))
