"""Compile time of the training step: the whole step through ``torch.compile`` (fullgraph) against regional
compilation (``--regional-compile``: the repeated block compiled once), for a SiT on 32x32x4 latents with 1000
classes. Each mode runs in a fresh process with an empty inductor cache; compile time = the first step's time
minus a compiled step's. Writes benchmarks/results/compile_time-CLASS.json (RESULTS_DIR overrides the folder).

    python benchmarks/compile_time.py [--size S] [--batch 8] [--depth N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RUN = r"""
import json, sys, time
import torch
from fastfm.training.config import TrainConfig
from fastfm.training.distributed import DistEnv
from fastfm.training.trainer import Trainer
cfg = TrainConfig(**json.loads(sys.argv[1])).validate()
trainer = Trainer(cfg, DistEnv())
times = []
for step in range(1, 4):
    t0 = time.perf_counter()
    loss, _, _ = trainer.train_step(step)
    float(loss)
    times.append(time.perf_counter() - t0)
from fastfm import compat
print(json.dumps({"step_s": times, "graphs": compat.compiled_graph_count()}))
"""


def measure(options: dict, regional: bool) -> dict:
    """One fresh process: three compiled steps; the first compiles."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
               "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
        cfg = {**options, "regional_compile": regional}
        out = subprocess.run([sys.executable, "-c", RUN, json.dumps(cfg)], env=env, capture_output=True, text=True,
                             check=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    row["compile_s"] = row["step_s"][0] - min(row["step_s"][1:])
    return row


def main() -> None:
    from fastfm import hardware
    from fastfm.models import build_model, config_for_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="S")
    ap.add_argument("--depth", type=int, default=0, help="override the size's depth (0: the size's)")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    model_args = {"size": args.size, "patch": 2, **({"depth": args.depth} if args.depth else {})}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "latents.npz"
        gen = np.random.default_rng(0)
        np.savez(data, x=gen.standard_normal((64, 4, 32, 32)).astype(np.float32), y=gen.integers(0, 1000, 64))
        options = {"data": f"npz:{data}", "model": "sit", "model_args": model_args, "class_cond": True,
                   "batch_size": args.batch, "steps": 3, "device": "cpu", "compile": True, "out": f"{tmp}/run",
                   "data_args": {"test_fraction": 0.125}}
        rows = {mode: measure(options, mode == "regional") for mode in ("whole", "regional")}
    meta = config_for_data("sit", data="latents", kind="image", shape=(4, 32, 32), num_classes=1000, class_cond=True,
                           overrides=model_args)
    params = sum(p.numel() for p in build_model(meta).parameters())
    result = {"model": f"SiT-{args.size}/2" + (f" (depth {args.depth})" if args.depth else ""), "params": params,
              "batch": args.batch, "input": [4, 32, 32], "classes": 1000, **rows,
              "speedup": rows["whole"]["compile_s"] / rows["regional"]["compile_s"],
              "hardware": hardware.capabilities().to_json(), "measured": time.strftime("%Y-%m-%d")}
    folder = Path(os.environ.get("RESULTS_DIR", "benchmarks/results"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"compile_time-{result['hardware']['machine_class']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "hardware"}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
