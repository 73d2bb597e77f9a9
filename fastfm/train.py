"""``python -m fastfm.train``: Conditional Flow Matching training, read top to bottom.

Each step: data x1 -> source x0 -> coupling -> t -> (x_t, target) -> model -> CFM loss ->
AdamW with warm-up and clipping -> EMA. Writes metrics.jsonl, checkpoints (atomic),
EMA weights (safetensors) + model.json, a sample plot, and the final test NLL.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastfm.build import build_source, model_config, resolve_device, run_meta
from fastfm.checkpoint import CHECKPOINT, load_training_state, save_inference, save_training_state
from fastfm.config import TrainConfig, parse_config
from fastfm.couplings import get_coupling
from fastfm.data import get_dataset
from fastfm.densities import Gaussian
from fastfm.evaluation import generate, sample_quality, save_samples_png, test_nll
from fastfm.guidance import drop_labels
from fastfm.losses import cfm_loss
from fastfm.models import build_model
from fastfm.paths import get_path
from fastfm.timesteps import TimeSampler


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


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


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter and buffer."""
    with torch.no_grad():
        e = list(ema.state_dict().values())
        m = list(model.state_dict().values())
        floats = [(a, b) for a, b in zip(e, m) if a.is_floating_point()]
        torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1.0 - decay)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training job; returns the final summary (also the last line of metrics.jsonl)."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = get_dataset(cfg.data, seed=cfg.seed)
    path = get_path(cfg.path, build_source(cfg.source, cfg.seed, data.shape), **cfg.path_args)
    model = build_model(model_config(cfg, data)).to(device)
    meta = run_meta(cfg, data, model)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    coupling, times = get_coupling(cfg.coupling), TimeSampler(cfg.time_sampler)
    # fused AdamW skips a step without a host sync when found_inf is 1 (the NaN/Inf guard below)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    gen = torch.Generator().manual_seed(cfg.seed)
    out = Path(cfg.out)
    state = load_training_state(out / CHECKPOINT) if cfg.resume and (out / CHECKPOINT).exists() else None
    start = 0 if state is None else restore(state, cfg, model, ema, opt, sched, gen, data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.__dict__, indent=2, sort_keys=True))
    metrics = out / "metrics.jsonl"
    if state is None:
        metrics.write_text("")

    # Independent coupling from a Gaussian source: the kernels draw x0 from a per-step seed.
    in_kernel_noise = cfg.coupling == "independent" and isinstance(path.source, Gaussian)

    def loss_fn(x0: torch.Tensor | None, x1: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                seed: int) -> torch.Tensor:
        cond = {} if y is None else {"y": y}
        if cfg.superres:
            cond["low_res"] = F.avg_pool2d(x1, cfg.superres)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            return cfm_loss(model, path, x0, x1, t, cfg.target, seed=seed, **cond).loss

    step_loss = torch.compile(loss_fn, fullgraph=True) if cfg.compile else loss_fn

    def save(step: int) -> None:
        save_training_state({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict(), "step": step, "config": dict(cfg.__dict__),
                             "meta": meta, "rng": gen.get_state(), "torch_rng": torch.get_rng_state(),
                             "data": data.state_dict()}, out / CHECKPOINT)
        save_inference(out, ema.state_dict(), meta)

    bad_run = torch.zeros((), dtype=torch.int64, device=device)
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    pbar = tqdm(range(start + 1, cfg.steps + 1), desc="train", dynamic_ncols=True, initial=start, total=cfg.steps)
    t_last, n_since = time.perf_counter(), 0
    for step in pbar:
        x1, y = data.sample(cfg.batch_size, gen)
        y = y if cfg.class_cond else None
        x0, seed = None, int(torch.randint(2**62, (), generator=gen))
        if not in_kernel_noise:
            x0, x1, y = coupling(path.source.sample(tuple(x1.shape), generator=gen), x1, y, generator=gen)
            x0 = x0.to(device)
        t = times(cfg.batch_size, gen)
        if y is not None:
            y = drop_labels(y, cfg.label_dropout, model.num_classes, gen).to(device)
        loss = step_loss(x0, x1.to(device), t.to(device), y, seed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        bad = ~(torch.isfinite(grad_norm) & torch.isfinite(loss.detach()))
        opt.found_inf = bad.float()
        opt.step()
        sched.step()
        _ema_update(ema, model, ema_decay(cfg, step))
        bad_run = (bad_run + bad) * bad
        skipped += bad
        n_since += cfg.batch_size
        log = step % cfg.log_every == 0 or step == cfg.steps
        if (log or device.type == "cpu") and int(bad_run) >= cfg.max_bad_steps:
            raise TrainingDiverged(f"{int(bad_run)} non-finite steps in a row (loss or gradient NaN/Inf) up to "
                                   f"step {step}; last checkpoint: {out / CHECKPOINT}")
        if log:
            now = time.perf_counter()
            rec = {"step": step, "loss": float(loss.detach()), "grad_norm": float(grad_norm),
                   "lr": sched.get_last_lr()[0], "samples_per_s": n_since / (now - t_last),
                   "sec_per_kimg": 1000 * (now - t_last) / n_since, "skipped_steps": int(skipped)}
            t_last, n_since = now, 0
            append_jsonl(metrics, rec)
            pbar.set_postfix(loss=f"{rec['loss']:.4f}", it_s=f"{rec['samples_per_s'] / cfg.batch_size:.1f}")
        if step % cfg.ckpt_every == 0 and step != cfg.steps:
            save(step)
    save(cfg.steps)
    summary = final_evaluation(cfg, ema, path, data, out)
    append_jsonl(metrics, {"final": summary})
    return summary


def restore(state: dict, cfg: TrainConfig, model: torch.nn.Module, ema: torch.nn.Module,
            opt: torch.optim.Optimizer, sched: Any, gen: torch.Generator, data: Any) -> int:
    """Load a checkpoint's full state for ``--resume``; returns the step it was taken at."""
    saved = {k: v for k, v in state["config"].items() if k not in RESUMABLE}
    now = {k: v for k, v in cfg.__dict__.items() if k not in RESUMABLE}
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        raise ValueError(f"--resume with options that differ from the checkpoint's: {diff}")
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    data.load_state_dict(state["data"])
    return int(state["step"])


RESUMABLE = {"resume", "steps", "log_every", "ckpt_every", "out", "device", "eval_n", "n_samples"}


def eval_conditioning(cfg: TrainConfig, data: Any, n: int) -> dict[str, torch.Tensor]:
    """Per-sample conditioning for evaluation: test labels and/or low-resolution test images."""
    cond: dict[str, torch.Tensor] = {}
    if cfg.class_cond:
        cond["y"] = data.test_labels[:n]
    if cfg.superres:
        cond["low_res"] = F.avg_pool2d(data.test[:n], cfg.superres)
    return cond


def final_evaluation(cfg: TrainConfig, ema: torch.nn.Module, path: Any, data: Any, out: Path) -> dict[str, Any]:
    """Test NLL of the EMA model, a sample plot and (vectors) sample quality against the test set."""
    test = data.test[: cfg.eval_n]
    nll = None
    if path.prior.has_log_prob:
        nll = test_nll(ema, path, test, target=cfg.target, levels=data.levels, method=cfg.eval_solver,
                       steps=cfg.eval_steps, seed=cfg.seed, cond=eval_conditioning(cfg, data, len(test)))
    n = min(cfg.n_samples, len(data.test)) if data.kind == "vector" else min(cfg.n_samples, 64, len(data.test))
    res = generate(ema, path, n, data.shape, target=cfg.target, method=cfg.eval_solver, steps=cfg.eval_steps,
                   seed=cfg.seed, cond=eval_conditioning(cfg, data, n))
    save_samples_png(res.x, out / "samples.png", data.kind, data.levels, data.test,
                     title=f"{cfg.data}, {cfg.path}, {cfg.eval_solver} x {cfg.eval_steps}")
    summary = {"test": nll, "samples_png": str(out / "samples.png"), "sample_nfe": res.nfe}
    if data.kind == "vector":
        summary["quality"] = sample_quality(res.x, data.test)
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv, TrainConfig, "Train a flow matching model.")
    try:
        summary = train(cfg)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    test = summary["test"]
    if test is None:
        print(f"test NLL: n/a (source {cfg.source!r} has no known density)")
    else:
        line = f"test NLL: {test['nll_nats']:.4f} nats (+- {test['nll_nats_stderr']:.4f}, NFE {test['nfe']})"
        print(line + (f", {test['bits_per_dim']:.4f} bits/dim" if "bits_per_dim" in test else ""))
    print(f"samples: {summary['samples_png']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
