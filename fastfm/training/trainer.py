"""Conditional Flow Matching training, on one process or many (torchrun DDP); ``python -m fastfm.train``
(``fastfm.commands.train``) runs :func:`train`.

One optimizer step:
  global batch of B rows (x1, labels, t) from the shared stream, the step's noise seed -> this rank's rows
  -> source x0 (or noise drawn in-kernel) -> coupling (per rank, or over the global batch:
  gather, solve on rank 0, scatter) -> ``grad_accum`` micro-batches through the compiled
  ``LossStep`` (path op, model, CFM loss), DDP all-reducing on the last one only (no_sync)
  -> NaN/Inf guard -> clipping -> AdamW -> LR schedule -> EMA.
Writes metrics.jsonl, periodic and final checkpoints (atomic), EMA weights (safetensors) +
model.json, periodic and final evaluations (test NLL, sample PNG). Layout: fastfm.training.distributed.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import fastfm
from fastfm import compat, hardware, seeding
from fastfm.run import shards
from fastfm.training import distributed, sharding
from fastfm.evaluation.budget import EvalBudget, clock
from fastfm.run.checkpoint import (CHECKPOINT, EMA_WEIGHTS, META, CheckpointError, load_training_state, read_committed,
                                   save_inference, settle)
from fastfm.training.config import ConfigError, TrainConfig, upgrade
from fastfm.training.couplings import get_coupling
from fastfm.data import get_dataset
from fastfm.path.densities import Gaussian
from fastfm.training.distributed import DistEnv
from fastfm.solve.guidance import drop_labels
from fastfm.path.interpolants import interpolant_objective
from fastfm.kernels import ops, select
from fastfm.kernels.rng import philox_state
from fastfm.training.objectives import Objective, get_objective
from fastfm.path.affine import AffinePath, FourierInterpolant, LearnedScheduler, get_path
from fastfm.evaluation.plotting import save_samples_png
from fastfm.training.preemption import Interrupted, StopSignal
from fastfm.run.rundir import (MetricsLog, RunLock, check_out_dir, check_space, command_line, prepare_out_dir,
                           read_metrics, resume_command)
from fastfm.evaluation.report import evaluate
from fastfm.run.load import build_source, resolve_device
from fastfm.run.meta import downsample
from fastfm.solve import EagerSampler, settings_with
from fastfm.solve.settings import SAMPLE_COUNTS
from fastfm.training.assemble import init_from, model_for, run_meta
from fastfm.training.telemetry import flops_per_sample, peak_flops, peak_memory_mb
from fastfm.training.timesteps import get_time_sampler

EVAL_BUDGET_FRACTION = 0.25  # the automatic evaluation budget: this fraction of the training time
EVAL_BUDGET_MIN_S = 10.0  # and never below this
EVAL_MIN_POINTS = 8  # an evaluation measures at least this many test points and samples
EVAL_MIN_TEST = 2  # test points a run needs: sample quality and the NLL's standard error take two


class TrainingDiverged(ValueError):
    """Too many non-finite steps in a row."""


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then 1 (constant) or 0.5 (1 + cos(pi p)) (cosine), p in [0, 1]."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))


def ema_decay(cfg: TrainConfig, step: int) -> float:
    """beta = 0.5 ** (B / h), h = half-life in samples, ramped up to at most ``ema_rampup`` x samples seen (EDM)."""
    half = cfg.ema_halflife_kimg * 1000.0
    if cfg.ema_rampup > 0:
        half = min(half, step * cfg.batch_size * cfg.ema_rampup)
    return 0.5 ** (cfg.batch_size / max(half, 1e-8))


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter and buffer (of this rank's shards: the EMA is
    sharded like the weights)."""
    with torch.no_grad():
        e, m = sharding.local_state(ema), sharding.local_state(model)
        floats = [(a, b) for a, b in zip(e, m) if a.is_floating_point()]
        compat.foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1.0 - decay)


class LossStep(nn.Module):
    """The objective's loss of ``model`` on one micro-batch (``fastfm.training.objectives``): the unit
    torch.compile traces and DDP wraps.

    bf16 autocast covers the model; t, h, the time embedding and the loss reduction stay fp32.
    """

    def __init__(self, model: nn.Module, path: AffinePath, objective: Objective, target: str, loss: str,
                 superres: int, bf16: bool):
        super().__init__()
        self.model, self.path, self.objective, self.target, self.loss = model, path, objective, target, loss
        self.superres, self.bf16 = superres, bf16

    def forward(self, x0: Tensor | None, x1: Tensor, t: Tensor, h: Tensor | None, y: Tensor | None,
                rng: Tensor | None) -> Tensor:
        """x0 None: the kernels draw it from the noise state ``rng`` (int64 [seed, offset] on x1's device),
        an input like the data, so a new seed never recompiles the step. h: the steps of a flow map's rows."""
        cond = {} if y is None else {"y": y}
        if self.superres:
            cond["low_res"] = downsample(x1, self.superres)
        bf16 = torch.autocast(x1.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with bf16:
            return self.objective.per_sample(self.model, self.path, x0, x1, t, h, rng, self.target, self.loss,
                                             cond).mean()


def channels_last(cfg: TrainConfig, device: torch.device, image: bool, objective: Objective) -> bool:
    """NHWC for image models: on request, or (auto) on CUDA, where tensor-core convolutions want it; never for an
    objective that takes forward-mode JVPs (group norm's has no rule for that layout)."""
    return image and not objective.forward_mode and (
        cfg.memory_format == "channels_last" or (cfg.memory_format == "auto" and device.type == "cuda"))


class Trainer:
    """Everything one training process holds; ``train_step`` is one optimizer step, ``fit`` the whole run."""

    def __init__(self, cfg: TrainConfig, env: DistEnv | None = None):
        self.cfg, self.env = cfg, env or distributed.env_from_torchrun()
        world, accum = self.env.world, cfg.grad_accum
        if cfg.batch_size % (world * accum):
            raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by world size x grad_accum = "
                              f"{world} x {accum}")
        base = resolve_device(cfg.device)
        self.device = torch.device("cuda", self.env.local_rank) if base.type == "cuda" and self.env.active else base
        distributed.init(self.env, self.device, cfg.dist_timeout)
        self.saved_at: int | None = None  # step of the last checkpoint written or resumed from
        torch.manual_seed(seeding.derive(cfg.seed, seeding.INIT))
        self.data = get_dataset(cfg.data, seed=cfg.seed, **cfg.data_args)
        if len(self.data.test) < EVAL_MIN_TEST:  # found before training, not by the final evaluation
            raise ConfigError(f"data set {cfg.data!r} has {len(self.data.test)} test point(s); the evaluation needs "
                              f"at least {EVAL_MIN_TEST}: give more data or a larger test split (--data-args "
                              "test_fraction=... or n_test=...)")
        self.path = get_path(cfg.path, build_source(cfg.source, cfg.seed, self.data.shape), **cfg.path_args)
        self.objective = get_objective(cfg.objective, **cfg.objective_args)
        self.model = model_for(cfg, self.data).to(self.device)
        if cfg.init and not cfg.resume:  # a resumed run's weights are its checkpoint's
            init_from(self.model, cfg.init)
        if self.env.active:  # same initial weights everywhere (DDP also broadcasts), per-rank dropout streams
            torch.manual_seed(seeding.derive(cfg.seed, seeding.RANK, self.env.rank))
        self.meta = run_meta(cfg, self.data, self.model)
        # --path learned: the interpolant's parameters, raised on the max-min objective (fastfm.path.interpolants)
        self.interp: FourierInterpolant | None = None
        if isinstance(self.path.scheduler, LearnedScheduler):
            self.interp = self.path.scheduler.interpolant.to(self.device)
            self.interp_opt = torch.optim.Adam(self.interp.parameters(), lr=self.path.scheduler.lr, maximize=True)
            self.interp_objective = torch.full((), float("nan"), device=self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)  # contiguous: evaluation takes JVPs
        if channels_last(cfg, self.device, self.data.kind == "image", self.objective):
            self.model.to(memory_format=torch.channels_last)
        self.hardware = hardware.capabilities(self.device)
        self.precision = hardware.autocast_precision(cfg.bf16, self.hardware, cfg.force_bf16)
        if cfg.activation_checkpointing:
            sharding.checkpoint_activations(self.model)
        if cfg.fsdp:
            if not self.env.active:
                raise ConfigError("--fsdp shards over the ranks of a torchrun job: launch it with torchrun "
                                  "--nproc_per_node N -m fastfm.train ... (a single process trains without --fsdp)")
            sharding.shard(self.model, self.device, bf16=self.precision.bf16,
                           reshard_after_forward=cfg.reshard_after_forward)
            sharding.shard(self.ema, self.device)
        regional = cfg.compile and (cfg.regional_compile or cfg.fsdp)
        if regional:
            sharding.compile_blocks(self.model, self.device)
        self.coupling = get_coupling(cfg.coupling, **cfg.coupling_args)
        self.times = get_time_sampler(cfg.time_sampler, **cfg.time_sampler_args)
        # fused AdamW skips a step without a host sync when found_inf is 1 (the NaN/Inf guard)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(cfg, s))
        self.gen = seeding.generator(cfg.seed, seeding.BATCH)
        # Independent coupling from a Gaussian source: the kernels draw x0 from a per-step seed (a learned
        # interpolant's step needs x0 itself).
        self.in_kernel_noise = (cfg.coupling == "independent" and isinstance(self.path.source, Gaussian)
                                and self.interp is None and not self.data.paired)
        if self.data.paired and (cfg.coupling != "independent" or cfg.source != "gaussian"):
            raise ConfigError(f"data set {cfg.data!r} pairs each point with its source point (reflow): it takes "
                              "--coupling independent and --source gaussian")
        # auto's kernel backend: timed on rank 0 for this job's rows, the same on every rank
        rows = (cfg.batch_size // (world * accum), *self.data.shape)
        probe = select.choose(rows, torch.float32, self.device, self.in_kernel_noise) if self.env.main else None
        self.kernels = distributed.from_rank0(probe, self.env)
        ops.set_auto_backend(self.device.type, self.kernels["backend"])
        step = LossStep(self.model, self.path, self.objective, cfg.target, cfg.loss, cfg.superres,
                        self.precision.bf16)
        step = torch.compile(step, fullgraph=True) if cfg.compile and not regional else step  # before the DDP wrap
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.step_fn = DistributedDataParallel(step, device_ids=ids) if self.env.active and not cfg.fsdp else step

    # ------------------------------------------------------------------ one step

    def _couple(self, x0: Tensor, x1: Tensor, y: Tensor | None, step: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Pair this rank's rows: per rank, or over the global batch (gather, solve on rank 0, scatter)."""
        env = self.env
        gen = seeding.generator(self.cfg.seed, seeding.COUPLING, step, env.rank, device=x0.device)
        if self.cfg.coupling_scope == "rank" or not env.active:
            return self.coupling(x0, x1, y, generator=gen)
        g0, g1 = distributed.all_gather_rows(x0, env), distributed.all_gather_rows(x1, env)
        gy = None if y is None else distributed.all_gather_rows(y, env)
        c0, c1, cy = self.coupling(g0, g1, gy, generator=gen) if env.main else (None, None, None)
        out0, out1 = distributed.scatter_rows(c0, x0, env), distributed.scatter_rows(c1, x1, env)
        return out0, out1, None if y is None else distributed.scatter_rows(cy, y, env)

    def train_step(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """One optimizer step; returns (mean loss of this rank's rows, gradient norm, step skipped) as tensors."""
        cfg, env, dev = self.cfg, self.env, self.device
        if self.data.paired:  # reflow: the pairs are the coupling
            x0, x1, y = self.data.sample_pairs(cfg.batch_size, self.gen)
        else:
            x1, y = self.data.sample(cfg.batch_size, self.gen)
            x0 = None if self.in_kernel_noise else self.path.source.sample(tuple(x1.shape), generator=self.gen)
        y = y if cfg.class_cond else None
        seed = seeding.derive(cfg.seed, seeding.NOISE, step)  # a function of the step: resumes exactly
        m = cfg.batch_size // (env.world * cfg.grad_accum)
        t, h = self.objective.draw(cfg.batch_size, self.times, self.gen, m)
        if y is not None:
            y = drop_labels(y, cfg.label_dropout, self.model.num_classes, self.gen)
        rows = env.rows(cfg.batch_size)
        x1, t = x1[rows].to(dev, non_blocking=True), t[rows].to(dev, non_blocking=True)
        h = None if h is None else h[rows].to(dev, non_blocking=True)
        y = None if y is None else y[rows].to(dev, non_blocking=True)
        if x0 is not None:
            x0, x1, y = self._couple(x0[rows].to(dev, non_blocking=True), x1, y, step)
        total = torch.zeros((), device=dev)
        self.opt.zero_grad(set_to_none=True)
        for i in range(cfg.grad_accum):
            mb = slice(i * m, (i + 1) * m)
            # this micro-batch's rows of the global batch's noise stream, as a device tensor
            rng = None if x0 is not None else philox_state(seed, rows.start + i * m, rows=m).to(
                dev, non_blocking=True)
            with self._reducing(i == cfg.grad_accum - 1):
                loss = self.step_fn(None if x0 is None else x0[mb], x1[mb], t[mb], None if h is None else h[mb],
                                    None if y is None else y[mb], rng)
                (loss / cfg.grad_accum).backward()
            total += loss.detach()
        # the norm of the whole gradient: over every rank's shards under --fsdp
        clip = cfg.grad_clip or float("inf")
        grad_norm = sharding.full(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        bad = distributed.any_rank(~(torch.isfinite(grad_norm) & torch.isfinite(total)), env)
        compat.set_found_inf(self.opt, bad)
        self.opt.step()
        self.sched.step()
        _ema_update(self.ema, self.model, ema_decay(cfg, step))
        if self.interp is not None and step % self.path.scheduler.every == 0:
            self._interpolant_step(x0, x1, t, y)
        return total / cfg.grad_accum, grad_norm, bad

    def _reducing(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradient accumulation: the ranks reduce gradients on the last micro-batch of a step only (DDP's
        ``no_sync`` before it; FSDP keeps unsharded gradients until then)."""
        if self.cfg.fsdp:
            self.model.set_requires_gradient_sync(last)  # type: ignore[operator]
            return contextlib.nullcontext()
        return self.step_fn.no_sync() if self.env.active and not last else contextlib.nullcontext()

    def _interpolant_step(self, x0: Tensor, x1: Tensor, t: Tensor, y: Tensor | None) -> None:
        """One ascent step of the interpolant's parameters on G (``interpolant_objective``) at the current velocity,
        on this step's rows (gradients averaged over ranks; eager PyTorch, see fastfm.path.interpolants). The velocity
        gets no gradient here; a non-finite G or gradient skips the step."""
        interp = self.interp
        cond = self.meta.conditioning(x1, y)
        params = list(interp.parameters())
        g = interpolant_objective(self.model, interp, x0, x1, t, **cond)
        grads = torch.autograd.grad(g, params)
        for p, grad in zip(params, grads):
            p.grad = distributed.mean_over_ranks(grad, self.env)
        finite = torch.isfinite(g.detach()) & torch.stack([torch.isfinite(p.grad).all() for p in params]).all()
        if not bool(distributed.any_rank(~finite, self.env)):
            self.interp_opt.step()
        self.interp_opt.zero_grad(set_to_none=True)
        self.interp_objective = distributed.mean_over_ranks(g.detach(), self.env)

    # ------------------------------------------------------------------ state

    def weights_finite(self) -> bool:
        """Whether every weight of the model and its EMA is finite, on every rank (their shards under --fsdp)."""
        tensors = [t for m in (self.model, self.ema) for t in sharding.local_state(m) if t.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
        return not bool(distributed.any_rank(~finite, self.env))

    def last_good(self) -> str:
        """Where the last checkpoint this run wrote (or resumed from) is, for error messages."""
        out = Path(self.cfg.out) / CHECKPOINT
        return "no checkpoint was written" if self.saved_at is None else f"last good checkpoint: {out} (step " \
            f"{self.saved_at})"

    def save(self, step: int) -> None:
        """Commit the checkpoint (rank 0 writes; every rank's RNG states gathered into it) with its EMA weights
        and model.json; non-finite weights are never written (``TrainingDiverged``). Under --fsdp every rank first
        writes its shards of model, EMA and optimizer (``fastfm.run.shards``), which checkpoint.pt names, and
        ema.safetensors holds the EMA gathered whole."""
        if not self.weights_finite():
            raise TrainingDiverged(f"the weights are not finite (inf/NaN) at step {step}: not checkpointed; "
                                   f"{self.last_good()}")
        cfg, env = self.cfg, self.env
        torch_rng = distributed.gather_states(torch.get_rng_state(), env)
        cuda_rng = (distributed.gather_states(torch.cuda.get_rng_state(self.device), env)
                    if self.device.type == "cuda" else None)
        partial = shards.save(cfg.out, step, self._sharded_state(), env.rank) if cfg.fsdp else None
        ema = sharding.full_state(self.ema)
        if env.main:
            state = {"scheduler": self.sched.state_dict(),
                     "step": step, "config": dict(cfg.__dict__), "meta": self.meta.to_json(),
                     "world": env.world, "rng": self.gen.get_state(), "torch_rng": torch_rng,
                     "cuda_rng": cuda_rng, "data": self.data.state_dict(), "kernels": self.kernels["backend"]}
            if partial is not None:
                state["shards"] = shards.publish(cfg.out, step, partial)
            else:
                state.update(model=self.model.state_dict(), ema=ema, optimizer=self.opt.state_dict())
            if self.interp is not None:  # and model.json's path args rebuild the interpolant as trained so far
                self.meta.path_args = self.path.scheduler.args()
                state.update(interpolant=self.interp.state_dict(), interp_optimizer=self.interp_opt.state_dict())
            save_inference(cfg.out, ema, self.meta.to_json(), step=step, state=state)
            shards.drop_stale(cfg.out, state.get("shards", {}).get("dir"))
        self.saved_at = step

    def _sharded_state(self) -> dict[str, Any]:
        """Model, EMA and optimizer state as ``torch.distributed.checkpoint`` saves and loads it: keyed by parameter
        name, each rank's shards under --fsdp, whole tensors otherwise."""
        return {"model": get_model_state_dict(self.model), "ema": get_model_state_dict(self.ema),
                "optimizer": get_optimizer_state_dict(self.model, self.opt)}

    def _load_weights(self, state: dict) -> None:
        """The model, EMA and optimizer of a checkpoint: from its shards (saved by any number of ranks), or from its
        whole tensors (into a sharded model: each rank keeps its shards)."""
        if "shards" in state:
            out = Path(self.cfg.out)
            problem = distributed.from_rank0(shards.verify(out, state["shards"]) if self.env.main else None,
                                             self.env)
            if problem is not None:
                raise CheckpointError(problem)
            loaded = self._sharded_state()
            shards.load(out, state["shards"], loaded)
            set_model_state_dict(self.model, loaded["model"])
            set_model_state_dict(self.ema, loaded["ema"])
            set_optimizer_state_dict(self.model, self.opt, loaded["optimizer"])
        elif self.cfg.fsdp:
            whole = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, state["model"], options=whole)
            set_model_state_dict(self.ema, state["ema"], options=whole)
            named = sharding.named_optimizer_state(self.model, state["optimizer"])
            set_optimizer_state_dict(self.model, self.opt, named, options=whole)
        else:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["optimizer"])

    def restore(self, state: dict) -> int:
        """Load a checkpoint's full state for ``--resume``; returns the step it was taken at."""
        cfg, env = self.cfg, self.env
        saved = {k: v for k, v in upgrade(state["config"]).items() if k not in RESUMABLE}  # an older run's too
        now = {k: v for k, v in cfg.__dict__.items() if k not in RESUMABLE}
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            raise ValueError(f"--resume with options that differ from the checkpoint's: {diff}")
        try:
            self._load_weights(state)
            self.sched.load_state_dict(state["scheduler"])
            self.gen.set_state(state["rng"])
            if state["world"] == env.world:
                # a row of the (W, N) stack is a view into it: set_rng_state needs a tensor of its own
                torch.set_rng_state(state["torch_rng"][env.rank].clone())
                if self.device.type == "cuda" and state["cuda_rng"] is not None:
                    torch.cuda.set_rng_state(state["cuda_rng"][env.rank].clone(), self.device)
            else:  # resharded: the batch stream goes on; each rank's own streams (dropout) start anew
                torch.manual_seed(seeding.derive(cfg.seed, seeding.RANK, env.rank, int(state["step"])))
                if env.main:
                    print(f"resuming on {env.world} rank(s) a checkpoint written by {state['world']}: the global "
                          "batches go on unchanged; per-rank random streams (dropout) are drawn anew")
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, KeyError, IndexError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # "Error(s) in ...:" + the first
            raise CheckpointError(f"{Path(cfg.out) / CHECKPOINT} does not fit this run's model or optimizer: "
                                  f"{first}") from None
        self.data.load_state_dict(state["data"])
        kernels = state.get("kernels")  # the backend the run began with, so a resume stays bitwise the same run
        if kernels is not None and ops.forced_backend() is None and ops.unusable(kernels, self.device) is None:
            ops.set_auto_backend(self.device.type, kernels)
            self.kernels = {"backend": kernels, "rule": "the checkpoint's (resumed run)"}
        if self.interp is not None:
            self.interp.load_state_dict(state["interpolant"])
            self.interp_opt.load_state_dict(state["interp_optimizer"])
            self.meta.path_args = self.path.scheduler.args()
        if env.main:  # shard directories of saves a kill left uncommitted
            shards.drop_stale(cfg.out, state.get("shards", {}).get("dir"))
        self.saved_at = int(state["step"])
        return self.saved_at

    # ------------------------------------------------------------------ the run

    def _flops_per_sample(self) -> float:
        """FLOPs of one sample's step, counted on a copy of the model on the meta device (no memory, no random
        draws: a resumed run's dropout draws stay those of the uninterrupted run)."""
        meta = torch.device("meta")

        def inputs(n: int) -> tuple[tuple, dict]:
            x = torch.empty(n, *self.data.shape, device=meta)
            cond = self.meta.conditioning(x, torch.zeros(n, dtype=torch.long, device=meta))
            return (x, torch.empty(n, device=meta)), cond
        with meta:
            return flops_per_sample(model_for(self.cfg, self.data), inputs)

    def header(self, resumed_at: int | None) -> dict[str, Any]:
        """metrics.jsonl's first line of each (re)start: the machine, the precision and kernel backend chosen for
        it, the world size, where a resume began."""
        return {"hardware": self.hardware.to_json(), "precision": self.precision.to_json(),
                "kernels": self.kernels, "world": self.env.world, "resumed_at": resumed_at,
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "fastfm": fastfm.__version__}

    def eval_budget(self, trained_s: float) -> float | None:
        """Seconds an evaluation may take (None: no limit): --eval-budget, or (-1) EVAL_BUDGET_FRACTION of the
        training time so far, at least EVAL_BUDGET_MIN_S: an evaluation nobody asked for adds a quarter to
        the run, not a multiple of it."""
        if self.cfg.eval_budget == 0:
            return None
        if self.cfg.eval_budget > 0:
            return self.cfg.eval_budget
        auto = max(EVAL_BUDGET_MIN_S, EVAL_BUDGET_FRACTION * trained_s)
        # the other ranks wait for a periodic evaluation in their next collective: well within its timeout
        return min(auto, self.cfg.dist_timeout / 2) if self.env.active else auto

    def inference_model(self) -> nn.Module | None:
        """The EMA model evaluations sample, on rank 0 (None elsewhere): under --fsdp a whole copy gathered from
        the shards, by a collective every rank calls."""
        if not sharding.is_sharded(self.ema):
            return self.ema if self.env.main else None
        weights = sharding.full_state(self.ema)
        if not self.env.main:
            return None
        whole = model_for(self.cfg, self.data)
        whole.load_state_dict(weights)
        return whole.to(self.device).eval().requires_grad_(False)

    def evaluate(self, ema: nn.Module, png: Path, trained_s: float) -> dict[str, Any]:
        """A sample PNG, (vectors) sample quality and transport, and the test NLL of the EMA model
        (``fastfm.evaluation.report.evaluate``), sized to the evaluation budget (fixed-step solvers): up to half
        of it for the samples, the rest for the NLL (``EvalBudget``; ``eval_plan`` in the summary)."""
        cfg, data = self.cfg, self.data
        started, budget_s = clock(), self.eval_budget(trained_s)
        settings = settings_with({"solver": None if cfg.eval_solver == "auto" else cfg.eval_solver,
                                  "steps": cfg.eval_steps or None,
                                  "divergence": cfg.eval_divergence})
        sampler = EagerSampler(ema, self.path, self.meta, settings)
        timed = budget_s is not None and sampler.plan("sample").fixed  # adaptive solvers run as asked
        budget = EvalBudget(budget_s, started, EVAL_MIN_POINTS) if timed else None
        n = min(cfg.n_samples, SAMPLE_COUNTS["image"]) if data.kind == "image" else cfg.n_samples
        report, res = evaluate(sampler, data, n_samples=n, n_nll=cfg.eval_n, seed=cfg.seed, budget=budget)
        solved = sampler.describe()
        assert res is not None  # an eager sampler draws samples
        png.parent.mkdir(parents=True, exist_ok=True)
        save_samples_png(res.x, png, data.kind, data.levels, data.test,
                         title=f"{cfg.data}, {cfg.path}, {solved['solver']} x {solved['steps']}, NFE {res.nfe}")
        plan = {"budget_s": budget_s if timed else None, **(budget.record if budget else {}), "samples": len(res.x),
                "seconds": clock() - started}
        if "test" in report:
            plan["nll_points"] = report["test"]["n"]
        no_test = None if "test" in report else (
            "a flow map has no density without the ODE" if self.meta.flow_map else "no source density")
        return {"test": report.get("test"), "no_test": no_test, "samples_png": str(png), "sample_nfe": res.nfe,
                "transport": report.get("transport"), "eval_plan": plan, **({"quality": report["quality"]}
                                                                       if "quality" in report else {})}

    def fit(self) -> dict[str, Any]:
        """Run (or resume) the job holding OUT's lock; returns the final summary (also the last line of
        metrics.jsonl) on rank 0, {} on the other ranks and when a resumed run has nothing left to do."""
        cfg, env = self.cfg, self.env
        out, lock, problem = Path(cfg.out), RunLock(cfg.out), None
        if env.main:  # the writer: lock, finish or drop what a kill left, check before the first step
            try:
                if cfg.resume and not out.is_dir():  # a mistyped --out: nothing created
                    check_out_dir(out, cfg.resume, cfg.force)
                lock.acquire(command_line(env.world))
                if cfg.resume:
                    settle(out)
                check_out_dir(out, cfg.resume, cfg.force)
                check_space(out, self.checkpoint_bytes())
            except ValueError as e:
                problem = e
        failed = distributed.from_rank0(None if problem is None else str(problem), env)
        try:
            if failed is not None:
                raise problem if problem is not None else ConfigError(failed)
            return self._fit(out)
        finally:
            lock.release()

    def checkpoint_bytes(self) -> int:
        """About the size of one checkpoint: weights, EMA and Adam's two moments in checkpoint.pt, and the EMA
        weights again in ema.safetensors."""
        return 5 * sum(t.numel() * t.element_size() for t in self.model.state_dict().values())

    def _fit(self, out: Path) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        state = load_training_state(out / CHECKPOINT) if cfg.resume else None
        start = 0 if state is None else self.restore(state)
        log = MetricsLog(out, cfg.tensorboard) if env.main else None
        if state is not None:
            self._repair(out, state)
        if start >= cfg.steps:
            done = env.main and any("final" in r for r in read_metrics(out))
            if distributed.from_rank0(done, env):
                if env.main:
                    print(f"nothing to do: the run in {out} is complete at step {start} (raise --steps to go on)")
                return {}
        if log is not None:
            prepare_out_dir(out, dict(cfg.__dict__), None if state is None else start)
            log.write({"header": self.header(None if state is None else start)})
        try:
            rec, skipped, t_start = self._loop(out, start, log) if start < cfg.steps else self._logged(out)
        except RuntimeError as e:
            if not (env.active and distributed.is_timeout(e)):
                raise
            ranks = distributed.unresponsive(env, min(cfg.dist_timeout, 30.0))
            who = f"rank(s) {', '.join(map(str, ranks))} did not answer" if ranks else "another rank did not answer"
            raise distributed.RankTimeout(f"{who}: a collective timed out after --dist-timeout {cfg.dist_timeout:g} "
                                          f"s; the job stops; {self.last_good()}") from None
        summary: dict[str, Any] = {}
        ema = self.inference_model()
        if log is not None:
            assert ema is not None
            summary = self.evaluate(ema, out / "samples.png", time.perf_counter() - t_start)
            summary.update(steps=cfg.steps, world=env.world, wall_s=time.perf_counter() - t_start,
                           last=rec, skipped_steps=skipped)
            log.write({"final": summary})
            log.close()
        return summary

    def _repair(self, out: Path, state: dict) -> None:
        """On resume: EMA weights and model.json as committed with the checkpoint, rewritten from the restored
        EMA (gathered from its shards under --fsdp: every rank calls this) if they were removed or edited."""
        problem = None
        if self.env.main:
            try:
                for name in (EMA_WEIGHTS, META):
                    read_committed(out / name)
            except CheckpointError as e:
                problem = str(e)
        if distributed.from_rank0(problem, self.env) is None:
            return
        ema = sharding.full_state(self.ema)
        if self.env.main:
            print(f"{problem}: rewriting them from {out / CHECKPOINT}")
            save_inference(out, ema, state["meta"], step=int(state["step"]), state=state)

    def _logged(self, out: Path) -> tuple[dict[str, Any], int, float]:
        """A run that ended without its final summary: the last metrics row, its skipped steps, and a start
        time as far back as its training took (for the evaluation budget)."""
        rows = [r for r in read_metrics(out) if "loss" in r]
        rec = rows[-1] if rows else {}
        trained = rec.get("sec_per_kimg", 0.0) * self.cfg.steps * self.cfg.batch_size / 1000
        return rec, int(rec.get("skipped_steps", 0)), time.perf_counter() - trained

    def _loop(self, out: Path, start: int, log: MetricsLog | None) -> tuple[dict[str, Any], int, float]:
        """Steps start + 1 .. --steps with logging, periodic evaluation and checkpoints; a SIGTERM/SIGINT ends the
        step it arrives in with a checkpoint (``Interrupted``). Returns (last metrics row, skipped steps, the
        loop's start time)."""
        cfg, env, dev = self.cfg, self.env, self.device
        flops, peak = self._flops_per_sample(), peak_flops(dev, self.precision.bf16)
        bad_run = torch.zeros((), dtype=torch.int64, device=dev)
        skipped = torch.zeros((), dtype=torch.int64, device=dev)
        loss_sum, taken = torch.zeros((), device=dev), torch.zeros((), device=dev)
        pbar = tqdm(desc="train", dynamic_ncols=True, initial=start, total=cfg.steps, disable=not env.main)
        t_start = t_last = time.perf_counter()
        n_since, rec = 0, {}
        poll = STOP_POLL_CUDA if env.active and dev.type == "cuda" else 1  # a host sync there: not every step
        with StopSignal() as stop:
            for step in range(start + 1, cfg.steps + 1):
                loss, grad_norm, bad = self.train_step(step)
                warm_up = step == start + 1  # compiles the step: left out of the bar's rate and ETA
                if warm_up:
                    pbar.unpause()
                pbar.update()
                bad_run = (bad_run + bad) * bad
                skipped += bad
                loss_sum += torch.where(bad, 0.0, loss)
                taken += ~bad
                n_since += 1
                log_now = step % cfg.log_every == 0 or step == cfg.steps
                if (log_now or dev.type == "cpu") and int(bad_run) >= cfg.max_bad_steps:
                    raise TrainingDiverged(f"{int(bad_run)} non-finite steps in a row (loss or gradient NaN/Inf) "
                                           f"up to step {step}; {self.last_good()}")
                if log_now:
                    n_taken = int(taken)  # steps not skipped by the guard (the same on every rank)
                    mean_loss = float(distributed.mean_over_ranks(loss_sum, env)) / n_taken if n_taken else None
                    now = time.perf_counter()
                    rate = n_since * cfg.batch_size / (now - t_last)
                    rec = {"step": step, "loss": mean_loss, "grad_norm": float(grad_norm),
                           "lr": self.sched.get_last_lr()[0], "samples_per_s": rate, "sec_per_kimg": 1000 / rate,
                           "peak_mem_mb": peak_memory_mb(dev), "tflops": flops * rate / env.world / 1e12,
                           "skipped_steps": int(skipped)}
                    if peak is not None:
                        rec["mfu"] = flops * rate / env.world / peak
                    if self.interp is not None:  # -G at the last interpolant step: ~ the interpolant's kinetic energy
                        rec["interp_kinetic"] = -float(self.interp_objective)
                    if cfg.compile:
                        rec["compiled_graphs"] = compat.compiled_graph_count()
                    t_last, n_since = now, 0
                    loss_sum.zero_()
                    taken.zero_()
                    if log is not None:
                        log.write(rec)
                        pbar.set_postfix(loss=f"{mean_loss:.4f}" if n_taken else "skipped", img_s=f"{rate:.0f}",
                                         lr=f"{rec['lr']:.2e}")
                elif warm_up:  # and out of the next logged rate (unless it is all that interval holds)
                    t_last, n_since = time.perf_counter(), 0
                if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                    ema = self.inference_model()
                    if log is not None:
                        assert ema is not None
                        snap = self.evaluate(ema, out / "samples" / f"step_{step:07d}.png",
                                             time.perf_counter() - t_start)
                        log.write({"step": step, "eval": snap})
                if step % cfg.ckpt_every == 0 or step == cfg.steps:
                    self.save(step)
                signum = distributed.max_over_ranks(stop.signum, env, dev) if step % poll == 0 else 0
                if signum:
                    if self.saved_at != step:
                        self.save(step)
                    pbar.close()
                    raise Interrupted(f"stopped by {signal.Signals(signum).name} at step {step}: "
                                      f"checkpoint written to {out / CHECKPOINT}; resume with: "
                                      f"{resume_command(env.world)}", signum)
        pbar.close()
        return rec, int(skipped), t_start


STOP_POLL_CUDA = 10
"""NCCL ranks agree on a stop signal every this many steps (the all-reduce read on the host waits for the step)."""


RESUMABLE = {"resume", "force", "steps", "log_every", "ckpt_every", "out", "device", "eval_n", "n_samples",
             "eval_every", "eval_budget", "eval_divergence", "force_bf16", "dist_timeout", "tensorboard", "fsdp",
             "reshard_after_forward", "activation_checkpointing", "regional_compile"}


def train(cfg: TrainConfig, env: DistEnv | None = None) -> dict[str, Any]:
    """Run one training job (this process's part of it); rank 0 returns the final summary."""
    env = env or distributed.env_from_torchrun()
    try:
        return Trainer(cfg, env).fit()  # the DDP reducer is freed here, before its process group
    finally:
        distributed.shutdown(env)
