"""Sharded training with FSDP2 (``--fsdp``): the units a model is sharded, checkpointed and compiled by, and the
views of sharded state that the trainer's EMA, guard and evaluation read.

``fully_shard`` on each of a model's ``blocks`` (the SiT's transformer blocks, the UNet's resolution blocks) and on
the root: each rank holds 1/N of every parameter, gradient and Adam moment (dim-0 shards as DTensors); a block's
parameters are all-gathered just before its forward (and again before its backward when ``reshard_after_forward``),
its gradients reduce-scattered (averaged over ranks) after its backward. With ``--bf16`` the
``MixedPrecisionPolicy`` gathers parameters in bf16 and reduces gradients in fp32; the conditioning embedding
(``ConditionEmbedding``: t, h and the class) is a unit of its own that stays fp32, so t keeps its resolution.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from fastfm.models.embeddings import ConditionEmbedding


class ShardingError(ValueError):
    """A model that cannot be sharded, checkpointed or compiled by blocks."""


def units(model: nn.Module, option: str) -> list[nn.Module]:
    """The repeated blocks of ``model`` (its ``blocks``); ``option`` (the flag that needs them) names the error for
    a model without blocks."""
    blocks = getattr(model, "blocks", None)
    if not blocks:
        name = getattr(model, "config", {}).get("name", type(model).__name__)
        raise ShardingError(f"{option} works on a model of blocks (sit, unet); the {name} model has none (it is "
                            "small enough for plain data parallelism: leave out the flag)")
    return list(blocks)


def checkpoint_activations(model: nn.Module) -> None:
    """Activation checkpointing of each block (``--activation-checkpointing``): a block keeps only its input for
    the backward, which runs its forward again (composable ``checkpoint``: parameter names unchanged)."""
    for unit in units(model, "--activation-checkpointing"):
        checkpoint(unit)


CPU_BLOCK_OPTIONS = {"cpp.simdlen": 0}
"""Inductor options of a block compiled on the CPU: without vectorisation. In torch 2.13 inductor's vectorised C++
code for a SiT block, compiled on its own, gives gradients 0.3-1.7% off eager's (the block's parts compiled alone,
the whole model compiled, or the block without vectorisation agree with eager to 1e-7; tests/test_fsdp.py)."""


def compile_blocks(model: nn.Module, device: torch.device) -> None:
    """Regional compilation: each block's ``forward`` through ``torch.compile`` (fullgraph; on the CPU with
    :data:`CPU_BLOCK_OPTIONS`). Blocks of one structure share their code, so dynamo compiles the block once and
    reuses the graph; FSDP's gather and reduce hooks stay outside the compiled region."""
    options = CPU_BLOCK_OPTIONS if device.type == "cpu" else None
    for unit in units(model, "--regional-compile"):
        unit.forward = torch.compile(unit.forward, fullgraph=True, options=options)  # type: ignore[method-assign]


def policy(bf16: bool) -> MixedPrecisionPolicy:
    """bf16 parameters in compute and fp32 gradient reduction (``--bf16``), else fp32 throughout. Inputs are not
    cast: t reaches the fp32 conditioning unit as it was drawn."""
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                                cast_forward_inputs=False)


def shard(model: nn.Module, device: torch.device, *, bf16: bool = False, reshard_after_forward: bool = True) -> None:
    """``fully_shard`` the conditioning embedding (fp32), each block and the root of ``model`` (on ``device``), in
    place, over every rank of the default process group."""
    blocks = units(model, "--fsdp")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # the model's device, not the machine's default
    fp32 = policy(False)
    for sub in model.modules():
        if isinstance(sub, ConditionEmbedding):
            fully_shard(sub, mesh=mesh, mp_policy=fp32, reshard_after_forward=reshard_after_forward)
    for unit in blocks:
        fully_shard(unit, mesh=mesh, mp_policy=policy(bf16), reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy(bf16), reshard_after_forward=reshard_after_forward)


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def local(t: Tensor) -> Tensor:
    """This rank's shard of a sharded tensor; a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_state(module: nn.Module) -> list[Tensor]:
    """This rank's part of every entry of ``module.state_dict()`` (parameters and persistent buffers), in order."""
    return [local(t) for t in module.state_dict().values()]


def full(t: Tensor) -> Tensor:
    """A sharded tensor gathered (a collective on every rank); a plain tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(module: nn.Module) -> dict[str, Any]:
    """The whole state dict of a (sharded) module on the CPU: of a sharded one on rank 0 only (empty elsewhere),
    gathered by a collective every rank calls."""
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def named_optimizer_state(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """An ``optimizer.state_dict()`` (parameters by index) keyed by parameter name instead, as
    ``set_optimizer_state_dict`` takes it."""
    names = [name for name, _ in model.named_parameters()]
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def state_bytes(tensors: list[Tensor]) -> int:
    """Bytes this rank holds of ``tensors`` (its shards of sharded ones)."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors)
