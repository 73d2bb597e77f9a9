"""ADM-style UNet velocity field for images (the Flow Matching paper's image architecture)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastfm.models.blocks import (
    AttentionBlock,
    Downsample,
    EmbedSequential,
    ResBlock,
    Upsample,
    group_norm,
    with_low_res,
    zero_init,
)
from fastfm.models.embeddings import ConditionEmbedding
from fastfm.models.options import POSITIVE, Limit, checked_options


def level_sizes(image_size: int, num_levels: int) -> list[int]:
    """Feature-map side length at each level: ``s_0 = image_size``, ``s_{l+1} = ceil(s_l / 2)``."""
    sizes = [image_size]
    for _ in range(num_levels - 1):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class UNet(nn.Module):
    """UNet ``v(x, t, y, low_res)`` of shape (B, out_channels, H, W) for x of shape (B, C, H, W).

    * ``channel_mult[l] * model_channels`` channels at level ``l``; ``num_res_blocks`` ResBlocks
      per level on the way down, ``num_res_blocks + 1`` (with skip concatenation) on the way up.
    * ``attention_resolutions`` are feature-map side lengths (image sizes), e.g. ``(14,)`` for
      28x28 inputs, where levels have sizes ``image_size, ceil(image_size/2), ...``. ``None``
      means the 2x-downsampled level (16 for 32x32, 14 for 28x28, 4 for 8x8). The middle
      block always has attention. Each size must be a level size of ``image_size``.
    * Heads: ``num_head_channels`` channels per head if given, else ``num_heads`` heads.
    * ``num_classes``: label embedding with NULL class ``num_classes`` (= ``y=None``) for CFG.
    * ``low_res_channels``: super-resolution; ``low_res`` (B, low_res_channels, h, w) is
      bilinearly resized to (H, W) and concatenated to x before the first conv.
    * ``flow_map``: also conditioned on a step h, u(x, t, h) (``ConditionEmbedding``).
    * The output conv is zero-initialised, so the velocity is exactly 0 at init.

    Other input sizes also run (every Down/Upsample pair is size-matched); ``image_size`` only
    fixes where attention is placed.
    """

    @checked_options("unet", {
        "in_channels": POSITIVE, "out_channels": POSITIVE, "model_channels": Limit(2), "num_res_blocks": POSITIVE,
        "channel_mult": Limit(1, min_items=1), "num_heads": POSITIVE, "num_head_channels": POSITIVE,
        "dropout": Limit(0, 1), "low_res_channels": POSITIVE, "image_size": POSITIVE})
    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        model_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] | None = None,
        num_heads: int = 4,
        num_head_channels: int | None = None,
        dropout: float = 0.0,
        num_classes: int | None = None,
        low_res_channels: int | None = None,
        image_size: int = 32,
        flow_map: bool = False,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        sizes = level_sizes(image_size, len(channel_mult))
        attention_resolutions = sizes[1:2] if attention_resolutions is None else list(attention_resolutions)
        unknown = [r for r in attention_resolutions if r not in sizes]
        if unknown:
            raise ValueError(
                f"attention_resolutions {unknown} are not feature-map sizes {sizes} of image_size={image_size}"
            )
        self.config = dict(
            name="unet", in_channels=in_channels, out_channels=out_channels,
            model_channels=model_channels, channel_mult=list(channel_mult),
            num_res_blocks=num_res_blocks, attention_resolutions=list(attention_resolutions),
            num_heads=num_heads, num_head_channels=num_head_channels, dropout=dropout,
            num_classes=num_classes, low_res_channels=low_res_channels, image_size=image_size,
            flow_map=flow_map,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.low_res_channels = low_res_channels
        self.flow_map = flow_map

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, ch // num_head_channels if num_head_channels else num_heads)

        emb_dim = 4 * model_channels
        self.cond = ConditionEmbedding(model_channels, emb_dim, num_classes, flow_map)
        ch = model_channels
        self.input_blocks = nn.ModuleList(
            [EmbedSequential(nn.Conv2d(in_channels + (low_res_channels or 0), ch, 3, padding=1))]
        )
        skip_channels = [ch]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, mult * model_channels, emb_dim, dropout)]
                ch = mult * model_channels
                if sizes[level] in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = EmbedSequential(
            ResBlock(ch, ch, emb_dim, dropout), attention(ch), ResBlock(ch, ch, emb_dim, dropout)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), mult * model_channels, emb_dim, dropout)]
                ch = mult * model_channels
                if sizes[level] in attention_resolutions:
                    layers.append(attention(ch))
                if level > 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            group_norm(ch), nn.SiLU(), zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))
        )

    @property
    def blocks(self) -> list[nn.Module]:
        """The resolution blocks in order (down, middle, up): the units FSDP shards, activation checkpointing
        recomputes and regional compilation compiles."""
        return [*self.input_blocks, self.middle_block, *self.output_blocks]

    @staticmethod
    def config_for_data(*, data: str, kind: str, shape: tuple[int, ...], num_classes: int | None,
                        superres: int = 0) -> dict[str, Any]:
        """The UNet's config for (C, H, W) images, before the user's overrides: 32 base channels, three levels
        (channel_mult [1, 2, 2]) from 16 pixels up, else two ([1, 2]); ``superres`` conditions on x1 downsampled
        by that factor, which must divide H."""
        if kind != "image":
            raise ValueError(f"the unet model takes image data; {data!r} is {kind} data")
        c, h, _ = shape
        if superres and h % superres:
            raise ValueError(f"superres factor {superres} does not divide the image size {h}")
        return {"name": "unet", "in_channels": c, "image_size": h, "num_classes": num_classes,
                "low_res_channels": c if superres else None,
                "model_channels": 32, "channel_mult": [1, 2, 2] if h >= 16 else [1, 2]}

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor | None = None, low_res: Tensor | None = None, h: Tensor | None = None
    ) -> Tensor:
        """Velocity for images x (B, C, H, W), times t (B,), labels y (B,), low_res (B, C', h, w); with
        ``flow_map`` the average velocity over the steps h (B,) from t."""
        feat = with_low_res(x, low_res, self.low_res_channels)
        emb = self.cond(t, y, h)
        skips: list[Tensor] = []
        for block in self.input_blocks:
            feat = block(feat, emb)
            skips.append(feat)
        feat = self.middle_block(feat, emb)
        for block in self.output_blocks:
            feat = torch.cat([feat, skips.pop()], dim=1)
            feat = block(feat, emb, skips[-1].shape[-2:] if skips else None)
        return self.out(feat)
