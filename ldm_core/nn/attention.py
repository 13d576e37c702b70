"""SpatialTransformer and its parts, with the attention hook points of `UNetHooks`.

Attribute names follow ldm/sgm `attention.py` (ldm-formats.md §1.2): `proj_in`,
`transformer_blocks.M.{norm1,attn1,norm2,attn2,norm3,ff}`, `attn.{to_q,to_k,to_v,to_out.0}`,
`ff.net.{0.proj,2}`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_core.nn.hooks import AttentionInfo, BlockId, UNetHooks
from ldm_core.nn.layers import group_norm


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention: q [B,N,h*d], k/v [B,M,h*d] -> [B,N,h*d]."""
    b, n, inner = q.shape
    dim_head = inner // heads
    q, k, v = (t.reshape(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, d]
    return out.transpose(1, 2).reshape(b, n, inner)


class CrossAttention(nn.Module):
    """Self-attention (context None) or cross-attention over `context`."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)

    def forward_hooked(
        self, x: torch.Tensor, context: torch.Tensor | None, hooks: UNetHooks, info: AttentionInfo
    ) -> torch.Tensor:
        """`forward` with the input patches, the replacement and the output patches of `hooks`."""
        if info.self_attention:
            input_patches = hooks.attn1_patches
            replacements = hooks.attn1_replace
            output_patches = hooks.attn1_output_patches
        else:
            input_patches = hooks.attn2_patches
            replacements = hooks.attn2_replace
            output_patches = hooks.attn2_output_patches
        context = x if context is None else context
        value = context
        for patch in input_patches:
            x, context, value = patch(x, context, value, info)
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(value)
        replace = replacements.get((info.block.kind, info.block.index, info.transformer_index))
        out = attention(q, k, v, self.heads) if replace is None else replace(q, k, v, info)
        out = self.to_out(out)
        for patch in output_patches:
            out = patch(out, info)
        return out


class GEGLU(nn.Module):
    """Linear to twice the width, then value * GELU(gate) (exact erf GELU)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        hooks: UNetHooks | None = None,
        block: BlockId | None = None,
        index: int = 0,
    ) -> torch.Tensor:
        if hooks is None:
            x = self.attn1(self.norm1(x)) + x
            x = self.attn2(self.norm2(x), context) + x
        else:
            info = AttentionInfo(block, index, self.attn1.heads, True, hooks.options)
            x = self.attn1.forward_hooked(self.norm1(x), None, hooks, info) + x
            info = AttentionInfo(block, index, self.attn2.heads, False, hooks.options)
            x = self.attn2.forward_hooked(self.norm2(x), context, hooks, info) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm, project to tokens, `depth` transformer blocks, project back, residual.

    `use_linear` selects Linear projections applied to tokens (SD2/SDXL) instead of 1x1 convs
    applied to the feature map (SD1).
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        use_linear: bool,
        norm_groups: int,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = group_norm(channels, norm_groups, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        hooks: UNetHooks | None = None,
        block: BlockId | None = None,
    ) -> torch.Tensor:
        b, _, height, width = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        inner = x.shape[1]
        x = x.flatten(2).transpose(1, 2)  # [B, H*W, C]
        if self.use_linear:
            x = self.proj_in(x)
        for index, transformer in enumerate(self.transformer_blocks):
            x = transformer(x, context, hooks, block, index)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, inner, height, width)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
