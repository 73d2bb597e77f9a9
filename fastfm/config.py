"""Typed run configuration: one dataclass, exposed as CLI flags and as an optional JSON config file.

Precedence: dataclass defaults < --config FILE < explicit flags. Unknown keys and
contradictory options are one clear ``ConfigError``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastfm.couplings import COUPLINGS
from fastfm.paths import PATHS, TARGETS
from fastfm.solvers import SOLVERS
from fastfm.timesteps import TIME_SAMPLERS


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


@dataclass
class TrainConfig:
    """Every option of ``python -m fastfm.train``; help texts are the field metadata."""

    data: str = field(default="checkerboard", metadata={"help": "data set name, npy:PATH or folder:PATH"})
    path: str = field(default="condot", metadata={"help": f"probability path: {', '.join(PATHS)}"})
    path_args: dict = field(default_factory=dict, metadata={"help": "path parameters KEY=VALUE (sigma_min, beta_max, ...)"})
    source: str = field(default="gaussian", metadata={"help": "source density: gaussian, or a data set name (interpolants)"})
    target: str = field(default="velocity", metadata={"help": f"prediction target: {', '.join(TARGETS)}"})
    coupling: str = field(default="independent", metadata={"help": f"coupling: {', '.join(COUPLINGS)}"})
    time_sampler: str = field(default="uniform", metadata={"help": f"t distribution: {', '.join(TIME_SAMPLERS)}"})
    model: str = field(default="auto", metadata={"help": "mlp, unet, or auto (mlp for vectors, unet for images)"})
    model_args: dict = field(default_factory=dict, metadata={"help": "model constructor arguments KEY=VALUE"})
    class_cond: bool = field(default=False, metadata={"help": "condition on class labels (classifier-free guidance)"})
    label_dropout: float = field(default=0.1, metadata={"help": "probability of the null label in training"})
    superres: int = field(default=0, metadata={"help": "super-resolution: condition on x1 downsampled by this factor (0: off)"})
    steps: int = field(default=5000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=1024, metadata={"help": "global batch size (all ranks and micro-batches)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (DDP syncs on the last)"})
    coupling_scope: str = field(default="rank", metadata={"help": "minibatch coupling over each rank's rows (rank) or the global batch (global)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup: int = field(default=100, metadata={"help": "linear learning-rate warm-up steps"})
    lr_schedule: str = field(default="constant", metadata={"help": "after warm-up: constant or cosine (to 0)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    ema_halflife_kimg: float = field(default=500.0, metadata={"help": "EMA half-life in thousands of samples"})
    ema_rampup: float = field(default=0.05, metadata={"help": "EMA half-life at most this fraction of samples seen (0: off)"})
    max_bad_steps: int = field(default=10, metadata={"help": "stop after this many non-finite steps in a row"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoint.pt if it exists"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    out: str = field(default="runs/default", metadata={"help": "output directory"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the training step"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (t, embeddings and loss stay fp32)"})
    memory_format: str = field(default="auto", metadata={"help": "image models: channels_last, contiguous, or auto (channels_last on CUDA)"})
    log_every: int = field(default=100, metadata={"help": "steps between metrics lines"})
    ckpt_every: int = field(default=1000, metadata={"help": "steps between checkpoints"})
    eval_every: int = field(default=0, metadata={"help": "steps between evaluations (test NLL, sample PNG; 0: final only)"})
    eval_solver: str = field(default="midpoint", metadata={"help": f"solver for final NLL and samples: {', '.join(SOLVERS)}"})
    eval_steps: int = field(default=32, metadata={"help": "solver steps for final NLL and samples"})
    eval_n: int = field(default=2000, metadata={"help": "test points for the final NLL"})
    n_samples: int = field(default=2000, metadata={"help": "samples in the final plot (64 for images)"})

    def validate(self) -> "TrainConfig":
        checks = [
            (self.path in PATHS, f"unknown path {self.path!r}; choose one of {PATHS}"),
            (self.target in TARGETS, f"unknown target {self.target!r}; choose one of {TARGETS}"),
            (self.coupling in COUPLINGS, f"unknown coupling {self.coupling!r}; choose one of {COUPLINGS}"),
            (self.time_sampler in TIME_SAMPLERS, f"unknown time sampler {self.time_sampler!r}; choose one of {TIME_SAMPLERS}"),
            (self.eval_solver in SOLVERS, f"unknown solver {self.eval_solver!r}; choose one of {SOLVERS}"),
            (self.model in ("auto", "mlp", "unet"), f"unknown model {self.model!r}; choose auto, mlp or unet"),
            (self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be >= 1"),
            (self.eval_steps >= 1 and self.eval_n >= 1 and self.n_samples >= 1, "eval_steps, eval_n, n_samples must be >= 1"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.ema_halflife_kimg > 0, f"ema_halflife_kimg must be positive, got {self.ema_halflife_kimg}"),
            (self.ema_rampup >= 0, f"ema_rampup must be >= 0, got {self.ema_rampup}"),
            (self.lr_schedule in ("constant", "cosine"), f"unknown lr_schedule {self.lr_schedule!r}; choose constant or cosine"),
            (self.max_bad_steps >= 1, f"max_bad_steps must be >= 1, got {self.max_bad_steps}"),
            (0.0 <= self.label_dropout < 1.0, f"label_dropout must be in [0, 1), got {self.label_dropout}"),
            (self.log_every >= 1 and self.ckpt_every >= 1, "log_every and ckpt_every must be >= 1"),
            (self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.batch_size % max(1, self.grad_accum) == 0,
             f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}"),
            (self.coupling_scope in ("rank", "global"), f"unknown coupling_scope {self.coupling_scope!r}; choose rank or global"),
            (self.memory_format in ("auto", "channels_last", "contiguous"),
             f"unknown memory_format {self.memory_format!r}; choose auto, channels_last or contiguous"),
            (not (self.source != "gaussian" and self.path in ("vp", "ve")),
             f"path {self.path!r} is a Gaussian diffusion path; a data source needs an interpolant (linear, trig, condot)"),
            (self.superres >= 0, f"superres must be >= 0, got {self.superres}"),
            (not (self.coupling.endswith("-label") and not self.class_cond),
             f"coupling {self.coupling!r} needs class labels: add --class-cond"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(cls: type = TrainConfig, description: str = "") -> argparse.ArgumentParser:
    """Flags from the dataclass fields: bools become --x/--no-x, dicts repeated KEY=VALUE lists."""
    p = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    p.add_argument("--config", type=str, help="JSON file of options (flags override it)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, help_ = hints[f.name], f.metadata.get("help", "")
        if kind is bool:
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, help=help_)
        elif kind is dict:
            p.add_argument(_flag(f.name), nargs="*", metavar="KEY=VALUE", help=help_)
        else:
            p.add_argument(_flag(f.name), type=kind, help=help_)
    return p


def from_dict(d: dict, cls: type = TrainConfig) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a JSON object of options, got {type(d).__name__}")
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


def parse_config(argv: list[str] | None = None, cls: type = TrainConfig, description: str = "") -> Any:
    """CLI flags (+ optional JSON file) -> validated config; bad input exits with one clear message."""
    args = vars(build_parser(cls, description).parse_args(sys.argv[1:] if argv is None else argv))
    try:
        values: dict[str, Any] = {}
        if "config" in args:
            path = Path(args.pop("config"))
            try:
                loaded = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot read config file {path}: {e}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {path} must hold a JSON object, got {type(loaded).__name__}")
            values.update(loaded)
        for k, v in args.items():
            values[k] = parse_kv(v) if isinstance(v, list) else v
        return from_dict(values, cls).validate()
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
