"""CPU training-step throughput: fastfm's step (eager, --compile, --compile --bf16 as `make train` runs it: bf16
only where native, else fp32 with a warning) beside the plain
loops of Meta's flow_matching and of torchcfm examples, on the same model, data and batch, in one run.

One fastfm step is the whole engine step (data draw, fused path op + loss with in-kernel noise,
AdamW, clipping, NaN guard, LR schedule, EMA); the plain loops do less (no clipping, no EMA):

    flow_matching:  x0 = randn; t = rand; s = AffineProbPath(CondOTScheduler()).sample(t, x0, x1)
                    loss = ((model(s.x_t, s.t) - s.dx_t) ** 2).mean(); Adam step
    torchcfm:       t, xt, ut = ConditionalFlowMatcher(sigma=0).sample_location_and_conditional_flow(x0, x1)
                    loss = ((model(xt, t) - ut) ** 2).mean(); Adam step

Run: make bench-train (pytest-benchmark JSON per machine class -> benchmarks/results/cpu_train-CLASS.json via
run_levels.py and summarize.py).
"""

from __future__ import annotations

import importlib.util
import itertools
from typing import Callable

import pytest
import torch

from fastfm.training.assemble import model_for
from fastfm.training.config import TrainConfig
from fastfm.data import get_dataset
from fastfm.training.distributed import DistEnv
from fastfm.training.trainer import Trainer

CASES = {
    "mlp": dict(data="checkerboard", batch_size=4096, model_args={"hidden": 512, "depth": 4}),
    "unet": dict(data="mnist5k", batch_size=64,
                 model_args={"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1}),
}
def _plain(name: str):
    missing = importlib.util.find_spec(name) is None
    return pytest.param(name, marks=pytest.mark.skipif(missing, reason=f"{name} not installed (make bench-train)"))


IMPLS = ["fastfm-eager", "fastfm-compile", "fastfm-compile-bf16", _plain("flow_matching"), _plain("torchcfm")]
WARMUP = 3  # steps before timing: compilation (and its one recompile as the noise seed turns dynamic)


def _config(case: str, impl: str, out: str) -> TrainConfig:
    return TrainConfig(**CASES[case], device="cpu", out=out, steps=10**6, warmup=100,
                       compile="compile" in impl, bf16=impl.endswith("bf16")).validate()


def _fastfm_step(cfg: TrainConfig) -> tuple[Callable[[], object], dict]:
    """One engine step, and what it ran: the precision chosen for this machine (``--bf16`` computes in fp32
    where bf16 is emulated) and the kernel backend."""
    trainer = Trainer(cfg, DistEnv())
    counter = itertools.count(1)
    return (lambda: trainer.train_step(next(counter))), {"precision": trainer.precision.to_json()["compute"],
                                                         "kernels": trainer.kernels["backend"]}


def _plain_step(cfg: TrainConfig, impl: str) -> Callable[[], object]:
    """The examples' loop, on fastfm's model class and data stream."""
    torch.manual_seed(cfg.seed)
    data = get_dataset(cfg.data, seed=cfg.seed)
    model = model_for(cfg, data)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    if impl == "flow_matching":
        from flow_matching.path import AffineProbPath
        from flow_matching.path.scheduler import CondOTScheduler

        path = AffineProbPath(scheduler=CondOTScheduler())

        def sample(x0, x1):
            s = path.sample(t=torch.rand(x1.shape[0]), x_0=x0, x_1=x1)
            return s.t, s.x_t, s.dx_t
    else:
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

        sample = ConditionalFlowMatcher(sigma=0.0).sample_location_and_conditional_flow

    def step():
        x1, _ = data.sample(cfg.batch_size, gen)
        t, xt, ut = sample(torch.randn_like(x1), x1)
        loss = (model(xt, t) - ut).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss
    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_train_step(benchmark, tmp_path, case, impl):
    torch.compiler.reset()  # no shape history from the previous case (it would make dims dynamic)
    cfg = _config(case, impl, str(tmp_path))
    step, ran = _fastfm_step(cfg) if impl.startswith("fastfm") else (_plain_step(cfg, impl), {"precision": "fp32"})
    for _ in range(WARMUP):
        step()
    benchmark.group = f"train step {case}"
    benchmark.pedantic(step, rounds=20 if case == "mlp" else 10, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(op="train_step", case=case, impl=impl, batch=cfg.batch_size,
                                samples_per_s=cfg.batch_size / median, baseline="flow_matching", **ran)
