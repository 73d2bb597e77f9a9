"""GPU training throughput of a CIFAR-10-size UNet, fastfm against the flow_matching loop, and of SiT-B/2 and
SiT-XL/2 against diffusers' DiT (``--model sit``; run on a CUDA machine):

    python benchmarks/gpu/bench_train.py OUT.json [--budget SECONDS]
    python benchmarks/gpu/bench_train.py OUT.json --model sit --modes compile-bf16 [--budget SECONDS]

fastfm modes (``--modes``): eager fp32 (TF32 off), --compile, --compile --bf16, and the last mode under DDP
on one GPU (torchrun with one rank: the all-reduce hooks and bucketing, no peer).

Peers in the same run (``--peers``; default: the peer of each fastfm mode asked for), on the *same* model
object built by fastfm's Trainer (same UNet, weights, memory format, data and batch), so only the loop
differs: flow_matching's example loop (AffineProbPath + CondOTScheduler, x0 = randn, t = rand, loss
(model(x_t, t) - dx_t)^2 mean, AdamW) as

    fm-eager         eager fp32                                     (compared with fastfm ``eager``)
    fm-compile-bf16  torch.compile(model), bf16 autocast, fused AdamW (compared with ``compile-bf16``)

(no EMA, no gradient clipping: what a user writes in five lines; fastfm's step does both).
``large_batch``: the compiled bf16 fastfm mode (or the last mode) at batch 512, for MFU.

For each row: img/s, ms/step, achieved TFLOP/s (FLOPs counted once by torch.utils.flop_counter on forward +
backward), MFU against the device's dense peak for the precision, peak memory, dynamo's graphs, graph
breaks and recompile-limit hits (a compiled row that compiled no graph is marked ``compiled_ok`` false;
the timed steps run with ``error_on_recompile``). ``goals``: fastfm compile-bf16 / fm-compile-bf16 >= 1.3
and MFU >= 30 % at batch 512, as booleans (None when not measured). Data: random CIFAR-shaped images
from a generated .npy, so no download. If flow_matching is not installed its rows say so and it is
listed in ``missing``.

Rows run most important first (compile-bf16, its peer, batch 512, eager, its peer, compile, DDP); the JSON
is rewritten after every row; ``--budget`` records rows it has no time left for as skipped.
``--device cpu --quick`` runs the same code on the CPU with a tiny UNet, a small batch and a few steps
(gloo for the one-rank DDP mode); the test suite runs it that way; ``--dry`` is that, marked ``dry`` in the
JSON (check.sh's dry run). A mode or peer the device cannot run (the bf16 ones below compute capability 8.0
or on a CPU without native bf16) is recorded as skipped with the reason (``common.unsupported``); the batch 512
row and DDP then run the last mode it can.

``--model sit``: per size of ``--sit-sizes`` (default B, XL; patch 2, 32x32x4 random latents, 1000 classes, batch
256) and mode, fastfm's Trainer (``--model sit --class-cond``) and the diffusers peer of benchmarks/sit_cases.py
(DiTTransformer2DModel of the same size, the plain CondOT loop, fused AdamW, bf16 autocast), then per size fastfm
under FSDP on one GPU (torchrun with one rank, ``--fsdp``; the last mode the device runs). Compiled rows compile
the repeated block (fastfm ``--regional-compile``, each diffusers block with fullgraph), so compile time does not
grow with depth. Each row: img/s, MFU (FLOPs of each model counted by torch.utils.flop_counter), peak memory and
parameters (the peer's also counted with one conditioning embedder, as SiT counts them). ``goals``: at XL,
compile-bf16 fastfm / diffusers >= 1.3 and MFU >= 40 %. Rows run in the order B fastfm, B diffusers, XL fastfm,
XL diffusers, the FSDP rows; ``--quick`` makes every size a 2-block SiT of width 32 on 8x8x4 latents.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for sit_cases
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/gpu/, for common

from common import (Budget, DynamoWatch, Results, TimeLimitExceeded, add_common_args, environment, log,  # noqa: E402
                    missing, package_version, parse_args, strict_dynamo, time_limit, unsupported)
from sit_cases import CLASSES, SHAPE, dit_like, latents, params, params_counted_once, plain_step  # noqa: E402

from fastfm.data import get_dataset  # noqa: E402
from fastfm.hardware import Capabilities, capabilities  # noqa: E402
from fastfm.training.assemble import model_for  # noqa: E402
from fastfm.training.config import TrainConfig  # noqa: E402
from fastfm.training.distributed import env_from_torchrun  # noqa: E402
from fastfm.training.telemetry import flops_per_sample, peak_flops, peak_memory_mb  # noqa: E402
from fastfm.training.trainer import Trainer  # noqa: E402

MODES = ("eager", "compile", "compile-bf16")
PEERS = {"fm-eager": "eager", "fm-compile-bf16": "compile-bf16"}  # peer -> the fastfm mode it is compared with
PRIORITY = ("compile-bf16", "eager", "compile")
GOAL_VS_PEER, GOAL_MFU = 1.3, 0.30
FULL = {"batch": 128, "large_batch": 512, "warmup": 5, "steps": 30, "min_steps": 10, "max_timed_s": 4.0,
        "model": "unet", "model_args": {"model_channels": 128, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2,
                                        "attention_resolutions": [16], "dropout": 0.1}}
QUICK = {"batch": 4, "large_batch": 8, "warmup": 2, "steps": 2, "min_steps": 2, "max_timed_s": 4.0,
         "model": "unet", "model_args": {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                                         "attention_resolutions": [16]}}
# --model sit: the SiT sizes' common settings (``model_args`` per size from ``sit_size``); 3 warm-up steps: the
# compile, and a recompile where one follows
SIT_FULL = {"batch": 256, "warmup": 3, "steps": 20, "min_steps": 5, "max_timed_s": 4.0, "model": "sit",
            "class_cond": True, "regional": True, "image": list(SHAPE), "classes": CLASSES, "latents": 2048,
            "model_args": {"patch": 2}}
SIT_QUICK = {**SIT_FULL, "batch": 4, "warmup": 2, "steps": 2, "min_steps": 2, "image": [4, 8, 8], "classes": 10,
             "latents": 64, "model_args": {"patch": 2, "depth": 2, "hidden_size": 32, "num_heads": 2}}
SIT_SIZES = ("B", "XL")
SIT_GOAL_SIZE, SIT_GOAL_VS_PEER, SIT_GOAL_MFU = "XL", 1.3, 0.40


def _data(root: Path) -> str:
    path = root / "cifar_shaped.npy"
    if not path.exists():
        rng = np.random.default_rng(0)
        np.save(path, rng.integers(0, 256, size=(2048, 3, 32, 32), dtype=np.uint8))
    return f"npy:{path}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sit_size(base: dict, name: str) -> dict:
    """``base`` (SIT_FULL or SIT_QUICK) for the SiT of size ``name`` (S, B, L, XL), labelled sit-NAME/2."""
    return {**base, "label": f"sit-{name}/{base['model_args']['patch']}",
            "model_args": {"size": name, **base["model_args"]}}


def _config(mode: str, data: str, out: str, device: str, size: dict, batch: int, fsdp: bool = False) -> TrainConfig:
    """The training config of a row (TF32 off, so the fp32 rows are fp32)."""
    compiled = mode != "eager"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return TrainConfig(data=data, batch_size=batch, steps=10**6, model=size["model"], model_args=size["model_args"],
                       class_cond=size.get("class_cond", False), device=device, out=out, compile=compiled,
                       bf16="bf16" in mode, regional_compile=compiled and size.get("regional", False),
                       fsdp=fsdp).validate()


def _trainer(mode: str, data: str, out: str, device: str, size: dict, batch: int, fsdp: bool = False) -> Trainer:
    return Trainer(_config(mode, data, out, device, size, batch, fsdp), env_from_torchrun())


def _timed_steps(step: Callable[[int], Any], dev: torch.device, size: dict, compiled: bool) -> dict[str, Any]:
    """``size['warmup']`` steps (compilation), then between ``min_steps`` and ``steps`` timed steps (stopping once
    ``max_timed_s`` passed); a recompile during the timed steps raises."""
    t0 = time.perf_counter()
    for i in range(size["warmup"]):
        step(i + 1)
    _sync(dev)
    warmup_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    guard = strict_dynamo(error_on_recompile=True) if compiled else contextlib.nullcontext()
    n, loss = 0, None
    with guard:
        t0 = time.perf_counter()
        while n < size["steps"] and (n < size["min_steps"] or time.perf_counter() - t0 < size["max_timed_s"]):
            loss = step(size["warmup"] + n + 1)
            n += 1
        _sync(dev)
    return {"dt": (time.perf_counter() - t0) / n, "timed_steps": n, "warmup_s": warmup_s, "loss": float(loss)}


def _row(loop: str, mode: str, batch: int, timing: dict, flops: float, dev: torch.device, bf16: bool,
         params: int, watch: DynamoWatch | None) -> dict[str, Any]:
    peak = peak_flops(dev, bf16)
    rate = batch / timing["dt"]
    row = {"loop": loop, "mode": mode, "batch": batch, "img_per_s": rate, "ms_per_step": 1e3 * timing["dt"],
           "timed_steps": timing["timed_steps"], "warmup_s": timing["warmup_s"], "tflops": flops * rate / 1e12,
           "mfu": flops * rate / peak if peak else None, "peak_mem_mb": peak_memory_mb(dev),
           "flops_per_img": flops, "loss": timing["loss"], "params": params}
    if watch is not None:
        row["dynamo"] = watch.delta()
        row["compiled_ok"] = row["dynamo"]["graphs"] > 0 and row["dynamo"]["recompile_limit_hits"] == 0
    return row


def run(mode: str, data: str, out: str, device: str, size: dict, batch: int | None = None,
        fsdp: bool = False) -> dict:
    """fastfm's Trainer: timed optimizer steps after warm-up (compilation), in this process."""
    torch.compiler.reset()
    batch = batch or size["batch"]
    watch = DynamoWatch() if mode != "eager" else None
    trainer = _trainer(mode, data, out, device, size, batch, fsdp)
    dev, flops = trainer.device, trainer._flops_per_sample()
    timing = _timed_steps(lambda i: trainer.train_step(i)[0], dev, size, mode != "eager")
    return _row("fastfm", mode, batch, timing, flops, dev, trainer.cfg.bf16,
                sum(p.numel() for p in trainer.model.parameters()), watch)


def run_peer(peer: str, data: str, out: str, device: str, size: dict, batch: int | None = None) -> dict:
    """flow_matching's example loop around the model fastfm's Trainer builds (the same UNet, data, batch)."""
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler

    torch.compiler.reset()
    batch = batch or size["batch"]
    compiled, bf16 = "compile" in peer, "bf16" in peer
    trainer = _trainer("eager", data, out, device, size, batch)  # only its model, data and config are used
    dev, model, cfg = trainer.device, trainer.model, trainer.cfg
    flops = trainer._flops_per_sample()
    trainer.opt = trainer.ema = None
    watch = DynamoWatch() if compiled else None
    net = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=dev.type == "cuda")
    path = AffineProbPath(scheduler=CondOTScheduler())
    gen = torch.Generator().manual_seed(cfg.seed)
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step(i: int) -> torch.Tensor:
        x_1 = trainer.data.sample(batch, gen)[0].to(dev, non_blocking=True)
        x_0 = torch.randn_like(x_1)
        t = torch.rand(x_1.shape[0], device=dev)
        sample = path.sample(t=t, x_0=x_0, x_1=x_1)
        with autocast():
            loss = torch.pow(net(sample.x_t, sample.t) - sample.dx_t, 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    timing = _timed_steps(step, dev, size, compiled)
    return _row("flow_matching", peer, batch, timing, flops, dev, bf16, sum(p.numel() for p in model.parameters()),
                watch)


def run_diffusers(mode: str, data: str, out: str, device: str, size: dict) -> dict:
    """diffusers' DiT of the SiT's size in the plain CondOT loop (sit_cases), on fastfm's data stream and batch."""
    torch.compiler.reset()
    cfg = _config(mode, data, out, device, size, size["batch"])
    compiled, dev = mode != "eager", torch.device(device)
    data_set = get_dataset(cfg.data, seed=cfg.seed)
    with torch.device("meta"):
        config = model_for(cfg, data_set).config
        flops = flops_per_sample(dit_like(config), lambda n: ((torch.empty(n, *data_set.shape), torch.empty(n),
                                                               torch.zeros(n, dtype=torch.long)), {}))
    torch.manual_seed(cfg.seed)
    with dev:
        model = dit_like(config)
    watch = DynamoWatch() if compiled else None
    if compiled:
        model.compile_blocks()
    step = plain_step(model, model, data_set, cfg, dev)
    timing = _timed_steps(lambda i: step(), dev, size, compiled)
    return {**_row("diffusers", mode, size["batch"], timing, flops, dev, cfg.bf16, params(model), watch),
            "params_counted_once": params_counted_once(model)}


def _torchrun(kind: str, mode: str, data: str, out: str, device: str, size: dict, timeout: float | None) -> dict:
    """fastfm's row under torchrun with one rank: ``kind`` ddp (DDP's hooks and bucketing) or fsdp (``--fsdp``)."""
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                               __file__, "--worker", mode, data, out, device, json.dumps(size), kind],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"mode": f"{kind}-1rank-{mode}", "error": f"timed out after {timeout:.0f} s (the time budget)"}
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    row = json.loads(line[-1][7:]) if line else {"error": proc.stderr[-2000:]}
    row["mode"] = f"{kind}-1rank-{mode}"
    return row


def _goals(results: list[dict], peers: list[dict], large: list[dict]) -> dict[str, Any]:
    def rate(rows: list[dict], mode: str) -> float | None:
        return next((r["img_per_s"] for r in rows if r.get("mode") == mode and "img_per_s" in r), None)

    ours, theirs = rate(results, "compile-bf16"), rate(peers, "fm-compile-bf16")
    ratio = ours / theirs if ours and theirs else None
    mfu = next((r.get("mfu") for r in large if r.get("mode") == "compile-bf16" and "img_per_s" in r), None)
    return {"compile_bf16_vs_fm_compile_bf16": {"ratio": ratio, "goal": GOAL_VS_PEER,
                                                "met": None if ratio is None else ratio >= GOAL_VS_PEER},
            "mfu_compile_bf16_large_batch": {"mfu": mfu, "batch": large[0]["batch"] if large else None,
                                             "goal": GOAL_MFU, "met": None if mfu is None else mfu >= GOAL_MFU}}


def sit_goals(rows: list[dict], model: str) -> dict[str, Any]:
    """The SiT goals at ``model`` (the sit-XL/2 label): compile-bf16 fastfm / diffusers >= SIT_GOAL_VS_PEER and
    fastfm's MFU >= SIT_GOAL_MFU (None where a row is missing)."""
    def row(loop: str) -> dict | None:
        return next((r for r in rows if (r.get("model"), r.get("loop"), r.get("mode")) == (model, loop, "compile-bf16")
                     and "img_per_s" in r), None)

    ours, theirs = row("fastfm"), row("diffusers")
    ratio = ours["img_per_s"] / theirs["img_per_s"] if ours and theirs else None
    mfu = ours["mfu"] if ours else None
    return {"compile_bf16_vs_diffusers": {"model": model, "ratio": ratio, "goal": SIT_GOAL_VS_PEER,
                                          "met": None if ratio is None else ratio >= SIT_GOAL_VS_PEER},
            "mfu_compile_bf16": {"model": model, "mfu": mfu, "goal": SIT_GOAL_MFU,
                                 "met": None if mfu is None else mfu >= SIT_GOAL_MFU}}


Plan = list[tuple[str, dict, Callable[[], dict]]]  # (result list, row label, job), most important first


def _execute(res: Results, plan: Plan, caps: Capabilities, budget: Budget, absent: list[str]) -> None:
    """Run the plan's jobs in order into ``res``: a row whose peer is not installed, that the device cannot run or
    that the budget has no time left for is recorded as such; one failing row does not lose the others."""
    for key, label, job in plan:
        reason = unsupported(caps, label["mode"])
        if label["loop"] in absent:
            row = {**label, "missing": f"{label['loop']} is not installed"}
        elif reason is not None:
            row = {**label, "skipped": reason}
        elif not budget.allows():
            row = budget.skipped(dict(label))
        else:
            left = budget.left()
            try:
                with time_limit(None if left == float("inf") else left):
                    row = {**label, **job()}
            except TimeLimitExceeded:
                row = {**label, "error": f"stopped: the time budget of {budget.seconds:g} s ran out during this row"}
            except Exception as e:  # one failing mode must not lose the other rows
                row = {**label, "error": f"{type(e).__name__}: {e}"[:2000]}
            torch.compiler.reset()
            gc.collect()  # the row's model, optimizer and EMA, before the next row's
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        res.append(key, row)
        log(row)


def _one_rank(kind: str, mode: str, data: str, out: str, device: str, size: dict, caps: Capabilities,
              budget: Budget, label: dict) -> dict:
    """The row of fastfm under torchrun with one rank (``_torchrun``), or why it did not run."""
    reason = unsupported(caps, mode)
    if reason is not None:
        return {**label, "skipped": reason}
    if not budget.allows():
        return budget.skipped(label)
    timeout = None if budget.seconds is None else budget.left()
    return {**label, **_torchrun(kind, mode, data, out, device, size, timeout)}


def main_sit(args: argparse.Namespace, modes: list[str], caps: Capabilities, tmp: str) -> dict:
    """--model sit: per size and mode fastfm and its diffusers peer, then per size fastfm under one-rank FSDP."""
    base = SIT_QUICK if args.quick else SIT_FULL
    sizes = [sit_size(base, name) for name in args.sit_sizes.split(",")]
    runnable = [m for m in modes if unsupported(caps, m) is None] or modes
    peers = args.peers != "none"  # diffusers' DiT (auto or diffusers)
    absent = missing(("diffusers",)) if peers else []
    budget = Budget(args.budget)
    data = latents(Path(tmp), base["latents"], tuple(base["image"]), base["classes"])
    res = Results(args.out, **environment(caps, args.dry), diffusers=package_version("diffusers"), model="sit",
                  sizes={s["label"]: s["model_args"] for s in sizes}, batch=base["batch"], image=base["image"],
                  classes=base["classes"], modes=modes, peers=["diffusers"] if peers else [], missing=absent,
                  compile="regional: fastfm --regional-compile, each diffusers block compiled with fullgraph",
                  peer_loop="diffusers DiTTransformer2DModel (ada_norm_zero) of the same size; x0 = randn, t = rand, "
                            "CondOT x_t and target, loss mean((v(x_t, t, y) - (x1 - x0))^2), fused AdamW, bf16 "
                            "autocast in the bf16 modes; no EMA, no grad clipping", results=[])
    plan: Plan = []
    for size in sizes:
        for mode in sorted(modes, key=PRIORITY.index):
            label = {"model": size["label"], "mode": mode, "batch": size["batch"]}
            plan.append(("results", {**label, "loop": "fastfm"},
                         lambda m=mode, z=size: run(m, data, tmp, args.device, z)))
            if peers:
                plan.append(("results", {**label, "loop": "diffusers"},
                             lambda m=mode, z=size: run_diffusers(m, data, tmp, args.device, z)))
    _execute(res, plan, caps, budget, absent)
    if not args.no_ddp:
        for size in sizes:
            label = {"model": size["label"], "loop": "fastfm", "mode": f"fsdp-1rank-{runnable[-1]}",
                     "batch": size["batch"]}
            row = _one_rank("fsdp", runnable[-1], data, tmp, args.device, size, caps, budget, label)
            res.append("results", row)
            log(row)
    rows = res["results"]
    for r in rows:
        peer = next((x for x in rows if x["loop"] == "diffusers" and (x["model"], x["mode"]) == (r["model"], r["mode"])
                     and "img_per_s" in x), None)
        if r["loop"] == "fastfm" and peer and "img_per_s" in r:
            r["speedup_vs_diffusers"] = r["img_per_s"] / peer["img_per_s"]
    res.data.update(goals=sit_goals(rows, sit_size(base, SIT_GOAL_SIZE)["label"]), **budget.record())
    return res.finish()


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":  # one torchrun rank: print its result as JSON
        mode, data, out, device, size, kind = argv[1:7]
        res = run(mode, data, out, device, json.loads(size), fsdp=kind == "fsdp")
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(res))
        return res
    p = argparse.ArgumentParser(description="GPU training throughput of a CIFAR-10-size UNet, or of SiTs")
    p.add_argument("out", nargs="?", default="gpu_train.json")
    p.add_argument("--model", default="unet", choices=("unet", "sit"),
                   help="unet: the UNet rows; sit: the SiT rows beside diffusers' DiT (--sit-sizes)")
    p.add_argument("--sit-sizes", default=",".join(SIT_SIZES), help="--model sit: comma-separated SiT sizes")
    p.add_argument("--quick", action="store_true", help="tiny models, batch 4, 2 steps (checks the script)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated subset of {MODES}; DDP runs the last one the device can run")
    p.add_argument("--peers", default="auto",
                   help=f"comma-separated subset of {tuple(PEERS)}, 'none', or 'auto' (the peers of --modes; "
                        "with --model sit: diffusers' DiT unless 'none')")
    p.add_argument("--large-batch", type=int, default=None,
                   help="batch of the MFU row (default 512; --quick 8); 0 leaves it out")
    p.add_argument("--no-ddp", action="store_true", help="leave out the one-rank DDP row (FSDP with --model sit)")
    add_common_args(p)
    args = parse_args(p, argv)
    modes = args.modes.split(",")
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes must be a comma-separated subset of {MODES}, got {args.modes!r}")
    bad_sizes = [x for x in args.sit_sizes.split(",") if x not in ("S", "B", "L", "XL")]
    if bad_sizes:
        p.error(f"--sit-sizes must be a comma-separated subset of S, B, L, XL, got {args.sit_sizes!r}")
    caps = capabilities(args.device)
    if args.model == "sit":
        if args.peers not in ("auto", "diffusers", "none"):
            p.error(f"--model sit: --peers is diffusers (or auto), or none; got {args.peers!r}")
        with tempfile.TemporaryDirectory() as tmp:
            return main_sit(args, modes, caps, tmp)
    if args.peers == "auto":
        peers = [peer for peer, mode in PEERS.items() if mode in modes]
    else:
        peers = [] if args.peers in ("", "none") else args.peers.split(",")
        if any(x not in PEERS for x in peers):
            p.error(f"--peers must be a comma-separated subset of {tuple(PEERS)}, 'none' or 'auto'")
    size = QUICK if args.quick else FULL
    large_batch = size["large_batch"] if args.large_batch is None else args.large_batch
    runnable = [m for m in modes if unsupported(caps, m) is None] or modes
    large_mode = "compile-bf16" if "compile-bf16" in runnable else runnable[-1]
    absent = missing(("flow_matching",))
    budget = Budget(args.budget)
    res = Results(args.out, **environment(caps, args.dry), batch=size["batch"], unet=size["model_args"], modes=modes,
                  peers=peers, missing=absent, results=[], peer_results=[], large_batch=[],
                  peer_loop="flow_matching AffineProbPath(CondOTScheduler()), loss mean((model(x_t, t) - dx_t)^2), "
                            "AdamW (fused on CUDA); no EMA, no grad clipping; same model object as fastfm")

    plan: Plan = []
    with tempfile.TemporaryDirectory() as tmp:
        data = _data(Path(tmp))
        for mode in sorted(modes, key=PRIORITY.index):
            plan.append(("results", {"loop": "fastfm", "mode": mode, "batch": size["batch"]},
                         lambda m=mode: run(m, data, tmp, args.device, size)))
            for peer in (x for x in peers if PEERS[x] == mode):
                plan.append(("peer_results", {"loop": "flow_matching", "mode": peer, "batch": size["batch"]},
                             lambda x=peer: run_peer(x, data, tmp, args.device, size)))
            if mode == large_mode and large_batch:
                plan.append(("large_batch", {"loop": "fastfm", "mode": mode, "batch": large_batch},
                             lambda m=mode: run(m, data, tmp, args.device, size, large_batch)))
        for peer in (x for x in peers if PEERS[x] not in modes):
            plan.append(("peer_results", {"loop": "flow_matching", "mode": peer, "batch": size["batch"]},
                         lambda x=peer: run_peer(x, data, tmp, args.device, size)))
        _execute(res, plan, caps, budget, absent)
        if not args.no_ddp:
            row = _one_rank("ddp", runnable[-1], data, tmp, args.device, size, caps, budget,
                            {"mode": f"ddp-1rank-{runnable[-1]}"})
            res.append("results", row)
            log(row)

    results = sorted(res["results"], key=lambda r: (r["mode"].startswith("ddp"),
                                                    modes.index(r["mode"]) if r["mode"] in modes else 0))
    for r in results:  # fastfm against eager fastfm and against its flow_matching peer
        eager = next((x["img_per_s"] for x in results if x["mode"] == "eager" and "img_per_s" in x), None)
        if eager and "img_per_s" in r:
            r["speedup_vs_eager"] = r["img_per_s"] / eager
        peer = next((x for x in res["peer_results"] if PEERS[x["mode"]] == r["mode"] and "img_per_s" in x), None)
        if peer and "img_per_s" in r:
            r["speedup_vs_flow_matching"] = r["img_per_s"] / peer["img_per_s"]
    res.data.update(results=results, goals=_goals(results, res["peer_results"], res["large_batch"]),
                    **budget.record())
    return res.finish()


if __name__ == "__main__":
    main()
