"""Frozen configuration dataclasses for the networks and the model families."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Family(str, Enum):
    """Model families we recognise from a checkpoint's keys and shapes."""

    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl_refiner"


class Prediction(str, Enum):
    """What the UNet predicts: noise (eps) or velocity (v)."""

    EPS = "eps"
    V = "v"


@dataclass(frozen=True)
class UNetConfig:
    """openaimodel.UNetModel hyper-parameters (names follow the original yaml configs).

    `transformer_depth[i]` is the number of transformer blocks in each attention block of level
    i (0 = no attention at that level); output blocks mirror the input blocks of their level.
    `num_head_channels == -1` means a fixed `num_heads` per level (SD1); otherwise heads have
    `num_head_channels` channels each (SD2, SDXL).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1  # -1: middle block without a transformer
    context_dim: int = 768
    num_heads: int = 8
    num_head_channels: int = -1
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None
    norm_groups: int = 32

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(num_heads, head_dim) of an attention layer with `channels` channels."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        heads = max(1, channels // self.num_head_channels)  # narrow test configs: one head
        return heads, channels // heads


@dataclass(frozen=True)
class VAEConfig:
    """KL autoencoder (ldm.models.autoencoder.AutoencoderKL) hyper-parameters."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scale_factor: float = 0.18215

    @property
    def downscale(self) -> int:
        """Pixel size of one latent cell (8 for every SD family)."""
        return 2 ** (len(self.ch_mult) - 1)


class TextEncoderKind(str, Enum):
    """How a text encoder is stored in a checkpoint."""

    CLIP_HF = "clip_hf"  # transformers CLIPTextModel layout (SD1 `cond_stage_model.transformer.`)
    OPEN_CLIP = "open_clip"  # OpenCLIP text tower (SD2 `cond_stage_model.model.`)


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text transformer, always run as a transformers `CLIPTextModel`.

    `layer_from_end` picks the hidden state used as UNet context with clip skip 1
    (1 = last layer, SD1; 2 = penultimate, SD2), `final_norm` whether the final LayerNorm is
    applied to it, `pad_token_id` the id after EOS (49407 for CLIP-L, 0 for OpenCLIP).
    """

    kind: TextEncoderKind = TextEncoderKind.CLIP_HF
    prefix: str = "cond_stage_model.transformer."
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    hidden_act: str = "quick_gelu"
    projection_dim: int | None = None
    layer_from_end: int = 1
    final_norm: bool = True
    pad_token_id: int = 49407


@dataclass(frozen=True)
class ModelSpec:
    """Everything detection infers about a single-file checkpoint."""

    family: Family
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: tuple[TextEncoderConfig, ...]
    prediction: Prediction = Prediction.EPS
    zero_terminal_snr: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def is_inpainting(self) -> bool:
        return self.unet.in_channels == 9


# Full-size configurations of the supported families (ldm-formats.md §1.3).
SD1_UNET = UNetConfig()
SD2_UNET = UNetConfig(
    context_dim=1024, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True
)
SD_VAE = VAEConfig()
CLIP_L = TextEncoderConfig()
OPEN_CLIP_H = TextEncoderConfig(
    kind=TextEncoderKind.OPEN_CLIP,
    prefix="cond_stage_model.model.",
    hidden_size=1024,
    intermediate_size=4096,
    num_layers=24,
    num_heads=16,
    hidden_act="gelu",
    projection_dim=1024,
    layer_from_end=2,
    final_norm=True,
    pad_token_id=0,
)
