"""The choice lists the page offers (samplers, schedules, resize modes, ...).

Importing the core pulls in torch and transformers (about 5 s on a small machine), so `serve`
draws the page before it imports the core. Until then these lists come from the copies below,
which are A1111's labels; once the core is imported the live lists are used. The tests check
that the copies equal the core's lists.
"""

from __future__ import annotations

import sys

SAMPLERS = (
    "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE",
    "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DDIM", "UniPC", "LCM",
)  # fmt: skip
SCHEDULES = (
    "Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
    "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta",
)  # fmt: skip
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
HIRES_UPSCALERS = (
    "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
    "Latent (nearest)", "Latent (nearest-exact)", "Lanczos", "Nearest", "Bicubic",
)  # fmt: skip
INPAINT_AREAS = ("Whole picture", "Only masked")
MASK_MODES = ("Inpaint masked", "Inpaint not masked")


def _core(name: str):
    """The core module if it has been imported already (never imports it)."""
    return sys.modules.get(f"ldm_core.{name}")


def samplers() -> list[str]:
    mod = _core("samplers")
    names = getattr(mod, "SAMPLERS", None) if mod else None
    return list(names) if names else list(SAMPLERS)


def schedules() -> list[str]:
    mod = _core("schedules")
    labels = getattr(mod, "SCHEDULE_LABELS", None) if mod else None
    return list(dict.fromkeys(labels.values())) if labels else list(SCHEDULES)


def resize_modes() -> list[str]:
    mod = _core("pipeline")
    return list(getattr(mod, "RESIZE_MODES", RESIZE_MODES))


def masked_content() -> list[str]:
    mod = _core("pipeline")
    return list(getattr(mod, "MASKED_CONTENT", MASKED_CONTENT))


def hires_upscalers() -> list[str]:
    mod = _core("pipeline")
    if not hasattr(mod, "PIXEL_UPSCALERS"):
        return list(HIRES_UPSCALERS)
    return [*mod.LATENT_UPSCALERS, *mod.PIXEL_UPSCALERS]
