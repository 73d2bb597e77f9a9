"""CPU training-step throughput of SiT-S/2 (batch 64, 32x32x4 latents, 1000 classes) beside diffusers' DiT of the
same size (benchmarks/sit_cases.py), each eager and under torch.compile (fullgraph), in one run; the bf16 rows run
only where the CPU has native bf16 (``fastfm.hardware``), both sides alike:

    fastfm-eager, fastfm-compile[-bf16]        fastfm's Trainer step (``--model sit --class-cond [--compile]
                                               [--bf16]``): the whole step compiled
    diffusers-eager, diffusers-compile[-bf16]  the plain CondOT loop on DiTTransformer2DModel, the model compiled

Each implementation is built and warmed up once, then timed one step per round, the rounds taking the
implementations in turn, so that load from other processes falls on all of them alike (summarize_sit.py takes each
one's median and best round). Each row records its model's parameter count, and the diffusers rows check that
counted as the reference counts it (one conditioning embedder, not one per block) it equals SiT's. A step is about
2.3 TFLOP (36 GFLOP per image), so rounds are few.

Run: make bench-sit (pytest-benchmark JSON per machine class -> benchmarks/results/cpu_sit-CLASS.json via
run_levels.py and summarize_sit.py).
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from typing import Callable

import pytest
import torch

from sit_cases import CLASSES, SHAPE, dit_like, latents, params, params_counted_once, plain_step

from fastfm import hardware
from fastfm.data import get_dataset
from fastfm.training.assemble import model_for
from fastfm.training.config import TrainConfig
from fastfm.training.distributed import DistEnv
from fastfm.training.trainer import Trainer

BATCH, SIZE = 64, {"size": "S", "patch": 2}
N_LATENTS = 2048  # the data set: every class present twice or more
ROUNDS = 3
NO_BF16 = not hardware.capabilities("cpu").bf16_native


def _impl(loop: str, mode: str):
    marks = []
    if loop == "diffusers" and importlib.util.find_spec("diffusers") is None:
        marks.append(pytest.mark.skip(reason="diffusers not installed (make bench-sit)"))
    if mode.endswith("bf16") and NO_BF16:
        marks.append(pytest.mark.skip(reason="bf16 is not native on this CPU (fastfm.hardware): fp32 rows only"))
    return pytest.param(loop, mode, marks=marks, id=f"{loop}-{mode}")


IMPLS = [_impl(loop, mode) for loop in ("fastfm", "diffusers") for mode in ("eager", "compile", "compile-bf16")]


@pytest.fixture(scope="module")
def data_name(tmp_path_factory) -> str:
    return latents(tmp_path_factory.mktemp("latents"), N_LATENTS)


def _config(data: str, mode: str, out: Path) -> TrainConfig:
    return TrainConfig(data=data, model="sit", model_args=SIZE, class_cond=True, batch_size=BATCH, device="cpu",
                       out=str(out), steps=10**6, warmup=100, compile=mode != "eager", bf16=mode.endswith("bf16")
                       ).validate()


Step = tuple[Callable[[], object], dict]


@pytest.fixture(scope="module")
def built() -> dict[str, Step]:
    """Each implementation's warmed-up step and what it ran, built in its first round and kept for the later ones."""
    return {}


def _fastfm(cfg: TrainConfig) -> Step:
    """The engine step, the precision it computes in and the model's parameter count."""
    trainer = Trainer(cfg, DistEnv())
    counter = itertools.count(1)
    return (lambda: trainer.train_step(next(counter))), {"precision": trainer.precision.to_json()["compute"],
                                                         "params": params(trainer.model)}


def _diffusers(cfg: TrainConfig, mode: str) -> Step:
    """The plain loop on the DiT of the SiT's size, after checking the two count the same parameters."""
    torch.manual_seed(cfg.seed)
    data = get_dataset(cfg.data, seed=cfg.seed)
    with torch.device("meta"):
        sit = model_for(cfg, data)
    model = dit_like(sit.config)
    once = params_counted_once(model)
    assert once == params(sit), f"diffusers' DiT has {once} parameters counted as SiT counts them; SiT {params(sit)}"
    net = torch.compile(model, fullgraph=True) if mode != "eager" else model
    return plain_step(net, model, data, cfg, torch.device("cpu")), {
        "precision": "bf16" if cfg.bf16 else "fp32", "params": params(model), "params_counted_once": once}


def _warmup(loop: str, mode: str) -> int:
    """Steps before timing: one (compilation), and one more for fastfm compiled (its recompile as the noise seed
    turns dynamic)."""
    return 2 if loop == "fastfm" and mode != "eager" else 1


def _built(built: dict[str, Step], data: str, out: Path, loop: str, mode: str) -> Step:
    impl = f"{loop}-{mode}"
    if impl not in built:
        cfg = _config(data, mode, out)
        step, ran = _fastfm(cfg) if loop == "fastfm" else _diffusers(cfg, mode)
        for _ in range(_warmup(loop, mode)):
            step()
        built[impl] = step, ran
    return built[impl]


@pytest.mark.parametrize("loop, mode", IMPLS)
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_sit_train_step(benchmark, tmp_path, data_name, built, round_, loop, mode):
    step, ran = _built(built, data_name, tmp_path, loop, mode)
    benchmark.group = "train step sit-S/2"
    benchmark.pedantic(step, rounds=1, iterations=1)
    benchmark.extra_info.update(op="train_step", case="sit-S/2", impl=f"{loop}-{mode}", loop=loop, mode=mode,
                                round=round_, batch=BATCH, image=list(SHAPE), classes=CLASSES, **ran)
