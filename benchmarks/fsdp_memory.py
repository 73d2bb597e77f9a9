"""Per-rank memory of FSDP2 sharding (``--fsdp``): bytes of parameters, gradients and AdamW state (both moments
and the step counters) each rank holds after one optimizer step of SiT-B/2 at 32x32x4 with 1000 classes, on N
gloo ranks on the CPU, against one process holding them whole. The goal (issue 28): every rank within 10% of
1/N of one process's bytes, i.e. |N b_r / b_1 - 1| <= 0.1.

    python benchmarks/fsdp_memory.py                  # N = 2 and 4: benchmarks/results/fsdp_memory-CLASS.json
    python benchmarks/fsdp_memory.py --ranks 2 --size S

Each rank builds the whole model (the same initial weights everywhere), shards it the way the trainer does
(``fastfm.training.sharding.shard``) and takes one step on one random row, so Adam's state exists; the bytes are
``sharding.state_bytes`` of this rank's shards.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp
from pytest_benchmark.plugin import pytest_benchmark_generate_machine_info
from tqdm import tqdm

from conftest import pytest_benchmark_update_machine_info
from fastfm import hardware, seeding
from fastfm.models.sit import SiT
from fastfm.run.checkpoint import save_json
from fastfm.training import sharding
from summarize import machine, versions

GOAL = 0.1
IN_CHANNELS, IMAGE_SIZE, NUM_CLASSES = 4, 32, 1000
RESULTS = Path(__file__).resolve().parent / "results"


def state_after_one_step(size: str, patch: int, shard: bool, rank: int) -> dict[str, int]:
    """Bytes of parameters, gradients and AdamW state this process holds after one step on one random row (its
    shards with ``shard``: FSDP2 over the default process group)."""
    torch.manual_seed(seeding.derive(0, seeding.INIT))  # the same initial weights on every rank
    model = SiT(IN_CHANNELS, image_size=IMAGE_SIZE, patch=patch, size=size, num_classes=NUM_CLASSES)
    if shard:
        sharding.shard(model, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(1, IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    t, y = torch.rand(1, generator=gen), torch.randint(NUM_CLASSES, (1,), generator=gen)
    model(x, t, y).square().mean().backward()
    opt.step()
    params = list(model.parameters())
    adam = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    held = {"params": sharding.state_bytes(params), "grads": sharding.state_bytes([p.grad for p in params]),
            "adam": sharding.state_bytes(adam)}
    return {**held, "total": sum(held.values())}


def _rank(rank: int, world: int, port: int, size: str, patch: int, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        held = state_after_one_step(size, patch, True, rank)
        Path(results, f"rank{rank}.json").write_text(json.dumps(held))
    finally:
        dist.destroy_process_group()


def sharded(world: int, size: str, patch: int) -> list[dict[str, int]]:
    """Every rank's bytes on ``world`` gloo ranks, by rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as results:
        torch_mp.start_processes(_rank, args=(world, port, size, patch, results), nprocs=world,
                                 start_method="spawn")
        return [json.loads(Path(results, f"rank{r}.json").read_text()) for r in range(world)]


def measure(ranks: list[int], size: str, patch: int) -> dict[str, Any]:
    """One process's bytes, then each rank's for each N in ``ranks``, with each rank's N b_r / b_1."""
    bar = tqdm(total=1 + len(ranks), desc=f"SiT-{size}/{patch} state bytes")
    one = state_after_one_step(size, patch, False, 0)
    bar.update()
    rows: list[dict[str, Any]] = [{"ranks": 1, "per_rank": [one]}]
    for world in ranks:
        per_rank = sharded(world, size, patch)
        ratios = [r["total"] * world / one["total"] for r in per_rank]
        rows.append({"ranks": world, "per_rank": per_rank, "n_times_rank_over_one": ratios,
                     "met": all(abs(r - 1) <= GOAL for r in ratios)})
        bar.update()
    bar.close()
    return {"one_process": one, "results": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python benchmarks/fsdp_memory.py")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="numbers of ranks to shard over")
    p.add_argument("--size", default="B", choices=["S", "B", "L", "XL"], help="SiT size")
    p.add_argument("--patch", type=int, default=2, choices=[2, 4, 8], help="SiT patch size")
    p.add_argument("--out", default=None, help="output JSON (default: benchmarks/results/fsdp_memory-CLASS.json)")
    args = p.parse_args()
    if any(n < 2 for n in args.ranks):
        p.error(f"--ranks must be >= 2 (one process is always measured), got {args.ranks}")
    info = pytest_benchmark_generate_machine_info()
    pytest_benchmark_update_machine_info(None, info)
    measured = measure(args.ranks, args.size, args.patch)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in SiT(IN_CHANNELS, image_size=IMAGE_SIZE, patch=args.patch, size=args.size,
                                               num_classes=NUM_CLASSES).parameters())
    out = {"machine": machine({"machine_info": info}), "hardware": info["hardware"], "versions": versions(("torch",)),
           "datetime": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "model": {"name": f"SiT-{args.size}/{args.patch}", "input": [IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE],
                     "num_classes": NUM_CLASSES, "parameters": parameters},
           "goal": {"what": "every rank's bytes of parameters + gradients + Adam state within 10% of 1/N of one "
                            "process's", "tolerance": GOAL, "met": all(r["met"] for r in measured["results"][1:])},
           **measured}
    path = Path(args.out) if args.out else RESULTS / f"fsdp_memory-{info['hardware']['machine_class']}.json"
    save_json(out, path)
    for row in measured["results"]:
        totals = [f"{r['total'] / 2**20:.1f}" for r in row["per_rank"]]
        print(f"{row['ranks']} rank(s): MiB per rank {totals}  N x rank / one: "
              f"{[round(x, 4) for x in row.get('n_times_rank_over_one', [1.0])]}")
    print(f"goal (within {GOAL:.0%} of 1/N): {'met' if out['goal']['met'] else 'NOT met'}; wrote {path}")


if __name__ == "__main__":
    main()
