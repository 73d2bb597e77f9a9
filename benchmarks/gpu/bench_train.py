"""GPU training throughput of a CIFAR-10-size UNet (run on a CUDA machine):

    python benchmarks/gpu/bench_train.py OUT.json

Modes: eager fp32 (TF32 off), --compile, --compile --bf16, and --compile --bf16 under DDP on one
GPU (torchrun with one rank: the all-reduce hooks and bucketing, no peer). For each: img/s,
achieved TFLOP/s (FLOPs counted once by torch.utils.flop_counter on forward + backward), MFU
against the device's dense peak for that precision, and peak memory. Data: random CIFAR-shaped
images from a generated .npy, so no download.

``--device cpu --quick`` runs the same code on the CPU with a tiny UNet, a small batch and a few
steps (gloo for the one-rank DDP mode); the test suite runs it that way, with ``--modes eager``.
The one-rank DDP run uses the last of ``--modes``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastfm.config import TrainConfig
from fastfm.distributed import env_from_torchrun
from fastfm.telemetry import peak_flops, peak_memory_mb
from fastfm.train import Trainer

MODES = ("eager", "compile", "compile-bf16")
FULL = {"batch": 128, "warmup": 5, "steps": 30,
        "unet": {"model_channels": 128, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2,
                 "attention_resolutions": [16], "dropout": 0.1}}
QUICK = {"batch": 4, "warmup": 2, "steps": 2,
         "unet": {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [16]}}


def _data(root: Path) -> str:
    path = root / "cifar_shaped.npy"
    if not path.exists():
        rng = np.random.default_rng(0)
        np.save(path, rng.integers(0, 256, size=(2048, 3, 32, 32), dtype=np.uint8))
    return f"npy:{path}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(mode: str, data: str, out: str, device: str, size: dict) -> dict:
    """Time ``size['steps']`` optimizer steps after ``size['warmup']`` (compilation) in this process."""
    cfg = TrainConfig(data=data, batch_size=size["batch"], steps=10**6, model="unet", model_args=size["unet"],
                      device=device, out=out, compile=mode != "eager", bf16="bf16" in mode).validate()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    trainer = Trainer(cfg, env_from_torchrun())
    dev, flops = trainer.device, trainer._flops_per_sample()
    for i in range(size["warmup"]):
        trainer.train_step(i + 1)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for i in range(size["steps"]):
        loss, _, _ = trainer.train_step(size["warmup"] + i + 1)
    _sync(dev)
    dt = (time.perf_counter() - t0) / size["steps"]
    peak = peak_flops(dev, cfg.bf16)
    rate = size["batch"] / dt
    return {"mode": mode, "img_per_s": rate, "ms_per_step": 1e3 * dt, "tflops": flops * rate / 1e12,
            "mfu": flops * rate / peak if peak else None, "peak_mem_mb": peak_memory_mb(dev),
            "flops_per_img": flops, "loss": float(loss), "params": sum(p.numel() for p in trainer.model.parameters())}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":  # one torchrun rank: print its result as JSON
        mode, data, out, device, quick = argv[1:6]
        res = run(mode, data, out, device, QUICK if quick == "quick" else FULL)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(res))
        return res
    p = argparse.ArgumentParser(description="GPU training throughput of a CIFAR-10-size UNet")
    p.add_argument("out", nargs="?", default="gpu_train.json")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="tiny UNet, batch 4, 2 steps (checks the script)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}; DDP runs the last")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes must be a comma-separated subset of {MODES}, got {args.modes!r}")
    size = QUICK if args.quick else FULL
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = _data(Path(tmp))
        for mode in modes:
            results.append(run(mode, data, tmp, args.device, size))
            torch._dynamo.reset()
            print(json.dumps(results[-1]), flush=True)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                               __file__, "--worker", modes[-1], data, tmp, args.device,
                               "quick" if args.quick else "full"], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        ddp = json.loads(line[-1][7:]) if line else {"error": proc.stderr[-2000:]}
        ddp["mode"] = f"ddp-1rank-{modes[-1]}"
        results.append(ddp)
        print(json.dumps(ddp), flush=True)
    eager = next((r["img_per_s"] for r in results if r["mode"] == "eager"), None)
    for r in results:
        if eager and "img_per_s" in r:
            r["speedup_vs_eager"] = r["img_per_s"] / eager
    cuda = args.device == "cuda"
    out = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
           "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None, "batch": size["batch"],
           "unet": size["unet"], "results": results}
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
