"""Loading: detection of every family, round trips, bad files, dtype casting, VAE swap, hashes."""

from __future__ import annotations

import hashlib
import pickle
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ldm_core
from ldm_core import detect, weights
from ldm_core.config import (
    CLIP_L,
    OPEN_CLIP_H,
    SD1_UNET,
    SD2_UNET,
    SD_VAE,
    Family,
    Prediction,
    TextEncoderConfig,
    UNetConfig,
)
from ldm_core.loader import load_vae_file
from ldm_core.nn.autoencoder import AutoencoderKL
from ldm_core.nn.text_encoders import TextEncoder
from ldm_core.nn.unet import UNetModel
from ldm_core.weights import CheckpointError
from tests.tiny import TINY_CLIP, TINY_OPEN_CLIP, TINY_UNET, TINY_UNET_SD2, TINY_VAE, write_tiny


def _outputs(unet, vae, enc, context_dim: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, context_dim, generator=g)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368] + [49407] * 71])
    with torch.no_grad():
        return [
            unet(x, torch.tensor([500.0]), context=ctx),
            vae.encode(img),
            vae.decode(x),
            enc(ids),
        ]


@pytest.mark.parametrize(
    ("unet_cfg", "text_cfg", "family"),
    [(TINY_UNET, TINY_CLIP, Family.SD1), (TINY_UNET_SD2, TINY_OPEN_CLIP, Family.SD2)],
)
def test_save_load_round_trip_identical_outputs(tmp_path, unet_cfg, text_cfg, family):
    if family is Family.SD2:
        text_cfg = replace(text_cfg, hidden_size=64)
        unet_cfg = replace(unet_cfg, context_dim=64)
    path = tmp_path / "tiny.safetensors"
    unet, vae, enc = write_tiny(path, unet_cfg, text_cfg)
    ckpt = ldm_core.load_checkpoint(path, device="cpu")
    assert ckpt.family is family
    assert ckpt.config.unet == unet_cfg
    assert ckpt.config.vae == TINY_VAE
    assert ckpt.config.text_encoders[0] == text_cfg
    assert ckpt.dtype == torch.float32
    want = _outputs(unet, vae, enc, unet_cfg.context_dim)
    got = _outputs(ckpt.unet, ckpt.vae, ckpt.text_encoders[0], unet_cfg.context_dim)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
    # and our own save of the loaded model loads back to the same numbers
    again = tmp_path / "again.safetensors"
    ldm_core.loader.save_checkpoint(ckpt, again)
    ckpt2 = ldm_core.load_checkpoint(again, device="cpu")
    for a, b in zip(
        got,
        _outputs(ckpt2.unet, ckpt2.vae, ckpt2.text_encoders[0], unet_cfg.context_dim),
        strict=True,
    ):
        assert torch.equal(a, b)


def _shapes(module, prefix: str) -> dict[str, tuple[int, ...]]:
    return {prefix + k: v for k, v in weights.module_shapes(module).items()}


def _full_shapes(unet_cfg: UNetConfig, text_cfg: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        shapes = _shapes(UNetModel(unet_cfg), detect.UNET_PREFIX)
        shapes.update(_shapes(AutoencoderKL(SD_VAE), detect.VAE_PREFIX))
        enc = TextEncoder(text_cfg)
    shapes.update(
        {text_cfg.prefix + k: tuple(v.shape) for k, v in enc.to_original_state_dict().items()}
    )
    return shapes


@pytest.mark.parametrize(
    ("unet_cfg", "text_cfg", "family"),
    [
        (SD1_UNET, CLIP_L, Family.SD1),
        (replace(SD1_UNET, in_channels=9), CLIP_L, Family.SD1),
        (SD2_UNET, OPEN_CLIP_H, Family.SD2),
        (replace(SD2_UNET, in_channels=9), OPEN_CLIP_H, Family.SD2),
    ],
)
def test_detect_full_size_families(unet_cfg, text_cfg, family):
    spec = detect.detect_model(_full_shapes(unet_cfg, text_cfg))
    assert spec.family is family
    assert spec.unet == unet_cfg
    assert spec.vae == SD_VAE
    assert spec.text_encoders[0] == text_cfg
    assert spec.is_inpainting == (unet_cfg.in_channels == 9)


def test_detect_shrunken_config_and_prediction_markers():
    cfg = replace(TINY_UNET, channel_mult=(1, 2, 3), transformer_depth=(2, 1, 0), num_res_blocks=2)
    with torch.device("meta"):
        shapes = _shapes(UNetModel(cfg), detect.UNET_PREFIX)
        shapes.update(_shapes(AutoencoderKL(TINY_VAE), detect.VAE_PREFIX))
        enc = TextEncoder(TINY_CLIP)
    shapes.update(
        {TINY_CLIP.prefix + k: tuple(v.shape) for k, v in enc.to_original_state_dict().items()}
    )
    spec = detect.detect_model(shapes)
    assert spec.unet == cfg and spec.vae == TINY_VAE and spec.prediction is Prediction.EPS
    spec_v = detect.detect_model({**shapes, "v_pred": (0,)})
    assert spec_v.prediction is Prediction.V


def test_fp16_file_is_cast_to_compute_dtype(tmp_path):
    path = tmp_path / "half.safetensors"
    unet, vae, enc = write_tiny(path, dtype=torch.float16)
    with weights.WeightFile(path) as wf:
        assert wf.dtype(detect.UNET_PREFIX + "out.2.weight") == torch.float16
    ckpt = ldm_core.load_checkpoint(path, device="cpu")
    assert all(p.dtype == torch.float32 for p in ckpt.unet.parameters())
    assert all(p.dtype == torch.float32 for p in ckpt.vae.parameters())
    ref = unet.out[2].weight.detach().half().float()
    assert torch.equal(ckpt.unet.out[2].weight, ref)
    ckpt16 = ldm_core.load_checkpoint(path, device="cpu", dtype="bf16")
    assert ckpt16.unet.out[2].weight.dtype == torch.bfloat16


def test_separate_vae_replaces_checkpoint_vae(tmp_path):
    path = tmp_path / "model.safetensors"
    write_tiny(path)
    other = AutoencoderKL(TINY_VAE).eval()
    vae_path = tmp_path / "other.vae.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(vae_path))
    ckpt = ldm_core.load_checkpoint(path, vae=vae_path, device="cpu")
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(ckpt.vae.decode(x), other.decode(x))
    assert (
        ckpt.vae_path == vae_path
        and ckpt.vae_sha256 == hashlib.sha256(vae_path.read_bytes()).hexdigest()
    )
    # 2-D attention weights (diffusers-style re-saves) are accepted in a VAE file
    sd = {
        k: (v.squeeze(-1).squeeze(-1) if ".attn_1." in k and v.dim() == 4 else v)
        for k, v in other.state_dict().items()
    }
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "flat.safetensors"))
    vae2, _ = load_vae_file(tmp_path / "flat.safetensors", device="cpu")
    with torch.no_grad():
        assert torch.equal(vae2.decode(x), other.decode(x))


def test_ema_and_schedule_keys_are_ignored(tmp_path):
    path = tmp_path / "ema.safetensors"
    write_tiny(path)
    from safetensors.torch import load_file

    sd = load_file(str(path))
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.diffusion_modelout2weight"] = torch.zeros(3)
    sd["alphas_cumprod"] = torch.rand(1000)
    sd["betas"] = torch.rand(1000)
    sd[TINY_CLIP.prefix + "text_model.embeddings.position_ids"] = torch.arange(77.0)[None]
    save_file(sd, str(path))
    ckpt = ldm_core.load_checkpoint(path, device="cpu")
    assert ckpt.family is Family.SD1


# -- bad files ------------------------------------------------------------------------------------


def test_truncated_file(tmp_path):
    path = tmp_path / "t.safetensors"
    write_tiny(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        ldm_core.load_checkpoint(path, device="cpu")
    assert str(path) in str(e.value)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        ldm_core.load_checkpoint(path, device="cpu")
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="truncated"):
        ldm_core.load_checkpoint(short, device="cpu")
    bad_json = tmp_path / "json.safetensors"
    bad_json.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(CheckpointError, match="bad header"):
        ldm_core.load_checkpoint(bad_json, device="cpu")


def test_missing_file():
    with pytest.raises(CheckpointError, match="file not found"):
        ldm_core.load_checkpoint("/nonexistent/model.safetensors", device="cpu")


def test_lora_offered_as_checkpoint(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        },
        str(path),
    )
    with pytest.raises(CheckpointError, match="LoRA"):
        ldm_core.load_checkpoint(path, device="cpu")


def test_vae_offered_as_checkpoint(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file(
        {k: v.contiguous() for k, v in AutoencoderKL(TINY_VAE).state_dict().items()}, str(path)
    )
    with pytest.raises(CheckpointError, match="VAE file"):
        ldm_core.load_checkpoint(path, device="cpu")


def test_missing_and_misshaped_keys_are_listed(tmp_path):
    path = tmp_path / "m.safetensors"
    write_tiny(path)
    from safetensors.torch import load_file

    sd = load_file(str(path))
    del sd[detect.UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"]
    save_file(sd, str(path))
    with pytest.raises(
        CheckpointError,
        match=r"1 missing key\(s\): input_blocks\.1\.1\.transformer_blocks\.0\.attn1\.to_q\.weight",
    ) as e:
        ldm_core.load_checkpoint(path, device="cpu")
    assert "UNet" in str(e.value) and str(path) in str(e.value)

    path2 = tmp_path / "s.safetensors"
    write_tiny(path2)
    sd = load_file(str(path2))
    key = detect.UNET_PREFIX + "input_blocks.1.0.emb_layers.1.bias"
    sd[key] = torch.zeros(sd[key].shape[0] + 1)
    save_file(sd, str(path2))
    with pytest.raises(
        CheckpointError,
        match=r"mis-shaped key\(s\): input_blocks\.1\.0\.emb_layers\.1\.bias: file \[33\], model \[32\]",
    ):
        ldm_core.load_checkpoint(path2, device="cpu")


class _Evil:
    marker: Path = Path("/tmp/never")

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(2)}, "payload": evil}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        ldm_core.load_checkpoint(path, device="cpu")
    assert not marker.exists(), "the pickle was executed"
    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps(evil))
    with pytest.raises(CheckpointError):
        ldm_core.load_checkpoint(raw, device="cpu")
    assert not marker.exists()


def test_legacy_ckpt_with_plain_tensors_loads(tmp_path):
    st = tmp_path / "m.safetensors"
    unet, vae, enc = write_tiny(st)
    from safetensors.torch import load_file

    ck = tmp_path / "m.ckpt"
    torch.save({"state_dict": load_file(str(st)), "global_step": 10}, ck)
    ckpt = ldm_core.load_checkpoint(ck, device="cpu")
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(ckpt.vae.decode(x), vae.decode(x))


def test_sha256_and_model_hash_cached(tmp_path, monkeypatch):
    path = tmp_path / "h.safetensors"
    write_tiny(path)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    cache = weights.HashCache(tmp_path / "cache.json")
    ckpt = ldm_core.load_checkpoint(path, device="cpu", hash_cache=cache)
    assert ckpt.sha256 == want and ckpt.model_hash == want[:10]
    calls = []
    monkeypatch.setattr(weights, "sha256_file", lambda p, *a: calls.append(p) or "x")
    assert weights.HashCache(tmp_path / "cache.json").sha256(path) == want  # from the file cache
    assert calls == []


def test_text_encoder_width_mismatch_is_reported(tmp_path):
    path = tmp_path / "mismatch.safetensors"
    write_tiny(path, text_cfg=replace(TINY_CLIP, hidden_size=128, num_heads=2))
    with pytest.raises(
        CheckpointError, match="64-wide text features but the text encoder is 128 wide"
    ):
        ldm_core.load_checkpoint(path, device="cpu")
