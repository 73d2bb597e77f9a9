"""Cases shared by the SiT training benchmarks (benchmarks/test_sit_cpu.py, benchmarks/gpu/bench_train.py --model
sit): class-labelled random latents, and diffusers' DiT of a SiT's size trained by the plain loop a diffusers user
writes.

    fastfm     fastfm's Trainer step on ``--model sit --class-cond``: data draw, fused path op + loss, AdamW,
               clipping, NaN guard, LR schedule, EMA
    diffusers  DiTTransformer2DModel (norm_type="ada_norm_zero") of the same depth, width, heads, patch, channels
               and classes, random weights, in the CondOT loop of flow_matching's and torchcfm's examples:
               x0 = randn; t = rand; x_t = (1 - t) x0 + t x1; loss = mean((v(x_t, t, y) - (x1 - x0))^2); fused
               AdamW (no EMA, no clipping); diffusers' timestep is 1000 t, the scale of its schedulers

Parameter counts: diffusers' DiT repeats the conditioning embedder (timestep MLP and class table) in each block,
where the DiT/SiT reference (and fastfm) compute it once; :func:`params_counted_once` counts it once, which is the
reference's count.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from fastfm.data.dataset import Dataset
from fastfm.training.config import TrainConfig

SHAPE, CLASSES = (4, 32, 32), 1000  # ImageNet 256 latents of the SD autoencoder, as DiT/SiT train on
# SiT options diffusers' DiT has no counterpart of: the values it must have
DIT_FIXED = {"norm": "layer", "mlp": "gelu", "rope": False, "qk_norm": False, "mlp_ratio": 4.0,
             "low_res_channels": None, "flow_map": False}


def latents(root: Path, n: int, shape: tuple[int, int, int] = SHAPE, classes: int = CLASSES) -> str:
    """The data set name (``npz:PATH``) of n fp32 standard normal latents of ``shape`` with labels 0, 1, ...,
    classes - 1, 0, ... (every class present: the data set's class count is ``classes``), written once to root."""
    if n < classes:
        raise ValueError(f"{n} latents cannot hold all {classes} classes")
    path = root / f"latents_{n}_{'x'.join(map(str, shape))}_{classes}.npz"
    if not path.exists():
        x = np.random.default_rng(0).standard_normal((n, *shape), dtype=np.float32)
        np.savez(path, x=x, y=np.arange(n) % classes)
    return f"npz:{path}"


class DiTVelocity(nn.Module):
    """``v(x, t, y)`` of diffusers' DiTTransformer2DModel: its ``sample`` at timestep 1000 t and class y."""

    def __init__(self, dit: nn.Module) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.dit(x, timestep=1000 * t, class_labels=y, return_dict=False)[0]

    def compile_blocks(self) -> None:
        """Regional compilation, as diffusers' ``compile_repeated_blocks`` does (DiT does not name its repeated
        blocks): each transformer block's forward through ``torch.compile`` (fullgraph)."""
        for block in self.dit.transformer_blocks:
            block.compile(fullgraph=True)


def dit_like(config: dict[str, Any]) -> DiTVelocity:
    """diffusers' DiT of the SiT ``config``'s size (fp32, random weights on the default device); ValueError where the
    SiT uses an option DiT lacks."""
    from diffusers import DiTTransformer2DModel

    odd = {k: config.get(k) for k, v in DIT_FIXED.items() if config.get(k, v) != v}
    if odd or not config.get("num_classes"):
        raise ValueError(f"diffusers' DiT has no counterpart of this SiT: {odd or 'no classes'} (it takes "
                         f"{DIT_FIXED} and class labels)")
    heads, hidden = config["num_heads"], config["hidden_size"]
    return DiTVelocity(DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hidden // heads, num_layers=config["depth"],
        in_channels=config["in_channels"], out_channels=config["out_channels"], patch_size=config["patch"],
        sample_size=config["image_size"], num_embeds_ada_norm=config["num_classes"], norm_type="ada_norm_zero"))


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def params_counted_once(v: DiTVelocity) -> int:
    """The DiT's parameters with its conditioning embedder counted once: all, less the copies in blocks 2..depth."""
    blocks = v.dit.transformer_blocks
    return params(v) - (len(blocks) - 1) * params(blocks[0].norm1.emb)


def plain_step(net: nn.Module, model: nn.Module, data: Dataset, cfg: TrainConfig,
               device: torch.device) -> Callable[[], Tensor]:
    """One step of the plain CondOT loop (module doc) of ``net`` (``model``, or it compiled) on ``data``, at
    ``cfg``'s batch, learning rate, weight decay and seed; bf16 autocast with ``cfg.bf16``."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.bf16 else contextlib.nullcontext

    def step() -> Tensor:
        x1, y = (a.to(device, non_blocking=True) for a in data.sample(cfg.batch_size, gen))
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=device)
        tb = t.view(-1, *([1] * (x1.ndim - 1)))
        with autocast():
            v = net((1 - tb) * x0 + tb * x1, t, y)
        loss = (v - (x1 - x0)).pow(2).mean()  # in fp32, the target's dtype
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()
    return step
