"""Typed hook points that the UNet consumes during one forward call.

The patcher (`ldm_core.patcher`) assembles a `UNetHooks` from the patches attached to a model
handle and passes it to `UNetModel.forward(..., hooks=...)`. The UNet never looks anywhere else
for patches, so nothing global is changed and two extensions cannot collide.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class BlockId:
    """Where in the UNet a hook fires: ("input" | "middle" | "output", block index)."""

    kind: str
    index: int


@dataclass(frozen=True)
class AttentionInfo:
    """Context handed to attention patches."""

    block: BlockId
    transformer_index: int  # which transformer block inside that SpatialTransformer
    heads: int
    self_attention: bool
    options: dict[str, Any]  # the call's `UNetHooks.options` (cond_or_uncond, sigmas, ...)


# fn(hidden [B,N,C], context [B,M,Cc], value [B,M,Cc], info) -> (hidden, context, value);
# runs before the q/k/v projections.
AttentionInputPatch = Callable[
    [Tensor, Tensor, Tensor, AttentionInfo], tuple[Tensor, Tensor, Tensor]
]
# fn(q [B,N,h*d], k [B,M,h*d], v [B,M,h*d], info) -> out [B,N,h*d]; replaces the attention
# computation between the projections and `to_out`.
AttentionReplace = Callable[[Tensor, Tensor, Tensor, AttentionInfo], Tensor]
# fn(out [B,N,C] after to_out, info) -> out
AttentionOutputPatch = Callable[[Tensor, AttentionInfo], Tensor]
# fn(h, block) -> h
BlockPatch = Callable[[Tensor, BlockId], Tensor]
# fn(h, skip, block) -> (h, skip); runs before an output block concatenates its skip.
OutputBlockPatch = Callable[[Tensor, Tensor, BlockId], tuple[Tensor, Tensor]]


@dataclass
class ControlResiduals:
    """Residuals added inside the UNet (ControlNet, T2I-Adapter).

    `output` holds one tensor (or None) per input block, in input-block order; the UNet adds
    `output[i]` to the skip pushed by input block i before an output block concatenates it.
    `middle` is added to the middle block's output. `input` (T2I-Adapter style) is added to
    each input block's output before it is pushed (None entries are skipped).
    """

    input: list[Tensor | None] = field(default_factory=list)
    middle: list[Tensor | None] = field(default_factory=list)
    output: list[Tensor | None] = field(default_factory=list)


@dataclass
class UNetHooks:
    """All patch points for one UNet call; lists run in order, replacements key on
    (block kind, block index, transformer index)."""

    attn1_patches: list[AttentionInputPatch] = field(default_factory=list)
    attn2_patches: list[AttentionInputPatch] = field(default_factory=list)
    attn1_replace: dict[tuple[str, int, int], AttentionReplace] = field(default_factory=dict)
    attn2_replace: dict[tuple[str, int, int], AttentionReplace] = field(default_factory=dict)
    attn1_output_patches: list[AttentionOutputPatch] = field(default_factory=list)
    attn2_output_patches: list[AttentionOutputPatch] = field(default_factory=list)
    input_block_patches: list[BlockPatch] = field(default_factory=list)
    middle_block_patches: list[BlockPatch] = field(default_factory=list)
    output_block_patches: list[OutputBlockPatch] = field(default_factory=list)
    control: ControlResiduals | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def attention_is_patched(self, self_attention: bool) -> bool:
        if self_attention:
            return bool(self.attn1_patches or self.attn1_replace or self.attn1_output_patches)
        return bool(self.attn2_patches or self.attn2_replace or self.attn2_output_patches)
