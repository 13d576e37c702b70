"""Benchmark: a 20-step txt2img at 256x256 on random SD1.5-size weights.

    venv/bin/python bench/bench_pipeline.py [--file /tmp/sd15-fp16.safetensors] [--steps 20] [--size 256]

Reports (1) our total time and the share spent outside the UNet, the VAE and the text encoder
(the sampling loop, guidance, conditioning glue, image conversion), measured with forward hooks;
(2) diffusers' StableDiffusionPipeline on identical weights (converted with diffusers' own
single-file converters, DPM++ 2M Karras, same size/steps/CFG) in the same run, as the reference
ratio. Uses the random-weight file written by bench/bench_load.py (created if missing).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Timer:
    """Wall time spent inside the forward of the given modules (outermost calls only)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.totals = dict.fromkeys(modules, 0.0)
        self._start: dict[str, float] = {}
        self._depth = 0
        for name, m in modules.items():
            m.register_forward_pre_hook(self._pre(name))
            m.register_forward_hook(self._post(name))

    def _pre(self, name):
        def hook(module, args):
            self._start[name] = time.perf_counter()

        return hook

    def _post(self, name):
        def hook(module, args, out):
            self.totals[name] += time.perf_counter() - self._start.pop(name)

        return hook


def run_ours(path: Path, steps: int, size: int) -> dict:
    import ldm_core
    from ldm_core import pipeline

    ckpt = ldm_core.load_checkpoint(path, device="cpu", dtype=torch.float32)
    # The VAE is called through encode/decode, not forward: time its decoder and encoder.
    timer = Timer(
        {
            "unet": ckpt.unet,
            "vae_dec": ckpt.vae.decoder,
            "vae_post": ckpt.vae.post_quant_conv,
            "text": ckpt.text_encoders[0],
        }
    )
    params = pipeline.GenerationParams(
        prompt="a photo of a cat sitting on a wooden table, highly detailed",
        negative_prompt="blurry",
        steps=steps,
        width=size,
        height=size,
        seed=1,
        cfg_scale=7.0,
        sampler_name="DPM++ 2M",
        scheduler="Karras",
    )
    pipeline.txt2img(
        ckpt, pipeline.GenerationParams(steps=1, width=64, height=64, seed=0)
    )  # warm-up
    timer.totals = dict.fromkeys(timer.totals, 0.0)
    t0 = time.perf_counter()
    result = pipeline.txt2img(ckpt, params)
    total = time.perf_counter() - t0
    assert result.images[0].size == (size, size)
    networks = sum(timer.totals.values())
    return {"total": total, "networks": networks, "overhead": total - networks, **timer.totals}


def run_diffusers(path: Path, steps: int, size: int) -> float:
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_core.tokenizer import get_tokenizer

    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    ldm_cfg = {
        "model": {
            "params": {
                "unet_config": {
                    "params": {
                        "image_size": 32,
                        "in_channels": 4,
                        "out_channels": 4,
                        "model_channels": 320,
                        "attention_resolutions": [4, 2, 1],
                        "num_res_blocks": 2,
                        "channel_mult": [1, 2, 4, 4],
                        "num_heads": 8,
                        "use_spatial_transformer": True,
                        "transformer_depth": 1,
                        "context_dim": 768,
                        "use_checkpoint": False,
                        "legacy": False,
                    }
                },
                "first_stage_config": {
                    "params": {
                        "embed_dim": 4,
                        "ddconfig": {
                            "double_z": True,
                            "z_channels": 4,
                            "resolution": 256,
                            "in_channels": 3,
                            "out_ch": 3,
                            "ch": 128,
                            "ch_mult": [1, 2, 4, 4],
                            "num_res_blocks": 2,
                            "attn_resolutions": [],
                            "dropout": 0.0,
                        },
                    }
                },
                "scale_factor": 0.18215,
            }
        }
    }
    unet_cfg = create_unet_diffusers_config_from_ldm(ldm_cfg, sd)
    unet = UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, unet_cfg))
    vae_cfg = create_vae_diffusers_config_from_ldm(ldm_cfg, sd)
    vae = AutoencoderKL(**vae_cfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, vae_cfg))
    te = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    )
    te_sd = {
        k[len("cond_stage_model.transformer.") :]: v
        for k, v in sd.items()
        if k.startswith("cond_stage_model.transformer.")
    }
    te_sd = {k.removeprefix("text_model."): v for k, v in te_sd.items()}
    te_sd = {k: v for k, v in te_sd.items() if "position_ids" not in k}
    if hasattr(te, "text_model"):
        te.text_model.load_state_dict(te_sd)
    else:
        te.load_state_dict(te_sd)
    sched = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", use_karras_sigmas=True
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=get_tokenizer(),
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    kwargs = {
        "prompt": "a photo of a cat sitting on a wooden table, highly detailed",
        "negative_prompt": "blurry",
        "guidance_scale": 7.0,
        "height": size,
        "width": size,
    }
    pipe(
        num_inference_steps=1,
        generator=torch.Generator().manual_seed(0),
        **{**kwargs, "height": 64, "width": 64},
    )
    t0 = time.perf_counter()
    pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(1), **kwargs)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", type=Path, default=Path("/tmp/sd15-fp16.safetensors"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--only", choices=["ours", "diffusers"], help="run one side only")
    args = ap.parse_args()
    if not args.file.exists():
        from bench.bench_load import write_file

        write_file(args.file)
    ours = None
    if args.only != "diffusers":
        ours = run_ours(args.file, args.steps, args.size)
        print(
            f"ours: {args.steps}-step txt2img {args.size}x{args.size}: {ours['total']:.1f}s total; "
            f"UNet {ours['unet']:.1f}s, VAE {ours['vae_dec'] + ours['vae_post']:.2f}s, text encoder {ours['text']:.2f}s; "
            f"everything else {ours['overhead']:.2f}s = {100 * ours['overhead'] / ours['total']:.2f}% of the total"
        )
    if args.only != "ours":
        ref = run_diffusers(args.file, args.steps, args.size)
        ratio = f"; ours/diffusers = {ours['total'] / ref:.2f}" if ours else ""
        print(f"diffusers StableDiffusionPipeline, same weights and settings: {ref:.1f}s{ratio}")


if __name__ == "__main__":
    main()
