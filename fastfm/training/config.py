"""Typed run configuration: one dataclass (``python -m fastfm.train`` makes its fields flags: fastfm.commands.train).

Precedence: dataclass defaults < --config FILE < explicit flags. Unknown keys and
contradictory options are one clear ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from fastfm.training.couplings import COUPLINGS
from fastfm.data import DATASETS, check_dataset
from fastfm.solve.divergence import DIVERGENCES
from fastfm.models import MODELS
from fastfm.path.affine import PATHS, TARGETS
from fastfm.solve.settings import SAMPLE_COUNTS
from fastfm.solve.settings import DEFAULT_SOLVER_HELP, DEFAULT_STEPS_HELP
from fastfm.solve.solvers import SOLVERS
from fastfm.training.losses import LOSSES
from fastfm.training.objectives import OBJECTIVES, get_objective
from fastfm.training.timesteps import TIME_SAMPLERS


def flag(name: str) -> str:
    """The command-line flag of an option: ``eval_steps`` -> ``--eval-steps``."""
    return "--" + name.replace("_", "-")


class ConfigError(ValueError):
    """Bad or contradictory configuration."""


def parse_kv(items: list[str]) -> dict[str, Any]:
    """['a=1', 'b=x', 'c=[1,2]'] -> {'a': 1, 'b': 'x', 'c': [1, 2]} (values parsed as JSON when they parse)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric option: finite, ``lo <= v`` (``lo < v`` if ``lo_open``) and ``v < hi``."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False

    def __contains__(self, v: float) -> bool:
        return math.isfinite(v) and (v > self.lo if self.lo_open else v >= self.lo) and v < self.hi

    def __str__(self) -> str:
        if self.hi < math.inf:
            return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi})"
        if self.lo_open:
            return "positive" if self.lo == 0 else f"> {self.lo}"
        return f">= {self.lo}"


POSITIVE = Range(0, lo_open=True)
GROUPS = ("data", "model", "path and target", "training", "optimisation", "evaluation", "output and checkpoints",
          "device and performance")
"""The sections of ``--help``, in order; every option names one in its field metadata."""


def option(default: Any, group: str, help: str, allowed: Range | None = None) -> Any:
    """A config field: its default (a dict default is a fresh empty dict), --help group and text, allowed range."""
    meta = {"group": group, "help": help, "range": allowed}
    return field(default_factory=dict, metadata=meta) if default == {} else field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every option of ``python -m fastfm.train``; groups, help texts and ranges are the field metadata."""

    data: str = option("checkerboard", "data", "data set (npy:PATH, npz:PATH, folder:PATH: a file's or folder's "
                       f"data), with its --data-args: {DATASETS.help_text()}")
    data_args: dict = option({}, "data", "data set options KEY=VALUE (n_test, test_fraction, ...: see --data)")
    source: str = option("gaussian", "data", "source density: gaussian, or a data set name (interpolants)")
    model: str = option("auto", "model", f"auto (mlp for vectors, unet for images) or one of: {MODELS.help_text()}")
    model_args: dict = option({}, "model", "model constructor arguments KEY=VALUE (see --model)")
    class_cond: bool = option(False, "model", "condition on class labels (classifier-free guidance)")
    label_dropout: float = option(0.1, "model", "probability of the null label in training", Range(0, 1))
    superres: int = option(0, "model", "super-resolution: condition on x1 downsampled by this factor (0: off)",
                           Range(0))
    path: str = option("condot", "path and target", f"probability path, with its --path-args: {PATHS.help_text()}")
    path_args: dict = option({}, "path and target", "path parameters KEY=VALUE (sigma_min, beta_max, ...: see --path)")
    target: str = option("velocity", "path and target", f"prediction target: {', '.join(TARGETS)}")
    coupling: str = option("independent", "path and target",
                           f"coupling, with its --coupling-args: {COUPLINGS.help_text()}")
    coupling_args: dict = option({}, "path and target",
                                 "coupling parameters KEY=VALUE (reg, n_iters, ...: see --coupling)")
    coupling_scope: str = option("rank", "path and target",
                                 "minibatch coupling over each rank's rows (rank) or the global batch (global)")
    time_sampler: str = option("uniform", "path and target",
                               f"t distribution, with its --time-sampler-args: {TIME_SAMPLERS.help_text()}")
    time_sampler_args: dict = option({}, "path and target", "time sampler parameters KEY=VALUE (mean, std: see "
                                     "--time-sampler)")
    objective: str = option("cfm", "training", f"training objective, with its --objective-args: "
                            f"{OBJECTIVES.help_text()}")
    objective_args: dict = option({}, "training", "objective parameters KEY=VALUE (equal, power, share, ...: see "
                                  "--objective)")
    loss: str = option("squared", "training", f"per-sample loss: {', '.join(LOSSES)} (pseudo-Huber with c = "
                       "0.00054 sqrt(D), 2-rectified flow++)")
    init: str = option("", "training", "initialise the model (and its EMA) from this run's EMA weights (a "
                       "teacher for reflow or distillation; a flow map's step embedding starts fresh)")
    steps: int = option(5000, "training", "optimizer steps", Range(1))
    batch_size: int = option(1024, "training", "global batch size (all ranks and micro-batches)", Range(1))
    grad_accum: int = option(1, "training", "micro-batches per optimizer step (DDP syncs on the last)", Range(1))
    max_bad_steps: int = option(10, "training", "stop after this many non-finite steps in a row", Range(1))
    seed: int = option(0, "training", "random seed", Range(0, 2**63))
    lr: float = option(1e-3, "optimisation", "AdamW learning rate", POSITIVE)
    weight_decay: float = option(0.0, "optimisation", "AdamW weight decay", Range(0))
    warmup: int = option(100, "optimisation", "linear learning-rate warm-up steps (0: none)", Range(0))
    lr_schedule: str = option("constant", "optimisation", "after warm-up: constant or cosine (to 0)")
    grad_clip: float = option(1.0, "optimisation", "max gradient norm (0: off)", Range(0))
    ema_halflife_kimg: float = option(500.0, "optimisation", "EMA half-life in thousands of samples", POSITIVE)
    ema_rampup: float = option(0.05, "optimisation",
                               "EMA half-life at most this fraction of samples seen (0: off)", Range(0))
    eval_every: int = option(0, "evaluation", "steps between evaluations (test NLL, sample PNG; 0: final only)",
                             Range(0))
    eval_solver: str = option("auto", "evaluation", f"solver for final NLL and samples (auto: {DEFAULT_SOLVER_HELP}): "
                              f"{SOLVERS.help_text()}")
    eval_steps: int = option(0, "evaluation", f"solver steps for final NLL and samples (0: {DEFAULT_STEPS_HELP})",
                             Range(0))
    eval_n: int = option(2000, "evaluation", "test points for the final NLL (at most: see --eval-budget)", Range(1))
    eval_budget: float = option(-1.0, "evaluation",
                                "seconds an evaluation may take (measured per point before it starts; fewer test "
                                "points and samples when they do not fit): -1 a quarter of the training time so "
                                "far, at least 10 s; 0 no limit", Range(-1))
    eval_divergence: str = option("auto", "evaluation", f"divergence of the evaluation NLL: {DIVERGENCES.help_text()}")
    n_samples: int = option(SAMPLE_COUNTS["vector"], "evaluation",
                            f"samples in the final plot (at most {SAMPLE_COUNTS['image']} for images)", Range(1))
    out: str = option("runs/default", "output and checkpoints", "output directory (run directory)")
    resume: bool = option(False, "output and checkpoints", "continue the run in OUT from its checkpoint.pt")
    force: bool = option(False, "output and checkpoints", "replace the run already in OUT (without --resume)")
    log_every: int = option(100, "output and checkpoints", "steps between metrics lines", Range(1))
    ckpt_every: int = option(1000, "output and checkpoints", "steps between checkpoints", Range(1))
    tensorboard: bool = option(False, "output and checkpoints",
                               "also write the metrics as TensorBoard event files to OUT/tensorboard (needs the "
                               "tensorboard package)")
    device: str = option("auto", "device and performance", "cpu, cuda, cuda:N or auto")
    compile: bool = option(False, "device and performance", "torch.compile the training step")
    dist_timeout: float = option(1800.0, "device and performance",
                                 "seconds a collective may wait for the other ranks before the job stops, naming "
                                 "the rank that did not answer (torchrun jobs)", POSITIVE)
    bf16: bool = option(False, "device and performance",
                        "bf16 autocast (t, embeddings and loss stay fp32) where the hardware runs bf16 natively "
                        "(CUDA compute capability >= 8.0, CPUs with AVX512-BF16 or AMX); elsewhere one warning and "
                        "fp32, as PyTorch's CPU autocast does for a dtype it cannot run")
    force_bf16: bool = option(False, "device and performance",
                              "with --bf16: bf16 autocast even where the hardware emulates it (make train: 24x slower "
                              "than fp32 on a 2-core AVX2 CPU)")
    fsdp: bool = option(False, "device and performance",
                        "shard parameters, gradients, Adam moments and the EMA over the ranks (FSDP2 fully_shard on "
                        "each block and the root; models with blocks: sit, unet); checkpoints are sharded "
                        "(torch.distributed.checkpoint) and resume on any number of ranks")
    reshard_after_forward: bool = option(True, "device and performance",
                                         "with --fsdp: free each block's gathered parameters after its forward and "
                                         "gather them again for its backward (less memory, one more all-gather)")
    activation_checkpointing: bool = option(False, "device and performance",
                                            "keep only each block's input for the backward, which recomputes the "
                                            "block's forward (sit, unet): less activation memory, about 1/3 more "
                                            "compute")
    regional_compile: bool = option(False, "device and performance",
                                    "with --compile: compile the repeated block once instead of the whole step "
                                    "(shorter compile; always so with --fsdp)")
    memory_format: str = option("auto", "device and performance",
                                "image models: channels_last, contiguous, or auto (channels_last on CUDA)")

    def validate(self) -> "TrainConfig":
        """One ``ConfigError`` for the first bad option: out of its range, unknown name, or contradictory."""
        for f in dataclasses.fields(self):
            value, allowed = getattr(self, f.name), f.metadata["range"]
            if allowed is not None and value not in allowed:
                raise ConfigError(f"{f.name} must be {allowed}, got {value!r}")
        checks = [
            (self.target in TARGETS, f"unknown target {self.target!r}; choose one of {TARGETS}"),
            (self.eval_budget == -1 or self.eval_budget >= 0,
             f"eval_budget must be -1 (auto), 0 (no limit) or seconds > 0, got {self.eval_budget}"),
            (self.lr_schedule in ("constant", "cosine"), f"unknown lr_schedule {self.lr_schedule!r}; choose constant or cosine"),
            (self.batch_size % self.grad_accum == 0,
             f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}"),
            (self.coupling_scope in ("rank", "global"), f"unknown coupling_scope {self.coupling_scope!r}; choose rank or global"),
            (self.memory_format in ("auto", "channels_last", "contiguous"),
             f"unknown memory_format {self.memory_format!r}; choose auto, channels_last or contiguous"),
            (not (self.coupling.endswith("-label") and not self.class_cond),
             f"coupling {self.coupling!r} needs class labels: add --class-cond"),
            ("seed" not in self.data_args, "--data-args cannot set seed: the data set's seed is --seed"),
            (self.bf16 or not self.force_bf16, "--force-bf16 forces what --bf16 asks for: add --bf16"),
            (self.loss in LOSSES, f"unknown loss {self.loss!r}; choose one of {LOSSES}"),
            (self.fsdp or self.reshard_after_forward, "--no-reshard-after-forward applies to --fsdp: add --fsdp"),
            (self.compile or not self.regional_compile, "--regional-compile is a kind of --compile: add --compile"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        try:  # names and parameters, by the registries that build them
            requires = PATHS.build(self.path, **self.path_args).requires
            COUPLINGS.check(self.coupling, **self.coupling_args)
            TIME_SAMPLERS.check(self.time_sampler, **self.time_sampler_args)
            check_dataset(self.data, **self.data_args)
            if self.eval_solver != "auto":
                SOLVERS.check(self.eval_solver)
            DIVERGENCES.entry(self.eval_divergence)
            objective = get_objective(self.objective, **self.objective_args)
            objective.check(loss=self.loss, class_cond=self.class_cond)
            if self.model != "auto":
                MODELS.entry(self.model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if objective.flow_map:
            for bad, why in ((self.target != "velocity", f"--target {self.target}: it regresses average velocities "
                              "(--target velocity)"),
                             (self.path == "learned", "--path learned: the interpolant's own step needs a velocity "
                              "model; choose a fixed path"),
                             (self.model_args.get("flow_map", True) is not True, "--model-args flow_map=false: it "
                              "trains a model of two times"),
                             (objective.forward_mode and self.memory_format == "channels_last", "--memory-format "
                              "channels_last: its loss takes forward-mode JVPs, which group norm has no rule for in "
                              "that layout (leave --memory-format auto)")):
                if bad:
                    raise ConfigError(f"objective {self.objective!r} learns a flow map, not {why}")
        if objective.forward_mode:
            for bad, why in ((self.activation_checkpointing, "--activation-checkpointing: a recomputed block saves "
                              "other tensors under forward-mode AD than in its first forward"),
                             (self.compile and (self.regional_compile or self.fsdp), "compiled blocks (--compile with "
                              "--regional-compile or --fsdp): torch.func.jvp cannot run a compiled function from "
                              "eager code (PyTorch #128711); --fsdp trains it eagerly, without --compile")):
                if bad:
                    raise ConfigError(f"objective {self.objective!r} takes forward-mode JVPs through the model, "
                                      f"which rules out {why}")
        unmet = requires.unmet(self.__dict__)
        if unmet is not None:
            option, needed = unmet
            raise ConfigError(f"path {self.path!r} needs {flag(option)} {needed}, not {getattr(self, option)!r}: "
                              f"{requires.why}")
        return self


RETIRED = {"interp_modes": "modes", "interp_lr": "lr", "interp_every": "every"}
"""Options of an older fastfm that are the learned path's args now (``--path-args modes=... lr=... every=...``)."""


def upgrade(options: dict[str, Any]) -> dict[str, Any]:
    """Saved ``options`` (a config file, a checkpoint's config) in today's names: the :data:`RETIRED` options off
    their defaults become the learned path's args; on another path (where they were refused) they are dropped."""
    out = {k: v for k, v in options.items() if k not in RETIRED}
    if options.get("path") == "learned":
        defaults = PATHS.params("learned")
        moved = {new: options[old] for old, new in RETIRED.items() if options.get(old, defaults[new]) != defaults[new]}
        out["path_args"] = {**moved, **options.get("path_args", {})}
    return out


def from_dict(d: dict, cls: type = TrainConfig) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a JSON object of options, got {type(d).__name__}")
    d = upgrade(d)
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; valid options: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for k, v in d.items():
        kind = hints[k]
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise ConfigError(f"option {k!r} must be {kind.__name__}, got {v!r}")
        values[k] = v
    return cls(**values)
