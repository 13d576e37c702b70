"""UNet building blocks: timestep embedding, ResBlock, Downsample, Upsample.

Attribute names follow openaimodel.py so that checkpoint keys load without renaming
(ldm-formats.md §1.2). Dropout slots of the original are `nn.Identity` placeholders: they keep
the indices of the `nn.Sequential`s aligned with the checkpoint keys (dropout is 0 at inference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of float timesteps [B] -> [B, dim], always in fp32."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels: int, groups: int, eps: float = 1e-5) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible by {groups} groups")
    return nn.GroupNorm(groups, channels, eps=eps)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the projected time embedding added in between."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, norm_groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(channels, norm_groups),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels, norm_groups),
            nn.SiLU(),
            nn.Identity(),  # dropout slot
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if channels == out_channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv with symmetric padding (unlike the VAE's asymmetric one)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then a 3x3 conv.

    `size` is the spatial size of the skip that will be concatenated next; passing it lets
    latents whose sides are not a multiple of 2**levels round-trip (9 -> 5 -> 9, not 10).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)
