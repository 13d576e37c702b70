"""txt2img, img2img and inpainting (with outpainting and hires fix) as plain functions.

Each pipeline takes a loaded `Checkpoint` (or a patched `ModelHandle`) and one typed
`GenerationParams`, and returns a `GenerationResult`: PIL images, the seeds actually used, and
each image's infotext, built from a record of every parameter that shaped it. Semantics follow
AUTOMATIC1111 where users compare results: per-image seeds (seed + index), CPU noise, the
img2img step rule, masked-content modes, "only masked" inpainting with padding and paste-back.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from ldm_core import conditioning, images, infotext, rng, samplers, schedules
from ldm_core.config import Prediction
from ldm_core.denoiser import GuidedDenoiser, cfg_rescale
from ldm_core.images import (
    outpaint_pad,
    pil_to_tensor,
    resize_image,
    tensor_to_pil,
)
from ldm_core.params import (
    LATENT_UPSCALERS,
    MASKED_CONTENT,
    MAX_BATCH,
    MAX_PIXELS,
    MAX_STEPS,
    PIXEL_UPSCALERS,
    RESIZE_MODES,
    VERSION,
    CancelToken,
    GenerationError,
    GenerationParams,
    GenerationResult,
    Interrupted,
    OnStep,
    ProgressEvent,
    validate,
)
from ldm_core.patcher import ModelHandle, PostCFGArgs

log = logging.getLogger(__name__)

# Linear latent -> RGB factors for the SD1/SD2 VAE latent space (ldm-formats.md §7.2).
SD_LATENT_RGB = torch.tensor(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)


# -- previews -------------------------------------------------------------------------------------


def latent_preview(checkpoint, latents: torch.Tensor, method: str = "auto") -> Image.Image:
    """Preview of the first image of a batch of model-space latents (cheap or full decode)."""
    small_vae = sum(p.numel() for p in checkpoint.vae.parameters()) < 10_000_000
    use_full = method == "full" or (
        method == "auto"
        and (small_vae or latents.shape[1] != 4 or checkpoint.scale_factor != 0.18215)
    )
    if use_full:
        with torch.no_grad():
            img = checkpoint.vae.decode(
                (latents[:1] / checkpoint.scale_factor).to(checkpoint.vae.dtype)
            )
        return tensor_to_pil(img)[0]
    rgb = torch.einsum("chw,cr->rhw", latents[0].float().cpu(), SD_LATENT_RGB)
    return tensor_to_pil(rgb[None])[0]


# -- the shared sampling core --------------------------------------------------------------------


def _handle_for(model) -> ModelHandle:
    if isinstance(model, ModelHandle):
        return model
    return ModelHandle(model, schedules.ModelSampling.from_spec(model.spec))


@dataclass
class _Job:
    handle: ModelHandle
    params: GenerationParams
    on_step: OnStep | None
    cancel: CancelToken
    started: float
    batch_index: int = 0
    phase: str = "sampling"


def _sample(
    job: _Job,
    *,
    cond,
    uncond,
    noise_rng: rng.ImageRNG,
    steps: int,
    init_latent: torch.Tensor | None = None,
    denoising_strength: float = 1.0,
    latent_mask: torch.Tensor | None = None,
    concat: torch.Tensor | None = None,
    fill_noise_mask: bool = False,
) -> torch.Tensor:
    """Run one batch through the sampler. `latent_mask` (1 = repaint) blends the denoised
    estimate with `init_latent` after every step and at the end."""
    p = job.params
    handle = job.handle.clone()
    sampler_name, schedule = samplers.resolve_sampler_name(p.sampler_name, p.scheduler)
    info = samplers.SAMPLER_INFO[sampler_name]
    ms = handle.model_sampling
    if info.model_sampling == "lcm" and not ms.lcm_boundary:
        ms = ms.lcm()
        handle.model_sampling = ms
    device = handle.checkpoint.device
    img2img = init_latent is not None
    if img2img:
        # A1111: t_enc = int(min(strength, 0.999) * steps); run the last t_enc + 1 sigmas.
        t_enc = int(min(denoising_strength, 0.999) * steps)
        full = samplers.sampling_sigmas(sampler_name, schedule, steps, ms)
        sigmas = full[len(full) - t_enc - 2 :]
    else:
        sigmas = samplers.sampling_sigmas(sampler_name, schedule, steps, ms)
    sigmas = sigmas.to(torch.float32)
    noise = noise_rng.first().to(device, torch.float32)
    if img2img:
        x = init_latent + noise * sigmas[0]
        if fill_noise_mask and latent_mask is not None:
            x = init_latent * (1 - latent_mask) + noise * latent_mask * sigmas[0]
    else:
        x = noise * sigmas[0]
        if (
            handle.checkpoint.prediction is Prediction.V
            and handle.checkpoint.spec.zero_terminal_snr
        ):
            x = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    if p.cfg_rescale > 0:
        handle.add_post_cfg_function(cfg_rescale(p.cfg_rescale))
    if latent_mask is not None and init_latent is not None:
        keep = (1 - latent_mask).to(device)
        original = init_latent.to(device)
        handle.add_post_cfg_function(lambda a: _blend(a, original, keep))
    denoiser = GuidedDenoiser(
        handle,
        cond,
        uncond if p.cfg_scale != 1.0 or handle.patches.cfg_function else None,
        p.cfg_scale,
        sigmas,
        concat=concat,
    )
    noise_sampler = (
        noise_rng.brownian_noise_sampler(sigmas)
        if info.brownian_noise
        else noise_rng.noise_sampler()
    )
    total = len(sigmas) - 1

    def callback(state: dict) -> None:
        i = int(state["i"])
        for fn in handle.patches.step_callbacks:
            fn(i, total, state["sigma"], state["x"], state["denoised"])
        if job.on_step is not None:
            preview = None
            if p.preview_every and ((i + 1) % p.preview_every == 0) and i + 1 < total:
                preview = latent_preview(handle.checkpoint, state["denoised"], p.preview_method)
            job.on_step(
                ProgressEvent(
                    i + 1,
                    total,
                    job.batch_index,
                    p.n_iter,
                    float(state["sigma"]),
                    time.perf_counter() - job.started,
                    preview,
                    job.phase,
                )
            )
        job.cancel.check()

    job.cancel.check()
    with torch.no_grad(), handle.weights_patched():
        samples = info.function(
            denoiser,
            x,
            sigmas.to(device),
            extra_args={},
            callback=callback,
            noise_sampler=noise_sampler,
        )
    if latent_mask is not None and init_latent is not None:
        samples = init_latent * (1 - latent_mask) + samples * latent_mask
    return samples


def _blend(args: PostCFGArgs, original: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return original * keep + args.denoised * (1 - keep)


def _decode(checkpoint, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (
            checkpoint.vae.decode((latents / checkpoint.scale_factor).to(checkpoint.vae.dtype))
            .float()
            .cpu()
        )


def _encode(checkpoint, images: torch.Tensor) -> torch.Tensor:
    vae = checkpoint.vae
    with torch.no_grad():
        return vae.encode(images.to(checkpoint.device, vae.dtype)).float() * checkpoint.scale_factor


def _seeds(p: GenerationParams) -> tuple[list[int], list[int]]:
    seed = rng.resolve_seed(p.seed)
    subseed = rng.resolve_seed(p.subseed)
    n = p.batch_size * p.n_iter
    return rng.seeds_for_batch(
        seed, n, subseed_strength=p.subseed_strength
    ), rng.subseeds_for_batch(subseed, n)


def _record(checkpoint, p: GenerationParams, seed: int, subseed: int, extra: dict, encoded) -> dict:
    sampler_name, schedule = samplers.resolve_sampler_name(p.sampler_name, p.scheduler)
    if (
        schedules.canonical_schedule_name(schedule) == "automatic"
    ):  # A1111 records what it resolved to
        schedule = schedules.schedule_label(samplers.SAMPLER_INFO[sampler_name].default_schedule)
    rec: dict = {
        "Steps": p.steps,
        "Sampler": sampler_name,
        "Schedule type": schedule,
        "CFG scale": p.cfg_scale,
        "Seed": seed,
        "Size": f"{p.width}x{p.height}",
        "Model hash": checkpoint.model_hash,
        "Model": checkpoint.name,
    }
    if checkpoint.vae_path is not None:
        rec["VAE hash"] = checkpoint.vae_sha256[:10]
        rec["VAE"] = checkpoint.vae_path.name
    rec.update(extra)
    if p.subseed_strength > 0:
        rec["Variation seed"] = subseed
        rec["Variation seed strength"] = p.subseed_strength
    if p.seed_resize_from_w > 0 and p.seed_resize_from_h > 0:
        rec["Seed resize from"] = f"{p.seed_resize_from_w}x{p.seed_resize_from_h}"
    if p.clip_skip > 1:
        rec["Clip skip"] = p.clip_skip
    if p.cfg_rescale > 0:
        rec["CFG rescale phi"] = p.cfg_rescale
    if p.eta_noise_seed_delta:
        rec["ENSD"] = p.eta_noise_seed_delta
    if encoded.used_embeddings:
        rec["TI hashes"] = ", ".join(f"{k}: {v}" for k, v in encoded.used_embeddings.items())
    if getattr(encoded, "padded_conds", False):
        rec["Pad conds"] = True
    rec["RNG"] = "CPU"
    rec["Version"] = VERSION
    return rec


def _run(
    model,
    params: GenerationParams,
    *,
    on_step: OnStep | None,
    cancel: CancelToken | None,
    embeddings,
    batch_fn: Callable[
        [_Job, list[int], list[int], conditioning.EncodedPrompts], tuple[list[Image.Image], dict]
    ],
) -> GenerationResult:
    start = time.perf_counter()
    handle = _handle_for(model)
    ckpt = handle.checkpoint
    p = params
    job = _Job(handle, p, on_step, cancel or CancelToken(), start)
    seeds, subseeds = _seeds(p)
    encoded = conditioning.encode_prompts(
        ckpt,
        [p.prompt] * p.batch_size,
        [p.negative_prompt] * p.batch_size,
        p.steps,
        clip_skip=p.clip_skip,
        embeddings=embeddings,
    )
    images: list[Image.Image] = []
    infos: list[str] = []
    records: list[dict] = []
    used_seeds: list[int] = []
    used_subseeds: list[int] = []
    interrupted = False
    for b in range(p.n_iter):
        if job.cancel.interrupted:
            interrupted = True
            break
        job.batch_index = b
        bs = seeds[b * p.batch_size : (b + 1) * p.batch_size]
        bsub = subseeds[b * p.batch_size : (b + 1) * p.batch_size]
        try:
            batch_images, extra = batch_fn(job, bs, bsub, encoded)
        except Interrupted:
            if job.cancel.take_skip() and not job.cancel.interrupted:
                continue
            interrupted = True
            break
        for img, s, ss in zip(batch_images, bs, bsub, strict=True):
            rec = _record(ckpt, p, s, ss, extra, encoded)
            text = infotext.build_infotext(p.prompt, p.negative_prompt, rec)
            img.info["parameters"] = text
            images.append(img)
            infos.append(text)
            records.append(rec)
            used_seeds.append(s)
            used_subseeds.append(ss)
    return GenerationResult(
        images,
        used_seeds,
        used_subseeds,
        infos,
        p,
        records,
        interrupted,
        time.perf_counter() - start,
    )


def _image_rng(p: GenerationParams, seeds, subseeds, shape, device) -> rng.ImageRNG:
    return rng.ImageRNG(
        shape,
        seeds,
        subseeds=subseeds,
        subseed_strength=p.subseed_strength,
        seed_resize_from_h=p.seed_resize_from_h,
        seed_resize_from_w=p.seed_resize_from_w,
        eta_noise_seed_delta=p.eta_noise_seed_delta,
        device=device,
    )


def _latent_channels(ckpt) -> int:
    return ckpt.spec.vae.embed_dim


def _txt2img_concat(ckpt, batch: int, h: int, w: int) -> torch.Tensor | None:
    """9-channel inpainting models without an image: an all-ones mask over a grey image."""
    if ckpt.spec.unet.in_channels == 4:
        return None
    f = ckpt.spec.vae.downscale
    grey = torch.zeros(batch, 3, h * f, w * f)
    masked = _encode(ckpt, grey)
    return torch.cat([torch.ones(batch, 1, h, w, device=masked.device), masked], dim=1)


# -- public pipelines ----------------------------------------------------------------------------


def txt2img(
    checkpoint,
    params: GenerationParams,
    *,
    on_step: OnStep | None = None,
    cancel: CancelToken | None = None,
    embeddings=None,
) -> GenerationResult:
    """Text to image, with optional hires fix."""
    p = validate(params)

    def batch(job: _Job, seeds, subseeds, enc):
        ckpt = job.handle.checkpoint
        f = ckpt.spec.vae.downscale
        h, w = p.height // f, p.width // f
        shape = (_latent_channels(ckpt), h, w)
        noise_rng = _image_rng(p, seeds, subseeds, shape, ckpt.device)
        job.phase = "sampling"
        samples = _sample(
            job,
            cond=enc.cond,
            uncond=enc.uncond,
            noise_rng=noise_rng,
            steps=p.steps,
            concat=_txt2img_concat(ckpt, len(seeds), h, w),
        )
        extra: dict = {}
        if p.enable_hr:
            samples, extra = _hires(job, samples, seeds, subseeds, enc)
        return tensor_to_pil(_decode(ckpt, samples)), extra

    return _run(
        checkpoint, p, on_step=on_step, cancel=cancel, embeddings=embeddings, batch_fn=batch
    )


def _hires(job: _Job, samples: torch.Tensor, seeds, subseeds, enc) -> tuple[torch.Tensor, dict]:
    p = job.params
    ckpt = job.handle.checkpoint
    f = ckpt.spec.vae.downscale
    if p.hr_resize_x > 0 or p.hr_resize_y > 0:
        tw = p.hr_resize_x or round(p.width * p.hr_resize_y / p.height)
        th = p.hr_resize_y or round(p.height * p.hr_resize_x / p.width)
    else:
        tw, th = round(p.width * p.hr_scale), round(p.height * p.hr_scale)
    tw, th = max(8, tw // 8 * 8), max(8, th // 8 * 8)
    if tw * th > MAX_PIXELS:
        raise GenerationError(f"hires size {tw}x{th} is too large")
    if p.hr_upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[p.hr_upscaler]
        kwargs = {"antialias": antialias} if mode in ("bilinear", "bicubic") else {}
        latents = F.interpolate(samples, size=(th // f, tw // f), mode=mode, **kwargs)
    else:
        images = tensor_to_pil(_decode(ckpt, samples))
        resample = PIXEL_UPSCALERS[p.hr_upscaler]
        big = torch.cat([pil_to_tensor(im.resize((tw, th), resample)) for im in images])
        latents = _encode(ckpt, big)
    steps = p.hr_second_pass_steps or p.steps
    shape = (samples.shape[1], th // f, tw // f)
    noise_rng = _image_rng(
        replace(p, seed_resize_from_h=0, seed_resize_from_w=0), seeds, subseeds, shape, ckpt.device
    )
    job.phase = "hires"
    concat = _txt2img_concat(ckpt, len(seeds), th // f, tw // f)
    out = _sample(
        job,
        cond=enc.cond,
        uncond=enc.uncond,
        noise_rng=noise_rng,
        steps=steps,
        init_latent=latents,
        denoising_strength=p.hr_denoising_strength,
        concat=concat,
    )
    extra = {
        "Denoising strength": p.hr_denoising_strength,
        "Hires upscale": p.hr_scale if not (p.hr_resize_x or p.hr_resize_y) else None,
        "Hires resize": f"{tw}x{th}" if (p.hr_resize_x or p.hr_resize_y) else None,
        "Hires steps": p.hr_second_pass_steps or None,
        "Hires upscaler": p.hr_upscaler,
    }
    return out, {k: v for k, v in extra.items() if v is not None}


def img2img(
    checkpoint,
    params: GenerationParams,
    *,
    on_step: OnStep | None = None,
    cancel: CancelToken | None = None,
    embeddings=None,
) -> GenerationResult:
    """Image to image with A1111's denoising-strength semantics and resize modes."""
    p = validate(params, needs_image=True)
    if p.mask is not None:
        return inpaint(checkpoint, p, on_step=on_step, cancel=cancel, embeddings=embeddings)

    def batch(job: _Job, seeds, subseeds, enc):
        ckpt = job.handle.checkpoint
        f = ckpt.spec.vae.downscale
        if p.resize_mode == 3:  # latent upscale: encode at the source size, resize latents
            src = p.init_image.convert("RGB")
            src = src.resize(
                (max(8, src.width // 8 * 8), max(8, src.height // 8 * 8)), Image.Resampling.LANCZOS
            )
            latent = F.interpolate(
                _encode(ckpt, pil_to_tensor(src)),
                size=(p.height // f, p.width // f),
                mode="bilinear",
                antialias=True,
            )
        else:
            latent = _encode(
                ckpt, pil_to_tensor(resize_image(p.resize_mode, p.init_image, p.width, p.height))
            )
        init = latent.expand(len(seeds), -1, -1, -1).contiguous()
        extra = {"Denoising strength": p.denoising_strength}
        if p.denoising_strength == 0:  # nothing to denoise: the VAE round trip of the input
            return tensor_to_pil(_decode(ckpt, init)), extra
        shape = tuple(init.shape[1:])
        noise_rng = _image_rng(p, seeds, subseeds, shape, ckpt.device)
        concat = None
        if ckpt.spec.unet.in_channels != 4:  # inpainting model used for img2img: nothing masked
            concat = torch.cat([torch.zeros_like(init[:, :1]), init], dim=1)
        samples = _sample(
            job,
            cond=enc.cond,
            uncond=enc.uncond,
            noise_rng=noise_rng,
            steps=p.steps,
            init_latent=init,
            denoising_strength=p.denoising_strength,
            concat=concat,
        )
        return tensor_to_pil(_decode(ckpt, samples)), extra

    return _run(
        checkpoint, p, on_step=on_step, cancel=cancel, embeddings=embeddings, batch_fn=batch
    )


def inpaint(
    checkpoint,
    params: GenerationParams,
    *,
    on_step: OnStep | None = None,
    cancel: CancelToken | None = None,
    embeddings=None,
) -> GenerationResult:
    """Repaint the white area of `params.mask` in `params.init_image`.

    Pixels outside the (unblurred) mask are pasted back unchanged; the blur only softens the
    seam inside the mask. Works with 4-channel models (per-step latent blending) and 9-channel
    inpainting models (mask and masked image as extra UNet input).
    """
    p = validate(params, needs_image=True, needs_mask=True)

    source = p.init_image.convert("RGB")
    mask = p.mask.convert("L")
    if mask.size != source.size:
        mask = mask.resize(source.size, Image.Resampling.NEAREST)
    if p.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    mask_arr = np.asarray(mask)
    if not (mask_arr > 0).any():
        raise GenerationError("the mask is empty: paint over the area to change")
    hard = (mask_arr > 127).astype(np.float32)
    blurred = mask.filter(ImageFilter.GaussianBlur(p.mask_blur)) if p.mask_blur > 0 else mask
    # paste-back alpha: feathered by the blur, but never outside the painted mask
    alpha = np.minimum(np.asarray(blurred, dtype=np.float32) / 255.0, hard)
    # the area the model repaints: the blurred mask (it may reach past the painted mask)
    paint = np.maximum(np.asarray(blurred, dtype=np.float32) / 255.0, hard)

    crop_box = None
    if p.inpaint_full_res:
        crop_box = images.mask_bbox(hard, p.inpaint_full_res_padding, p.width, p.height)
        work = source.crop(crop_box).resize((p.width, p.height), Image.Resampling.LANCZOS)
        work_paint = (
            Image.fromarray((paint * 255).astype(np.uint8))
            .crop(crop_box)
            .resize((p.width, p.height), Image.Resampling.BILINEAR)
        )
    else:
        work = resize_image(p.resize_mode if p.resize_mode != 3 else 0, source, p.width, p.height)
        work_paint = Image.fromarray((paint * 255).astype(np.uint8)).resize(
            (p.width, p.height), Image.Resampling.BILINEAR
        )
    if p.inpainting_fill == 0:
        work = images.fill_masked(work, work_paint.point(lambda v: 255 if v > 127 else 0))

    def batch(job: _Job, seeds, subseeds, enc):
        ckpt = job.handle.checkpoint
        f = ckpt.spec.vae.downscale
        h, w = p.height // f, p.width // f
        image_t = pil_to_tensor(work)
        init = _encode(ckpt, image_t).expand(len(seeds), -1, -1, -1).contiguous()
        pm = torch.from_numpy(np.asarray(work_paint, dtype=np.float32) / 255.0)[None, None]
        latent_mask = (
            F.interpolate(pm, size=(h, w), mode="bilinear", antialias=True).round().to(init)
        )
        latent_mask = latent_mask.expand(len(seeds), -1, -1, -1)
        if p.inpainting_fill == 3:  # latent nothing
            init = init * (1 - latent_mask)
        concat = None
        if ckpt.spec.unet.in_channels != 4:
            hard_pm = (pm > 0.5).float()
            masked_image = image_t * (1 - hard_pm)
            concat = torch.cat(
                [
                    F.interpolate(hard_pm, size=(h, w), mode="nearest")
                    .to(init)
                    .expand(len(seeds), -1, -1, -1),
                    _encode(ckpt, masked_image).expand(len(seeds), -1, -1, -1),
                ],
                dim=1,
            )
        shape = tuple(init.shape[1:])
        noise_rng = _image_rng(p, seeds, subseeds, shape, ckpt.device)
        samples = _sample(
            job,
            cond=enc.cond,
            uncond=enc.uncond,
            noise_rng=noise_rng,
            steps=p.steps,
            init_latent=init,
            denoising_strength=p.denoising_strength,
            latent_mask=None if concat is not None and p.denoising_strength >= 1 else latent_mask,
            concat=concat,
            fill_noise_mask=p.inpainting_fill == 2,
        )
        generated = tensor_to_pil(_decode(ckpt, samples))
        return [images.paste_back(g, source, alpha, crop_box) for g in generated], _inpaint_extra(p)

    return _run(
        checkpoint, p, on_step=on_step, cancel=cancel, embeddings=embeddings, batch_fn=batch
    )


def _inpaint_extra(p: GenerationParams) -> dict:
    return {
        "Denoising strength": p.denoising_strength,
        "Mask blur": p.mask_blur,
        "Masked content": MASKED_CONTENT[p.inpainting_fill],
        "Inpaint area": "Only masked" if p.inpaint_full_res else "Whole picture",
        "Masked area padding": p.inpaint_full_res_padding,
        **({"Mask mode": "Inpaint not masked"} if p.inpainting_mask_invert else {}),
    }


__all__ = [
    "LATENT_UPSCALERS",
    "MASKED_CONTENT",
    "MAX_BATCH",
    "MAX_PIXELS",
    "MAX_STEPS",
    "PIXEL_UPSCALERS",
    "RESIZE_MODES",
    "CancelToken",
    "GenerationError",
    "GenerationParams",
    "GenerationResult",
    "Interrupted",
    "ProgressEvent",
    "img2img",
    "inpaint",
    "latent_preview",
    "outpaint_pad",
    "pil_to_tensor",
    "resize_image",
    "tensor_to_pil",
    "txt2img",
]
