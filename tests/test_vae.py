from __future__ import annotations

import math
import time
import warnings

import pytest
import torch

from ldm_core.config import SD_VAE, VAEConfig
from ldm_core.nn.autoencoder import AutoencoderKL, normalize_vae_state_dict

TINY = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
TINY_F2 = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)


def random_state_dict(config: VAEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights that keep activations O(1) but make every tensor matter (a wrong wiring shows)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoencoderKL(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith(".weight") and len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            sd[key] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        elif key.endswith(".weight"):  # GroupNorm
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            sd[key] = 0.1 * torch.randn(shape, generator=gen)
    return sd


def build(config: VAEConfig, sd: dict[str, torch.Tensor]) -> AutoencoderKL:
    with torch.device("meta"):
        model = AutoencoderKL(config)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_vae(config: VAEConfig, sd: dict[str, torch.Tensor]):
    """diffusers.AutoencoderKL loaded through diffusers' own single-file converter."""
    import diffusers
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        create_vae_diffusers_config_from_ldm,
    )

    ddconfig = {
        "double_z": True,
        "z_channels": config.z_channels,
        "resolution": 256,
        "in_channels": config.in_channels,
        "out_ch": config.out_ch,
        "ch": config.ch,
        "ch_mult": list(config.ch_mult),
        "num_res_blocks": config.num_res_blocks,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    original_config = {
        "model": {
            "params": {
                "scale_factor": config.scale_factor,
                "first_stage_config": {
                    "params": {"embed_dim": config.embed_dim, "ddconfig": ddconfig}
                },
            }
        }
    }
    checkpoint = {f"first_stage_model.{k}": v for k, v in sd.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dconfig = create_vae_diffusers_config_from_ldm(original_config, checkpoint, image_size=256)
    converted = convert_ldm_vae_checkpoint(checkpoint, dconfig)
    with torch.device("meta"):
        model = diffusers.AutoencoderKL(**dconfig)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval(), converted


@pytest.mark.parametrize("config", [TINY, SD_VAE], ids=["tiny", "sd"])
def test_parity_with_diffusers(config: VAEConfig):
    sd = random_state_dict(config)
    ours = build(config, sd)
    ref, _ = diffusers_vae(config, sd)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        t0 = time.perf_counter()
        mean = ours.encode(images)
        t1 = time.perf_counter()
        decoded = ours.decode(latents)
        t2 = time.perf_counter()
        ref_mean = ref.encode(images).latent_dist.mean
        ref_decoded = ref.decode(latents).sample
    print(f"\n{config.ch=} encode {t1 - t0:.3f}s decode {t2 - t1:.3f}s")
    print(
        f"rel err encode {rel_err(mean, ref_mean):.2e} decode {rel_err(decoded, ref_decoded):.2e}"
    )
    assert mean.shape == ref_mean.shape == (1, 4, 8, 8)
    assert decoded.shape == ref_decoded.shape == (1, 3, 64, 64)
    assert ref_mean.abs().max() > 0.1 and ref_decoded.abs().max() > 0.1
    assert rel_err(mean, ref_mean) <= 1e-4
    assert rel_err(decoded, ref_decoded) <= 1e-4


def test_linear_attention_weights_give_identical_outputs():
    sd = random_state_dict(TINY)
    linear = dict(sd)
    for part in ("encoder", "decoder"):
        for name in ("q", "k", "v", "proj_out"):
            key = f"{part}.mid.attn_1.{name}.weight"
            linear[key] = sd[key][:, :, 0, 0].clone()
            assert linear[key].ndim == 2
    model = build(TINY, sd)
    model_linear = build(TINY, normalize_vae_state_dict(linear))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(model.encode(images), model_linear.encode(images))
        assert torch.equal(model.decode(latents), model_linear.decode(latents))


def test_meta_construction_with_assign_reproduces_outputs():
    reference = AutoencoderKL(TINY).eval()
    sd = reference.state_dict()
    model = build(TINY, sd)
    assert all(p.device.type == "cpu" for p in model.parameters())
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(reference.encode(images), model.encode(images))
        assert torch.equal(reference(images), model(images))


def test_tiny_round_trip_shapes_and_sampling():
    model = build(TINY, random_state_dict(TINY))
    assert TINY.downscale == 8
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        mean, logvar = model.encode_moments(images)
        assert mean.shape == logvar.shape == (2, 4, 8, 8)
        assert model.decode(mean).shape == (2, 3, 64, 64)
        a = model.sample(images, generator=torch.Generator().manual_seed(3))
        b = model.sample(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, mean)
    # f=2 member of the same family
    small = build(TINY_F2, random_state_dict(TINY_F2))
    with torch.no_grad():
        z = small.encode(torch.zeros(1, 3, 16, 16))
        assert z.shape == (1, 4, 8, 8)
        assert small.decode(z).shape == (1, 3, 16, 16)


def test_logvar_is_clamped():
    sd = random_state_dict(TINY_F2)
    sd["quant_conv.bias"] = torch.tensor([0.0] * 4 + [1e4, -1e4, 1e4, -1e4])
    model = build(TINY_F2, sd)
    with torch.no_grad():
        _, logvar = model.encode_moments(torch.zeros(1, 3, 8, 8))
    assert logvar[:, 0::2].eq(20).all() and logvar[:, 1::2].eq(-30).all()


def test_training_keys_dropped():
    sd = random_state_dict(TINY_F2)
    extra = {
        "loss.logvar": torch.zeros(()),
        "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4),
        "loss.perceptual_loss.net.slice1.0.weight": torch.zeros(64, 3, 3, 3),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(0),
    }
    normalized = normalize_vae_state_dict({**sd, **extra})
    assert normalized.keys() == sd.keys()
    build(TINY_F2, normalized)
    # Keys we do not know are kept, so the strict load names them.
    with pytest.raises(RuntimeError, match="encoder.bogus"):
        build(TINY_F2, normalize_vae_state_dict({**sd, "encoder.bogus": torch.zeros(1)}))


def test_diffusers_layout_is_converted_back():
    sd = random_state_dict(TINY)
    _, converted = diffusers_vae(TINY, sd)
    assert "decoder.up_blocks.0.resnets.0.norm1.weight" in converted
    assert converted["encoder.mid_block.attentions.0.to_q.weight"].ndim == 2
    back = normalize_vae_state_dict(converted)
    assert back.keys() == sd.keys()
    for key, value in sd.items():
        assert torch.equal(back[key], value), key


def test_fp16_weights_run():
    sd = random_state_dict(TINY)
    model32 = build(TINY, sd)
    model16 = build(TINY, {k: v.half() for k, v in sd.items()})
    assert model16.dtype == torch.float16
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    latents = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        mean16 = model16.encode(images)  # fp32 input is cast to the weights' dtype
        out16 = model16.decode(latents)
        mean32 = model32.encode(images)
        out32 = model32.decode(latents)
    assert mean16.dtype == out16.dtype == torch.float16
    assert torch.isfinite(out16).all()
    assert rel_err(mean16.float(), mean32) < 2e-2
    assert rel_err(out16.float(), out32) < 2e-2


def test_bad_input_shape_raises():
    model = build(TINY_F2, random_state_dict(TINY_F2))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="latents"):
        model.decode(torch.zeros(4, 8, 8))
