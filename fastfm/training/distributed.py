"""Data-parallel plumbing: torchrun's environment, process group, and the few collectives training uses.

Launch: ``torchrun --nproc_per_node N -m fastfm.train ...`` (multi-node: torchrun's usual
``--nnodes/--node_rank/--rdzv_endpoint`` flags). NCCL on GPUs, gloo on CPU. Under torchrun the
model is always DDP-wrapped (also for N = 1); without torchrun it runs as a plain single process.

Batch layout. All ranks draw the same global batch of B rows from one shared stream (the run's
"batch" stream, fastfm.seeding) and keep their own rows: rank r holds rows [r B/W, (r + 1) B/W),
split further into ``accum`` micro-batches of m = B / (W accum) rows. In-kernel noise for rows
starting at global row i is drawn from the step's "noise" seed at row offset i, so a W-rank run
sees exactly the samples of a one-process run. What differs between ranks is seeded per rank:
the global torch RNG (dropout; the "rank" stream) and a per-rank coupling ("coupling", step, rank).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: global rank, world size and rank within the node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun: a process group (and DDP) even for one rank

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.launched or self.world > 1

    def rows(self, batch: int) -> slice:
        """This rank's rows of a global batch (B divisible by W)."""
        per = batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


def env_from_torchrun() -> DistEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them; a single process without them."""
    if "WORLD_SIZE" not in os.environ:
        return DistEnv()
    return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")),
                   launched=True)


class RankTimeout(RuntimeError):
    """A collective did not complete within the job's timeout: a rank stopped answering."""


_WATCH: list[Any] = []  # the gloo group that names unresponsive ranks (``unresponsive``), once joined


def init(env: DistEnv, device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join the process group (NCCL for CUDA devices, gloo otherwise) with a collective timeout of
    ``timeout_s``, and a gloo group to find a rank that stops answering; nothing for one process."""
    if env.active and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
        _WATCH[:] = [dist.new_group(backend="gloo", timeout=timeout)]  # its own connections: usable after a timeout


def is_timeout(e: BaseException) -> bool:
    """Whether a collective failed by timing out (gloo: "Timed out waiting ...")."""
    return isinstance(e, RuntimeError) and re.search(r"timed? ?out", str(e), re.IGNORECASE) is not None


def unresponsive(env: DistEnv, wait_s: float) -> list[int]:
    """After a collective timed out: the ranks that do not reach a monitored barrier within ``wait_s`` (on
    rank 0, each rank that failed; elsewhere [0] if rank 0 did not answer, [] if it did)."""
    try:
        dist.monitored_barrier(_WATCH[0], timeout=timedelta(seconds=wait_s),
                               wait_all_ranks=True)
    except RuntimeError as e:
        if not env.main:
            return [0]
        named = re.search(r"Ranks? ([\d, ]+) failed", str(e))
        return [int(r) for r in named[1].replace(",", " ").split()] if named else []
    return []


def max_over_ranks(value: int, env: DistEnv, device: torch.device) -> int:
    """The largest of every rank's ``value`` (a host sync; on the CPU for gloo, ``device`` for NCCL)."""
    if not env.active:
        return value
    x = torch.tensor(value, dtype=torch.int64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x)


def shutdown(env: DistEnv) -> None:
    if env.active and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_rows(x: Tensor, env: DistEnv) -> Tensor:
    """Concatenate every rank's rows in rank order (the global batch); x itself for one process."""
    if not env.active:
        return x
    parts = [torch.empty_like(x) for _ in range(env.world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def scatter_rows(x: Tensor | None, like: Tensor, env: DistEnv) -> Tensor:
    """Rank 0's global-batch tensor ``x`` cut into W equal row blocks; rank r receives block r."""
    if not env.active:
        assert x is not None
        return x
    out = torch.empty_like(like)
    chunks = list(x.contiguous().chunk(env.world)) if env.main else None
    dist.scatter(out, chunks, src=0)
    return out


def any_rank(flag: Tensor, env: DistEnv) -> Tensor:
    """A boolean tensor that is true if it is true on any rank (no host sync)."""
    if not env.active:
        return flag
    x = flag.to(torch.int32)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x.bool()


def mean_over_ranks(x: Tensor, env: DistEnv) -> Tensor:
    if not env.active:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / env.world


def gather_states(state: Tensor, env: DistEnv) -> Tensor:
    """Every rank's state tensor (same shape on all ranks, e.g. an RNG state), stacked (W, ...) on the CPU."""
    if not env.active:
        return state.unsqueeze(0)
    nccl = dist.get_backend() == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return all_gather_rows(state.unsqueeze(0).to(dev), env).cpu()


def from_rank0(obj: Any, env: DistEnv) -> Any:
    """Rank 0's value of a small picklable ``obj`` (a decision every rank must share), on every rank."""
    if not env.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()
