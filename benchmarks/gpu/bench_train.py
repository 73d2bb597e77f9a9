"""GPU training throughput of a CIFAR-10-size UNet (run on a CUDA machine):

    python benchmarks/gpu/bench_train.py OUT.json

Modes: eager fp32 (TF32 off), --compile, --compile --bf16, and --compile --bf16 under DDP on one
GPU (torchrun with one rank: the all-reduce hooks and bucketing, no peer). For each: img/s,
achieved TFLOP/s (FLOPs counted once by torch.utils.flop_counter on forward + backward), MFU
against the device's dense peak for that precision, and peak memory. Data: random CIFAR-shaped
images from a generated .npy, so no download.
"""

from __future__ import annotations

import json
import os
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

BATCH, WARMUP, STEPS = 128, 5, 30
UNET = {"model_channels": 128, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attention_resolutions": [16],
        "dropout": 0.1}


def _data(root: Path) -> str:
    path = root / "cifar_shaped.npy"
    if not path.exists():
        rng = np.random.default_rng(0)
        np.save(path, rng.integers(0, 256, size=(2048, 3, 32, 32), dtype=np.uint8))
    return f"npy:{path}"


def run(mode: str, data: str, out: str) -> dict:
    """Time STEPS optimizer steps after WARMUP (compilation) in this process."""
    cfg = TrainConfig(data=data, batch_size=BATCH, steps=10**6, model="unet", model_args=UNET, device="cuda",
                      out=out, compile=mode != "eager", bf16="bf16" in mode).validate()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    trainer = Trainer(cfg, env_from_torchrun())
    flops = trainer._flops_per_sample()
    for i in range(WARMUP):
        trainer.train_step(i + 1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(STEPS):
        loss, _, _ = trainer.train_step(WARMUP + i + 1)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / STEPS
    peak = peak_flops(trainer.device, cfg.bf16)
    rate = BATCH / dt
    return {"mode": mode, "img_per_s": rate, "ms_per_step": 1e3 * dt, "tflops": flops * rate / 1e12,
            "mfu": flops * rate / peak if peak else None, "peak_mem_mb": peak_memory_mb(trainer.device),
            "flops_per_img": flops, "loss": float(loss), "params": sum(p.numel() for p in trainer.model.parameters())}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":  # one torchrun rank: print its result as JSON
        mode, data, out = sys.argv[2:5]
        res = run(mode, data, out)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(res))
        return
    dst = sys.argv[1] if len(sys.argv) > 1 else "gpu_train.json"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = _data(Path(tmp))
        for mode in ("eager", "compile", "compile-bf16"):
            results.append(run(mode, data, tmp))
            torch._dynamo.reset()
            print(json.dumps(results[-1]), flush=True)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                               __file__, "--worker", "compile-bf16", data, tmp], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        ddp = json.loads(line[-1][7:]) if line else {"error": proc.stderr[-2000:]}
        ddp["mode"] = "ddp-1gpu-compile-bf16"
        results.append(ddp)
        print(json.dumps(ddp), flush=True)
    base = results[0]["img_per_s"]
    for r in results:
        if "img_per_s" in r:
            r["speedup_vs_eager"] = r["img_per_s"] / base
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "batch": BATCH, "unet": UNET, "results": results}
    Path(dst).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
