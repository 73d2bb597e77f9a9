"""Building blocks of the ADM-style UNet (Dhariwal & Nichol, 2021), and the attention and low-res input that the
UNet and the SiT share."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with the affine part applied outside the fused kernel.

    Same parameters and state dict; works around torch.compile failing on ``torch.func.jvp``
    through the affine ``group_norm`` op (fake-tensor ``_fw_primal`` assert in torch 2.13).
    """

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return F.group_norm(x, self.num_groups, eps=self.eps) * self.weight.view(shape) + self.bias.view(shape)


def group_norm(channels: int) -> GroupNorm:
    """GroupNorm with the largest group count <= 32 that divides ``channels``."""
    groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    return GroupNorm(groups, channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` (so a residual branch starts as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block with adaptive GroupNorm conditioning.

    ``h = conv1(SiLU(GN(x)))``, ``(s, b) = Linear(SiLU(e))``,
    ``out = skip(x) + conv2(Dropout(SiLU(GN(h) * (1 + s) + b)))`` with ``conv2`` zero-initialised.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.out_norm = group_norm(out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_layers(self.out_norm(h) * (1 + scale) + shift)
        return self.skip(x) + h


_FORWARD_MODE_DEPTH = 0


@contextlib.contextmanager
def forward_mode_attention() -> Iterator[None]:
    """Within: attention as matmul + softmax, which forward-mode AD (``torch.func.jvp``, the divergence)
    differentiates; the fused ``scaled_dot_product_attention`` kernels (flash / memory-efficient on CUDA,
    the fused CPU kernel) have no forward-mode derivative."""
    global _FORWARD_MODE_DEPTH
    _FORWARD_MODE_DEPTH += 1
    try:
        yield
    finally:
        _FORWARD_MODE_DEPTH -= 1


def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for q, k, v of shape (..., N, d): ``F.scaled_dot_product_attention`` (flash
    attention in training on GPUs), and matmul + softmax under :func:`forward_mode_attention`, with the scale
    d^(-1/4) applied to q and k separately (bf16 headroom)."""
    if _FORWARD_MODE_DEPTH:
        scale = q.shape[-1] ** -0.25
        return torch.softmax((q * scale) @ (k * scale).transpose(-1, -2), dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v)


def with_low_res(x: Tensor, low_res: Tensor | None, low_res_channels: int | None) -> Tensor:
    """x (B, C, H, W) with a super-resolution model's ``low_res`` (B, low_res_channels, h, w) bilinearly resized to
    (H, W) and concatenated along the channels; ValueError unless ``low_res`` is given exactly when the model takes
    it (``low_res_channels`` not None)."""
    if (low_res is None) != (low_res_channels is None):
        raise ValueError(
            "low_res must be given exactly when the model is built with low_res_channels "
            f"(low_res_channels={low_res_channels})"
        )
    if low_res is None:
        return x
    up = F.interpolate(low_res, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([x, up.to(x.dtype)], dim=1)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, as a zero-initialised residual.

    ``out = x + proj(softmax(q^T k / sqrt(d)) v)`` with ``q, k, v = qkv(GN(x))`` per head, through :func:`attend`.
    """

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into {num_heads} attention heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        head_dim = c // self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, head_dim, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, heads, N, d) each
        return x + self.proj(attend(q, k, v).transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Strided 3x3 conv: (H, W) -> (ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to ``size`` (the matching skip's size, so odd sizes work), then 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """Sequential container that feeds the embedding to ResBlocks and the target size to Upsample."""

    def forward(self, x: Tensor, emb: Tensor, size: tuple[int, int] | None = None) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, Upsample):
                assert size is not None, "Upsample needs the target size"
                x = layer(x, size)
            else:
                x = layer(x)
        return x
