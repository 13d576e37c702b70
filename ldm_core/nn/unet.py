"""The latent-diffusion UNet (openaimodel.UNetModel) for SD1.x, SD2.x and SDXL-style configs.

Module attributes equal the checkpoint keys after `model.diffusion_model.` is stripped, so a
real checkpoint loads with `load_state_dict(strict=True)`. Layout: ldm-formats.md §1.2.
Patches arrive only through the `hooks` argument of `forward` (see `ldm_core.nn.hooks`).
"""

from __future__ import annotations

import torch
from torch import nn

from ldm_core.config import UNetConfig
from ldm_core.nn.attention import SpatialTransformer
from ldm_core.nn.hooks import BlockId, ControlResiduals, UNetHooks
from ldm_core.nn.layers import Downsample, ResBlock, Upsample, group_norm, timestep_embedding


class TimestepBlock(nn.Sequential):
    """One input/middle/output block: routes the embedding, context and hooks to its layers."""

    def forward(
        self,
        h: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None,
        hooks: UNetHooks | None = None,
        block: BlockId | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context, hooks, block)
            elif isinstance(layer, Upsample):
                h = layer(h, upsample_size)
            else:
                h = layer(h)
        return h


def _transformer(config: UNetConfig, channels: int, depth: int) -> SpatialTransformer:
    heads, dim_head = config.heads_for(channels)
    if heads < 1 or heads * dim_head != channels:
        raise ValueError(
            f"UNetConfig: {channels} channels cannot be split into heads "
            f"(num_heads={config.num_heads}, num_head_channels={config.num_head_channels})"
        )
    return SpatialTransformer(
        channels,
        heads,
        dim_head,
        depth,
        config.context_dim,
        config.use_linear_in_transformer,
        config.norm_groups,
    )


def build_encoder(config: UNetConfig) -> tuple[nn.ModuleList, TimestepBlock, list[int]]:
    """`input_blocks`, `middle_block` and the channel count of every input block's output.

    Shared with ControlNet, whose encoder is a copy of the UNet's.
    """
    if len(config.transformer_depth) != len(config.channel_mult):
        raise ValueError(
            f"UNetConfig: transformer_depth {config.transformer_depth} needs one entry per "
            f"channel_mult level {config.channel_mult}"
        )
    mc, groups = config.model_channels, config.norm_groups
    emb_channels = 4 * mc
    input_blocks = nn.ModuleList([TimestepBlock(nn.Conv2d(config.in_channels, mc, 3, padding=1))])
    channels = [mc]
    ch = mc
    last_level = len(config.channel_mult) - 1
    for level, mult in enumerate(config.channel_mult):
        depth = config.transformer_depth[level]
        for _ in range(config.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, emb_channels, mult * mc, groups)]
            ch = mult * mc
            if depth > 0:
                layers.append(_transformer(config, ch, depth))
            input_blocks.append(TimestepBlock(*layers))
            channels.append(ch)
        if level != last_level:
            input_blocks.append(TimestepBlock(Downsample(ch)))
            channels.append(ch)
    middle: list[nn.Module] = [ResBlock(ch, emb_channels, ch, groups)]
    if config.transformer_depth_middle > 0:
        middle.append(_transformer(config, ch, config.transformer_depth_middle))
    middle.append(ResBlock(ch, emb_channels, ch, groups))
    return input_blocks, TimestepBlock(*middle), channels


def _hooks_are_empty(hooks: UNetHooks) -> bool:
    control = hooks.control
    return not (
        hooks.attn1_patches
        or hooks.attn2_patches
        or hooks.attn1_replace
        or hooks.attn2_replace
        or hooks.attn1_output_patches
        or hooks.attn2_output_patches
        or hooks.input_block_patches
        or hooks.middle_block_patches
        or hooks.output_block_patches
        or (control is not None and (control.input or control.middle or control.output))
    )


def _check_control(control: ControlResiduals, num_input_blocks: int) -> None:
    for name in ("input", "output"):
        residuals = getattr(control, name)
        if residuals and len(residuals) != num_input_blocks:
            raise ValueError(
                f"ControlResiduals.{name} has {len(residuals)} entries; expected one (or None) "
                f"per input block ({num_input_blocks})"
            )
    if len(control.middle) > 1:
        raise ValueError(f"ControlResiduals.middle has {len(control.middle)} entries; expected 1")


class UNetModel(nn.Module):
    """openaimodel.UNetModel: predicts eps (or v) for latents x at timesteps t given context."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        mc = config.model_channels
        emb_channels = 4 * mc
        self.time_embed = nn.Sequential(
            nn.Linear(mc, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )
        if config.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(config.adm_in_channels, emb_channels),
                    nn.SiLU(),
                    nn.Linear(emb_channels, emb_channels),
                )
            )
        else:
            self.label_emb = None
        self.input_blocks, self.middle_block, skip_channels = build_encoder(config)

        self.output_blocks = nn.ModuleList()
        ch = skip_channels[-1]
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            depth = config.transformer_depth[level]
            for i in range(config.num_res_blocks + 1):
                skip = skip_channels.pop()
                layers: list[nn.Module] = [
                    ResBlock(ch + skip, emb_channels, mult * mc, config.norm_groups)
                ]
                ch = mult * mc
                if depth > 0:
                    layers.append(_transformer(config, ch, depth))
                if level > 0 and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepBlock(*layers))

        self.out = nn.Sequential(
            group_norm(ch, config.norm_groups),
            nn.SiLU(),
            nn.Conv2d(mc, config.out_channels, 3, padding=1),
        )
        self.uses_context = config.transformer_depth_middle > 0 or any(
            d > 0 for d in config.transformer_depth
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def embed(
        self, timesteps: torch.Tensor, y: torch.Tensor | None, batch_size: int
    ) -> torch.Tensor:
        """Time embedding (plus the `label_emb` of y, SDXL) -> [B, 4*model_channels]."""
        timesteps = torch.as_tensor(timesteps, device=self.time_embed[0].weight.device)
        if timesteps.ndim == 0 or timesteps.shape == (1,):
            timesteps = timesteps.reshape(1).expand(batch_size)
        elif timesteps.shape != (batch_size,):
            raise ValueError(
                f"UNet: timesteps must have shape [] or [{batch_size}], got {list(timesteps.shape)}"
            )
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(self.dtype)
        emb = self.time_embed(t_emb)
        if self.label_emb is not None:
            emb = emb + self.label_emb(y.to(self.dtype))
        return emb

    def _check_inputs(
        self, x: torch.Tensor, context: torch.Tensor | None, y: torch.Tensor | None
    ) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"UNet: x must have shape [B, {cfg.in_channels}, H, W], got {list(x.shape)}"
            )
        context_ok = context is not None and context.ndim == 3
        context_ok = context_ok and context.shape[-1] == cfg.context_dim
        if self.uses_context and not context_ok:
            got = None if context is None else list(context.shape)
            raise ValueError(
                f"UNet: context must have shape [B, tokens, {cfg.context_dim}], got {got}"
            )
        if cfg.adm_in_channels is None:
            if y is not None:
                raise ValueError("UNet: y was given but this model has no label_emb")
        elif y is None or y.shape != (x.shape[0], cfg.adm_in_channels):
            got = None if y is None else list(y.shape)
            raise ValueError(
                f"UNet: y must have shape [{x.shape[0]}, {cfg.adm_in_channels}], got {got}"
            )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        hooks: UNetHooks | None = None,
    ) -> torch.Tensor:
        """x [B, in_channels, H, W], timesteps [B] (0..999), context [B, M, context_dim],
        y [B, adm_in_channels] -> [B, out_channels, H, W] in x's dtype."""
        self._check_inputs(x, context, y)
        if hooks is not None and _hooks_are_empty(hooks):
            hooks = None
        control = None
        if hooks is not None and hooks.control is not None:
            control = hooks.control
            _check_control(control, len(self.input_blocks))

        emb = self.embed(timesteps, y, x.shape[0])
        h = x.to(self.dtype)
        if context is not None:
            context = context.to(self.dtype)

        skips = []
        for i, block in enumerate(self.input_blocks):
            if hooks is None:
                h = block(h, emb, context)
            else:
                block_id = BlockId("input", i)
                h = block(h, emb, context, hooks, block_id)
                if control is not None and control.input and control.input[i] is not None:
                    h = h + control.input[i]
                for patch in hooks.input_block_patches:
                    h = patch(h, block_id)
            skips.append(h)

        if hooks is None:
            h = self.middle_block(h, emb, context)
        else:
            block_id = BlockId("middle", 0)
            h = self.middle_block(h, emb, context, hooks, block_id)
            if control is not None and control.middle and control.middle[0] is not None:
                h = h + control.middle[0]
            for patch in hooks.middle_block_patches:
                h = patch(h, block_id)

        for j, block in enumerate(self.output_blocks):
            skip = skips.pop()
            block_id = None
            if hooks is not None:
                block_id = BlockId("output", j)
                if control is not None and control.output:
                    residual = control.output[len(skips)]  # input block that pushed `skip`
                    if residual is not None:
                        skip = skip + residual
                for patch in hooks.output_block_patches:
                    h, skip = patch(h, skip, block_id)
            upsample_size = skips[-1].shape[-2:] if skips else None
            h = block(torch.cat([h, skip], dim=1), emb, context, hooks, block_id, upsample_size)

        return self.out(h).to(x.dtype)
