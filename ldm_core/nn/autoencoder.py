"""KL autoencoder of latent diffusion (ldm.models.autoencoder.AutoencoderKL).

Module attributes are named exactly as the original checkpoint keys after `first_stage_model.`
(`encoder.down.0.block.1.conv2.weight`, `decoder.up.3.upsample.conv.weight`, ...), so a
prefix-stripped, `normalize_vae_state_dict`-ed state dict loads strictly. Latents in and out of
this module are unscaled: multiplying by `VAEConfig.scale_factor` is the caller's job.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ldm_core.config import VAEConfig

Tensor = torch.Tensor

_NORM_EPS = 1e-6
_LOGVAR_RANGE = (-30.0, 20.0)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=_NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 `nin_shortcut` when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; projections are 1x1 convs."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, 1, H*W, C]
            return t.reshape(b, 1, c, height * width).transpose(2, 3)

        h = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        h = h.transpose(2, 3).reshape(b, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom only (the original asymmetry)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> moments [B, 2*z_channels, H/f, W/f]."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups = config.ch, config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(config.ch_mult):
            block_out = ch * mult
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, groups))
                block_in = block_out
            if level != len(config.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = MidBlock(block_in, groups)
        self.norm_out = _group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_ch, h*f, w*f].

    `up[i]` works at the resolution of `encoder.down[i]`; it runs from the last index (lowest
    resolution) to `up[0]`, as in the original checkpoints.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups = config.ch, config.norm_groups
        block_in = ch * config.ch_mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, groups)
        stages: list[nn.Module] = []
        for level in reversed(range(len(config.ch_mult))):
            block_out = ch * config.ch_mult[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, groups))
                block_in = block_out
            if level != 0:
                stage.upsample = Upsample(block_in)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = _group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The SD VAE. Images are in [-1, 1]; latents are unscaled (no `scale_factor`)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def _check_input(self, x: Tensor, channels: int, what: str) -> Tensor:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(
                f"AutoencoderKL: expected {what} of shape [B, {channels}, H, W], "
                f"got {tuple(x.shape)}"
            )
        return x.to(device=self.quant_conv.weight.device, dtype=self.dtype)

    def encode_moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior (mean, logvar), each [B, embed_dim, H/f, W/f]; logvar clamped to [-30, 20]."""
        x = self._check_input(images, self.config.in_channels, "images")
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*_LOGVAR_RANGE)

    def encode(self, images: Tensor) -> Tensor:
        """Deterministic encoding: the posterior mean (unscaled latents)."""
        return self.encode_moments(images)[0]

    def sample(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A draw from the posterior, mean + std * N(0, 1) (unscaled latents).

        The noise is drawn in fp32 on the generator's device, so a seed gives the same latents
        whatever device or dtype the model runs in.
        """
        mean, logvar = self.encode_moments(images)
        device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32)
        return mean + torch.exp(0.5 * logvar) * noise.to(mean)

    def decode(self, latents: Tensor) -> Tensor:
        """Unscaled latents [B, embed_dim, h, w] -> images [B, out_ch, h*f, w*f], about [-1, 1].

        Not clamped: callers clamp when converting to pixels.
        """
        z = self._check_input(latents, self.config.embed_dim, "latents")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images))

    @staticmethod
    def normalize_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
        return normalize_vae_state_dict(sd)


# Keys some files carry that no VAE uses (A1111 modules/sd_vae.py ignores the same ones).
_IGNORED_KEYS = {"model_ema.decay", "model_ema.num_updates"}
_MID_ATTN_PROJ = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")

# diffusers AutoencoderKL names -> original names (ldm-formats.md §1.4). `up_blocks` indices
# are reversed separately because they count from the lowest resolution.
_DIFFUSERS_RENAMES = [
    (re.compile(r"\.down_blocks\.(\d+)\.resnets\.(\d+)\."), r".down.\1.block.\2."),
    (re.compile(r"\.down_blocks\.(\d+)\.downsamplers\.0\.conv\."), r".down.\1.downsample.conv."),
    (re.compile(r"\.mid_block\.resnets\.0\."), ".mid.block_1."),
    (re.compile(r"\.mid_block\.resnets\.1\."), ".mid.block_2."),
    (re.compile(r"\.mid_block\.attentions\.0\.group_norm\."), ".mid.attn_1.norm."),
    (re.compile(r"\.mid_block\.attentions\.0\.(to_q|query)\."), ".mid.attn_1.q."),
    (re.compile(r"\.mid_block\.attentions\.0\.(to_k|key)\."), ".mid.attn_1.k."),
    (re.compile(r"\.mid_block\.attentions\.0\.(to_v|value)\."), ".mid.attn_1.v."),
    (re.compile(r"\.mid_block\.attentions\.0\.(to_out\.0|proj_attn)\."), ".mid.attn_1.proj_out."),
    (re.compile(r"\.conv_shortcut\."), ".nin_shortcut."),
    (re.compile(r"\.conv_norm_out\."), ".norm_out."),
]
_DIFFUSERS_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.")


def _is_diffusers_layout(sd: dict[str, Tensor]) -> bool:
    return any(
        k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block."))
        for k in sd
    )


def _from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    up_indices = {int(m.group(1)) for k in sd if (m := _DIFFUSERS_UP.match(k))}
    num_up = max(up_indices) + 1 if up_indices else 0

    def rename_up(m: re.Match) -> str:
        level = num_up - 1 - int(m.group(1))
        if m.group(2) == "resnets":
            return f"decoder.up.{level}.block.{m.group(3)}."
        return f"decoder.up.{level}.upsample."

    out = {}
    for key, value in sd.items():
        new = _DIFFUSERS_UP.sub(rename_up, key)
        for pattern, repl in _DIFFUSERS_RENAMES:
            new = pattern.sub(repl, new)
        out[new] = value
    return out


def normalize_vae_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Bring a prefix-stripped VAE state dict to the layout `AutoencoderKL` loads strictly.

    Accepts the variants real files contain: training-only `loss.*` / `model_ema.*` counters
    (dropped), mid-attention q/k/v/proj_out stored as Linear `[C, C]` (or Conv1d `[C, C, 1]`)
    weights (reshaped to `[C, C, 1, 1]`), and diffusers-layout standalone VAEs (renamed).
    Unknown keys are kept so that the strict load names them. Tensors are not copied.
    """
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.") and k not in _IGNORED_KEYS}
    if _is_diffusers_layout(sd):
        sd = _from_diffusers(sd)
    out = {}
    for key, value in sd.items():
        if _MID_ATTN_PROJ.match(key) and value.ndim in (2, 3):
            value = value.reshape(*value.shape[:2], 1, 1)
        out[key] = value
    return out
