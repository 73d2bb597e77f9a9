"""``python -m fastfm.train``: Conditional Flow Matching training, read top to bottom.

Each step: data x1 -> source x0 -> coupling -> t -> (x_t, target) -> model -> CFM loss ->
AdamW with warm-up and clipping -> EMA. Writes metrics.jsonl, checkpoints (atomic),
EMA weights (safetensors) + model.json, a sample plot, and the final test NLL.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastfm.build import build_source, model_config, resolve_device, run_meta
from fastfm.checkpoint import CHECKPOINT, save_inference, save_training_state
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
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    gen = torch.Generator().manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.__dict__, indent=2, sort_keys=True))
    metrics = out / "metrics.jsonl"
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
                             "meta": meta, "rng": gen.get_state(), "data": data.state_dict()}, out / CHECKPOINT)
        save_inference(out, ema.state_dict(), meta)

    pbar = tqdm(range(1, cfg.steps + 1), desc="train", dynamic_ncols=True)
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
        opt.step()
        sched.step()
        _ema_update(ema, model, min(cfg.ema, (1 + step) / (10 + step)))
        n_since += cfg.batch_size
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            rec = {"step": step, "loss": float(loss.detach()), "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0],
                   "samples_per_s": n_since / (now - t_last)}
            t_last, n_since = now, 0
            append_jsonl(metrics, rec)
            pbar.set_postfix(loss=f"{rec['loss']:.4f}", it_s=f"{rec['samples_per_s'] / cfg.batch_size:.1f}")
        if step % cfg.ckpt_every == 0 and step != cfg.steps:
            save(step)
    save(cfg.steps)
    summary = final_evaluation(cfg, ema, path, data, out)
    append_jsonl(metrics, {"final": summary})
    return summary


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
