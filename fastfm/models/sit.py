"""SiT/DiT transformer velocity field for images (Peebles & Xie, 2023; Ma et al., 2024), with LightningDiT's options
(Yao et al., 2025): RMSNorm, SwiGLU, 2D rotary positions, query-key normalisation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastfm.models.blocks import attend, with_low_res, zero_init
from fastfm.models.embeddings import ConditionEmbedding
from fastfm.models.options import POSITIVE, Limit, checked_options

SIZES: dict[str, tuple[int, int, int]] = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
                                          "XL": (28, 1152, 16)}
"""DiT's model sizes: (depth, hidden size, heads)."""
NORMS = ("layer", "rms")
MLPS = ("gelu", "swiglu")
FREQ_DIM = 256  # sinusoidal features of t (and h) before the time MLP, as DiT's TimestepEmbedder
ROPE_THETA = 10000.0


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(N, dim) features ``[sin(pos w_0), ..., sin(pos w_{k-1}), cos(pos w_0), ..., cos(pos w_{k-1})]`` with
    ``w_i = 10000^(-i / k)``, k = dim / 2 (DiT's get_1d_sincos_pos_embed_from_grid)."""
    omega = 10000.0 ** -(torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    out = pos.double()[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid: int) -> Tensor:
    """(grid * grid, dim) fixed fp32 position embedding of a grid x grid patch grid, row-major: token (i, j) gets
    ``[sincos_1d(dim / 2, j), sincos_1d(dim / 2, i)]`` (DiT's get_2d_sincos_pos_embed: the column first)."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1).float()


def rope_2d(head_dim: int, grid: int) -> tuple[Tensor, Tensor]:
    """cos and sin (grid * grid, head_dim) of axial 2D rotary positions: for token (i, j) the pairs of dimensions
    (2k, 2k + 1) rotate by the angle i w_k for k < head_dim / 4 and by j w_{k - head_dim / 4} above, with
    ``w_k = theta^(-4k / head_dim)``: each axis a 1D RoPE of half the head."""
    quarter = head_dim // 4
    freqs = ROPE_THETA ** -(torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles = torch.cat([rows.flatten()[:, None] * freqs, cols.flatten()[:, None] * freqs], dim=1)
    angles = angles.repeat_interleave(2, dim=1)
    return angles.cos().float(), angles.sin().float()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE: each pair (x_2k, x_2k+1) of the last dimension of x (..., N, d) rotated by its angle, i.e. as a complex
    number times ``cos + i sin``; computed in the wider of x's and cos's dtypes, returned in x's."""
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x * cos + turned * sin).to(x.dtype)


def unpatchify(tokens: Tensor, patch: int, channels: int, grid: int) -> Tensor:
    """(B, grid^2, patch^2 * channels) tokens, row-major over the grid, each holding its patch's pixels in
    (row, column, channel) order -> images (B, channels, grid * patch, grid * patch)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, grid, grid, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, grid * patch, grid * patch)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x (1 + scale) + shift`` with per-sample (B, 1, D) shift and scale over the tokens."""
    return x * (1 + scale) + shift


def norm_layer(norm: str, dim: int) -> nn.Module:
    """LayerNorm ("layer") or RMSNorm ("rms") over ``dim`` features without affine parameters, eps 1e-6."""
    if norm == "rms":
        return nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
    return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)


def xavier_(module: nn.Module) -> nn.Module:
    """DiT's initialisation of every Linear in ``module``: Xavier-uniform weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return module


class HeadNorm(nn.Module):
    """LightningDiT's qk_norm: ``norm(x) * weight (+ bias)`` over each head of q or k, LayerNorm (with a bias) or
    RMSNorm, computed in the weights' dtype (fp32 under autocast) and returned in the input's. The affine part is
    applied outside the fused op, as in ``blocks.GroupNorm``: torch.compile fails on torch.func.jvp through the
    affine ``layer_norm`` (a MeanFlow step)."""

    def __init__(self, norm: str, head_dim: int) -> None:
        super().__init__()
        self.norm = norm_layer(norm, head_dim)
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.bias = nn.Parameter(torch.zeros(head_dim)) if norm == "layer" else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.norm(x.to(self.weight.dtype)) * self.weight
        return (out if self.bias is None else out + self.bias).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention over the tokens: ``proj(attend(q, k, v))`` with ``q, k, v = qkv(x)`` per head,
    q and k normalised over each head (``qk_norm``, affine) and rotated (RoPE cos/sin given)."""

    def __init__(self, hidden: int, num_heads: int, qk_norm: bool, norm: str) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden // num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.q_norm = HeadNorm(norm, head_dim) if qk_norm else nn.Identity()
        self.k_norm = HeadNorm(norm, head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        return self.proj(attend(q, k, v).transpose(1, 2).reshape(b, n, c))


class GeluMLP(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))`` with ``inner`` hidden units."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, inner), nn.Linear(inner, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """``fc2(SiLU(a) * b)`` with ``[a, b] = fc1(x)`` of ``inner`` units each (Shazeer, 2020)."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, 2 * inner), nn.Linear(inner, hidden)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on c:

        x = x + g1 * attn(modulate(norm1(x), b1, s1)),   x = x + g2 * mlp(modulate(norm2(x), b2, s2))

    with ``(b1, s1, g1, b2, s2, g2) = Linear(SiLU(c))`` zero-initialised, so a fresh block is the identity. What
    every block shares (c, the RoPE cos/sin) comes in as arguments: one compiled graph serves every block.
    """

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, norm: str, mlp: str, qk_norm: bool) -> None:
        super().__init__()
        self.norm1 = norm_layer(norm, hidden)
        self.attn = xavier_(Attention(hidden, num_heads, qk_norm, norm))
        self.norm2 = norm_layer(norm, hidden)
        inner = int(mlp_ratio * hidden)
        self.mlp = xavier_(SwiGLU(hidden, int(2 * inner / 3)) if mlp == "swiglu" else GeluMLP(hidden, inner))
        self.modulation = zero_init(nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden)))

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Tokens x (B, N, D), conditioning c (B, D), RoPE cos/sin (N, head_dim) or None -> (B, N, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """``Linear(modulate(norm(x), b, s))`` to patch^2 * out_channels per token, with ``(b, s) = Linear(SiLU(c))``;
    both linears zero-initialised, so a fresh model's output is exactly 0."""

    def __init__(self, hidden: int, patch: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.norm = norm_layer(norm, hidden)
        self.modulation = zero_init(nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden)))
        self.linear = zero_init(nn.Linear(hidden, patch * patch * out_channels))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class SiT(nn.Module):
    """SiT/DiT ``v(x, t, y, low_res)`` of shape (B, out_channels, H, W) for square images x (B, C, H, W), H = W =
    ``image_size``.

    * Patch embedding: a Conv2d of kernel and stride ``patch`` (which must divide ``image_size``) to (image_size /
      patch)^2 tokens of width ``hidden_size``, plus the fixed 2D sin-cos positions (a non-persistent fp32 buffer).
    * ``size`` S, B, L or XL sets depth, hidden size and heads (:data:`SIZES`); ``depth``, ``hidden_size`` and
      ``num_heads`` override them. c = ``ConditionEmbedding(t, y[, h])`` (DiT's timestep and label embedders, the
      null class ``num_classes`` = ``y=None`` for classifier-free guidance; ``flow_map``: also a step h from t).
    * ``depth`` :class:`SiTBlock` (adaLN-Zero), then :class:`FinalLayer` and unpatchify: the output is 0 at init.
    * LightningDiT's options: ``norm="rms"`` (RMSNorm for LayerNorm), ``mlp="swiglu"`` (SwiGLU of
      int(2/3 mlp_ratio hidden) units), ``rope`` (2D rotary positions in attention; head_dim divisible by 4),
      ``qk_norm`` (per-head affine norm of q and k).
    * ``low_res_channels``: super-resolution; ``low_res`` (B, low_res_channels, h, w) is bilinearly resized to
      (H, W) and concatenated to x before the patch embedding.
    """

    pos_embed: Tensor
    rope_cos: Tensor | None
    rope_sin: Tensor | None

    @checked_options("sit", {
        "in_channels": POSITIVE, "out_channels": POSITIVE, "image_size": POSITIVE, "patch": POSITIVE,
        "depth": POSITIVE, "hidden_size": POSITIVE, "num_heads": POSITIVE, "mlp_ratio": Limit(1),
        "num_classes": POSITIVE, "low_res_channels": POSITIVE})
    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        image_size: int = 32,
        patch: int = 2,
        size: str = "S",
        depth: int | None = None,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,
        low_res_channels: int | None = None,
        flow_map: bool = False,
        norm: str = "layer",
        mlp: str = "gelu",
        rope: bool = False,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        for name, value, choices in [("size", size, tuple(SIZES)), ("norm", norm, NORMS), ("mlp", mlp, MLPS)]:
            if value not in choices:
                raise ValueError(f"sit model option {name}={value!r}: expected one of {', '.join(choices)}")
        depth, hidden_size, num_heads = (default if given is None else given for given, default in
                                         zip((depth, hidden_size, num_heads), SIZES[size]))
        if image_size % patch:
            raise ValueError(f"sit model option patch={patch} does not divide the image size "
                             f"{image_size}x{image_size}")
        if hidden_size % num_heads:
            raise ValueError(f"sit model option hidden_size={hidden_size} cannot be split into num_heads={num_heads} "
                             "attention heads")
        if hidden_size % 4:
            raise ValueError(f"sit model option hidden_size={hidden_size}: the 2D sin-cos positions need a multiple "
                             "of 4")
        if rope and (hidden_size // num_heads) % 4:
            raise ValueError(f"sit model option rope=true needs a head size divisible by 4; hidden_size={hidden_size}"
                             f" / num_heads={num_heads} = {hidden_size // num_heads}")
        out_channels = in_channels if out_channels is None else out_channels
        self.config = dict(
            name="sit", in_channels=in_channels, out_channels=out_channels, image_size=image_size, patch=patch,
            size=size, depth=depth, hidden_size=hidden_size, num_heads=num_heads, mlp_ratio=mlp_ratio,
            num_classes=num_classes, low_res_channels=low_res_channels, flow_map=flow_map, norm=norm, mlp=mlp,
            rope=rope, qk_norm=qk_norm,
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.image_size, self.patch, self.grid = image_size, patch, image_size // patch
        self.num_classes = num_classes
        self.low_res_channels = low_res_channels
        self.flow_map = flow_map

        self.patch_embed = nn.Conv2d(in_channels + (low_res_channels or 0), hidden_size, patch, stride=patch)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(hidden_size, -1))  # as a Linear (DiT)
        nn.init.zeros_(self.patch_embed.bias)
        self.register_buffer("pos_embed", sincos_2d(hidden_size, self.grid)[None], persistent=False)
        cos, sin = rope_2d(hidden_size // num_heads, self.grid) if rope else (None, None)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.cond = ConditionEmbedding(FREQ_DIM, hidden_size, num_classes, flow_map)
        for layer in (self.cond.time[0], self.cond.time[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.cond.label is not None:
            nn.init.normal_(self.cond.label.weight, std=0.02)
        self.blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_heads, mlp_ratio, norm, mlp, qk_norm) for _ in range(depth)])
        self.final = FinalLayer(hidden_size, patch, out_channels, norm)

    @staticmethod
    def config_for_data(*, data: str, kind: str, shape: tuple[int, ...], num_classes: int | None,
                        superres: int = 0) -> dict[str, Any]:
        """The SiT's config for square (C, H, H) images, before the user's overrides: size S with patch 2 where 2
        divides H, else 1; ``superres`` conditions on x1 downsampled by that factor, which must divide H."""
        if kind != "image":
            raise ValueError(f"the sit model takes image data; {data!r} is {kind} data")
        c, h, w = shape
        if h != w:
            raise ValueError(f"the sit model takes square images; {data!r} has {h}x{w} images")
        if superres and h % superres:
            raise ValueError(f"superres factor {superres} does not divide the image size {h}")
        return {"name": "sit", "in_channels": c, "image_size": h, "patch": 2 if h % 2 == 0 else 1,
                "num_classes": num_classes, "low_res_channels": c if superres else None}

    @property
    def rope(self) -> tuple[Tensor, Tensor] | None:
        """The RoPE cos and sin (tokens, head_dim) every block takes, or None without rotary positions."""
        return None if self.rope_cos is None or self.rope_sin is None else (self.rope_cos, self.rope_sin)

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor | None = None, low_res: Tensor | None = None, h: Tensor | None = None
    ) -> Tensor:
        """Velocity for images x (B, C, H, W), times t (B,), labels y (B,), low_res (B, C', h, w); with
        ``flow_map`` the average velocity over the steps h (B,) from t."""
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"the sit model was built for {self.image_size}x{self.image_size} images (patch "
                             f"{self.patch}); got {x.shape[-2]}x{x.shape[-1]}")
        feat = with_low_res(x, low_res, self.low_res_channels)
        c = self.cond(t, y, h)
        # the residual stream in x's dtype: fp32 under autocast (as DiT's), bf16 with bf16 weights and inputs
        tokens = self.patch_embed(feat).flatten(2).transpose(1, 2).to(x.dtype) + self.pos_embed.to(x.dtype)
        rope = self.rope
        for block in self.blocks:
            tokens = block(tokens, c, rope)
        return unpatchify(self.final(tokens, c), self.patch, self.out_channels, self.grid)
