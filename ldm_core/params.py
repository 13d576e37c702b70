"""The typed inputs and outputs of the pipelines, cancel tokens, and parameter validation."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from PIL import Image

from ldm_core import samplers
from ldm_core.images import ImageInputError

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


class GenerationError(ImageInputError):
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
