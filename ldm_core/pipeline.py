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
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from ldm_core import conditioning, infotext, rng, samplers, schedules
from ldm_core.config import Prediction
from ldm_core.denoiser import GuidedDenoiser, cfg_rescale
from ldm_core.patcher import ModelHandle, PostCFGArgs

log = logging.getLogger(__name__)

VERSION = "ldm-webui 0.1"
MAX_PIXELS = 4096 * 4096
MAX_STEPS = 1000
MAX_BATCH = 64
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_UPSCALERS = {
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
    "Bicubic": Image.Resampling.BICUBIC,
}

# Linear latent -> RGB factors for the SD1/SD2 VAE latent space (ldm-formats.md §7.2).
SD_LATENT_RGB = torch.tensor(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)


class GenerationError(ValueError):
    """Bad generation parameters, with a message meant for the user."""


class Interrupted(Exception):
    """Raised inside the sampling loop when the job's cancel token is set."""


class CancelToken:
    """Per-job interrupt / skip flags, checked every step and between batch items."""

    def __init__(self) -> None:
        self._interrupt = threading.Event()
        self._skip = threading.Event()

    def interrupt(self) -> None:
        self._interrupt.set()

    def skip(self) -> None:
        self._skip.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    def take_skip(self) -> bool:
        if self._skip.is_set():
            self._skip.clear()
            return True
        return False

    def check(self) -> None:
        if self._interrupt.is_set() or self._skip.is_set():
            raise Interrupted


@dataclass
class GenerationParams:
    """Everything a generation depends on; field names follow A1111's API where it has one."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    cfg_scale: float = 7.0
    cfg_rescale: float = 0.0
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = 1
    clip_skip: int = 1
    eta_noise_seed_delta: int = 0
    # img2img / inpaint
    init_image: Image.Image | None = None
    denoising_strength: float = 0.75
    resize_mode: int = 0
    mask: Image.Image | None = None
    mask_blur: int = 4
    inpainting_fill: int = 1
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False
    # hires fix (txt2img)
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_denoising_strength: float = 0.7
    # output
    preview_every: int = 0  # 0: no previews
    preview_method: str = "auto"  # "cheap" linear factors, "full" VAE decode, "auto"

    def to_record(self) -> dict:
        d = asdict(self)
        d.pop("init_image")
        d.pop("mask")
        return d


@dataclass
class ProgressEvent:
    """One step of one batch: what the UI needs for a progress bar and preview."""

    step: int
    total_steps: int
    batch_index: int
    batch_count: int
    sigma: float
    elapsed: float
    preview: Image.Image | None = None
    phase: str = "sampling"  # "sampling" | "hires"


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    subseeds: list[int]
    infotexts: list[str]
    params: GenerationParams
    records: list[dict] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def info(self) -> str:
        return self.infotexts[0] if self.infotexts else ""


OnStep = Callable[[ProgressEvent], None]


# -- validation --------------------------------------------------------------------------------


def validate(
    params: GenerationParams, *, needs_image: bool = False, needs_mask: bool = False
) -> GenerationParams:
    """Check ranges and return params with sizes snapped to multiples of 8."""
    p = replace(params)

    def bad(msg: str) -> None:
        raise GenerationError(msg)

    for name in ("width", "height"):
        v = getattr(p, name)
        if not isinstance(v, int | float) or v < 8:
            bad(f"{name} must be at least 8 pixels, got {v}")
        setattr(p, name, int(v) // 8 * 8)
    if p.width * p.height > MAX_PIXELS:
        bad(f"size {p.width}x{p.height} is too large (at most {MAX_PIXELS:,} pixels)")
    if not (1 <= int(p.steps) <= MAX_STEPS):
        bad(f"steps must be between 1 and {MAX_STEPS}, got {p.steps}")
    if not (1 <= int(p.batch_size) <= MAX_BATCH) or not (1 <= int(p.n_iter) <= MAX_BATCH * 16):
        bad(f"batch size must be 1-{MAX_BATCH} and batch count 1-{MAX_BATCH * 16}")
    if not math.isfinite(p.cfg_scale) or not (0 <= p.cfg_scale <= 100):
        bad(f"CFG scale must be between 0 and 100, got {p.cfg_scale}")
    if not (0 <= p.cfg_rescale <= 1):
        bad(f"CFG rescale must be between 0 and 1, got {p.cfg_rescale}")
    if not (0 <= p.denoising_strength <= 1) or not (0 <= p.hr_denoising_strength <= 1):
        bad("denoising strength must be between 0 and 1")
    if not (0 <= p.subseed_strength <= 1):
        bad("variation strength must be between 0 and 1")
    if not (1 <= p.clip_skip <= 12):
        bad(f"clip skip must be between 1 and 12, got {p.clip_skip}")
    if p.resize_mode not in range(len(RESIZE_MODES)):
        bad(f"resize mode must be 0-{len(RESIZE_MODES) - 1}")
    if p.inpainting_fill not in range(len(MASKED_CONTENT)):
        bad(f"masked content must be 0-{len(MASKED_CONTENT) - 1}")
    if p.mask_blur < 0 or p.inpaint_full_res_padding < 0:
        bad("mask blur and padding must not be negative")
    try:
        samplers.resolve_sampler_name(p.sampler_name, p.scheduler)
    except (KeyError, ValueError) as exc:
        bad(f"unknown sampler or schedule: {exc}")
    if p.enable_hr and (
        p.hr_upscaler not in LATENT_UPSCALERS and p.hr_upscaler not in PIXEL_UPSCALERS
    ):
        bad(
            f"unknown hires upscaler {p.hr_upscaler!r}; choose from {[*LATENT_UPSCALERS, *PIXEL_UPSCALERS]}"
        )
    if needs_image and p.init_image is None:
        bad("an input image is required")
    if needs_mask and p.mask is None:
        bad("a mask is required for inpainting (paint over the area to change)")
    p.steps, p.batch_size, p.n_iter = int(p.steps), int(p.batch_size), int(p.n_iter)
    return p


# -- image helpers -------------------------------------------------------------------------------


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, H, W] in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> RGB PIL images."""
    arr = (
        ((images.float().clamp(-1, 1) + 1) * 127.5)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .cpu()
        .numpy()
    )
    return [Image.fromarray(a) for a in arr]


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's resize modes: stretch, cover + centre crop, contain + fill the bars."""
    image = image.convert("RGB")
    lanczos = Image.Resampling.LANCZOS
    if mode in (0, 3):
        return image.resize((width, height), lanczos)
    src_ratio = image.width / image.height
    ratio = width / height
    if mode == 1:
        scale = width / image.width if ratio > src_ratio else height / image.height
        w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        resized = image.resize((w, h), lanczos)
        left, top = (w - width) // 2, (h - height) // 2
        return resized.crop((left, top, left + width, top + height))
    scale = width / image.width if ratio < src_ratio else height / image.height
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    resized = image.resize((w, h), lanczos)
    out = Image.new("RGB", (width, height))
    left, top = (width - w) // 2, (height - h) // 2
    out.paste(resized, (left, top))
    # Fill the bars by stretching the outermost rows/columns, as A1111 does.
    if top > 0:
        out.paste(resized.crop((0, 0, w, 1)).resize((w, top)), (left, 0))
        out.paste(resized.crop((0, h - 1, w, h)).resize((w, height - top - h)), (left, top + h))
    if left > 0:
        out.paste(resized.crop((0, 0, 1, h)).resize((left, h)), (0, top))
        out.paste(resized.crop((w - 1, 0, w, h)).resize((width - left - w, h)), (left + w, top))
    return out


def outpaint_pad(
    image: Image.Image, *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0
) -> tuple[Image.Image, Image.Image]:
    """Extend the canvas for outpainting: new borders continue the edge pixels, and the
    returned mask is white exactly over the new area (inpaint it with masked content "fill")."""
    if min(left, right, top, bottom) < 0:
        raise GenerationError("outpainting amounts must not be negative")
    image = image.convert("RGB")
    w, h = image.width + left + right, image.height + top + bottom
    arr = np.asarray(image)
    padded = np.pad(arr, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full((h, w), 255, dtype=np.uint8)
    mask[top : top + image.height, left : left + image.width] = 0
    return Image.fromarray(padded), Image.fromarray(mask, "L")


def _mask_bbox(
    mask: np.ndarray, pad: int, width: int, height: int
) -> tuple[int, int, int, int] | None:
    """Padded box around the mask, grown to the target aspect ratio (A1111's "only masked")."""
    ys, xs = np.nonzero(mask > 0)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    x1, y1, x2, y2 = (
        max(xs.min() - pad, 0),
        max(ys.min() - pad, 0),
        min(xs.max() + 1 + pad, w),
        min(ys.max() + 1 + pad, h),
    )
    ratio = width / height
    bw, bh = x2 - x1, y2 - y1
    if bw / bh < ratio:
        grow = round(bh * ratio) - bw
        x1, x2 = x1 - grow // 2, x2 + grow - grow // 2
    else:
        grow = round(bw / ratio) - bh
        y1, y2 = y1 - grow // 2, y2 + grow - grow // 2
    # shift back inside the image, then clip
    if x1 < 0:
        x2, x1 = x2 - x1, 0
    if y1 < 0:
        y2, y1 = y2 - y1, 0
    if x2 > w:
        x1, x2 = max(x1 - (x2 - w), 0), w
    if y2 > h:
        y1, y2 = max(y1 - (y2 - h), 0), h
    return int(x1), int(y1), int(x2), int(y2)


def _fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Masked content "fill": replace the masked area with blurred colours from around it."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    m = (np.asarray(mask) > 127)[..., None]
    if not m.any():
        return image.convert("RGB")
    keep = (~m).astype(np.float32)
    acc, weight = rgb * keep, keep.copy()
    out = rgb * keep
    known = ~m[..., 0]
    for radius in (256, 64, 16, 4, 2, 1):
        blurred_acc = np.asarray(
            Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8)).filter(
                ImageFilter.BoxBlur(radius)
            ),
            dtype=np.float32,
        )
        blurred_w = (
            np.asarray(
                Image.fromarray((weight[..., 0] * 255).astype(np.uint8)).filter(
                    ImageFilter.BoxBlur(radius)
                ),
                dtype=np.float32,
            )[..., None]
            / 255
        )
        est = blurred_acc / np.maximum(blurred_w, 1e-3)
        fill = (~known)[..., None] & (blurred_w > 1e-3)
        out = np.where(fill, est, out)
    out = np.where(m, out, rgb)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


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
    latent_shape: tuple[int, int, int, int],
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
            latent_shape=(len(seeds), *shape),
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
        latent_shape=(len(seeds), *shape),
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
            latent_shape=tuple(init.shape),
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
        crop_box = _mask_bbox(hard, p.inpaint_full_res_padding, p.width, p.height)
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
        work = _fill_masked(work, work_paint.point(lambda v: 255 if v > 127 else 0))

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
            latent_shape=tuple(init.shape),
            steps=p.steps,
            init_latent=init,
            denoising_strength=p.denoising_strength,
            latent_mask=None if concat is not None and p.denoising_strength >= 1 else latent_mask,
            concat=concat,
            fill_noise_mask=p.inpainting_fill == 2,
        )
        generated = tensor_to_pil(_decode(ckpt, samples))
        return [_paste_back(g, source, alpha, crop_box) for g in generated], _inpaint_extra(p)

    return _run(
        checkpoint, p, on_step=on_step, cancel=cancel, embeddings=embeddings, batch_fn=batch
    )


def _paste_back(
    generated: Image.Image, source: Image.Image, alpha: np.ndarray, crop_box
) -> Image.Image:
    """Composite the generated pixels over the source with `alpha` (0 outside the mask)."""
    if crop_box is not None:
        x1, y1, x2, y2 = crop_box
        full = source.copy()
        full.paste(generated.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
        generated = full
    else:
        generated = generated.resize(source.size, Image.Resampling.LANCZOS)
    g = np.asarray(generated, dtype=np.float32)
    s = np.asarray(source, dtype=np.float32)
    a = alpha[..., None]
    out = np.where(a > 0, g * a + s * (1 - a), s)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


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
    "resize_image",
    "txt2img",
]
