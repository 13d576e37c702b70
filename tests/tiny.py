"""Tiny random-weight models built from our real classes, shared by the tests."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ldm_core.config import OPEN_CLIP_H, TextEncoderConfig, UNetConfig, VAEConfig
from ldm_core.loader import save_components
from ldm_core.nn.autoencoder import AutoencoderKL
from ldm_core.nn.text_encoders import TextEncoder
from ldm_core.nn.unet import UNetModel

TINY_UNET = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    transformer_depth=(1, 0),
    transformer_depth_middle=1,
    context_dim=64,
)
TINY_UNET_SD2 = replace(
    TINY_UNET, model_channels=64, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True
)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
TINY_CLIP = TextEncoderConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=1)
TINY_OPEN_CLIP = replace(
    OPEN_CLIP_H, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=1, projection_dim=64
)


def random_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    with torch.device("meta"):
        enc = TextEncoder(cfg)
    sd = {}
    for k, v in enc.to_original_state_dict().items():
        sd[k] = torch.randn(v.shape) * (0.02 if "embedding" in k else 0.2)
    return TextEncoder.from_state_dict(cfg, sd, device="cpu", dtype=torch.float32, source="test")


def write_tiny(path: Path, unet_cfg=TINY_UNET, text_cfg=TINY_CLIP, dtype=None, **kw) -> tuple:
    unet = UNetModel(unet_cfg).eval()
    vae = AutoencoderKL(TINY_VAE).eval()
    enc = random_text_encoder(text_cfg).eval()
    save_components(path, unet=unet, vae=vae, text_encoder=enc, dtype=dtype, **kw)
    return unet, vae, enc
