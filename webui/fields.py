"""The generation form: field names, their conversion to `GenerationParams`, and the reverse
mapping from infotext (PNG Info, "send to") back to form values.

Field names are the `GenerationParams` names (A1111's API names), so they are also the
parameter names of the app's API endpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from webui import catalog

COMMON_FIELDS = (
    "prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "width", "height",
    "cfg_scale", "seed", "subseed", "subseed_strength", "seed_resize_from_w",
    "seed_resize_from_h", "n_iter", "batch_size", "clip_skip",
)  # fmt: skip
HIRES_FIELDS = (
    "enable_hr", "hr_upscaler", "hr_second_pass_steps", "hr_denoising_strength", "hr_scale",
    "hr_resize_x", "hr_resize_y",
)  # fmt: skip
IMG2IMG_FIELDS = ("init_image", "resize_mode", "denoising_strength")
INPAINT_FIELDS = (
    "init_image", "resize_mode", "denoising_strength", "mask_blur", "inpainting_mask_invert",
    "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
)  # fmt: skip
TAB_FIELDS = {
    "txt2img": COMMON_FIELDS + HIRES_FIELDS,
    "img2img": COMMON_FIELDS + IMG2IMG_FIELDS,
    "inpaint": COMMON_FIELDS + INPAINT_FIELDS,
}
_INTS = {
    "steps", "width", "height", "seed", "subseed", "seed_resize_from_w", "seed_resize_from_h",
    "n_iter", "batch_size", "clip_skip", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
    "mask_blur", "inpaint_full_res_padding", "resize_mode", "inpainting_fill",
}  # fmt: skip
_FLOATS = {
    "cfg_scale",
    "subseed_strength",
    "denoising_strength",
    "hr_denoising_strength",
    "hr_scale",
}


class FieldError(ValueError):
    """A form value that cannot be used, with a message for the user."""


def index_of(value, choices: list[str], what: str) -> int:
    """Radio values arrive as labels (API, paste) or indexes (type="index" radios)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        if 0 <= value < len(choices):
            return value
    elif value in choices:
        return choices.index(value)
    raise FieldError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


def to_params_kwargs(tab: str, values: dict) -> dict:
    """Form values of `tab` -> keyword arguments of `GenerationParams` (images excluded)."""
    out = {}
    for name in TAB_FIELDS[tab]:
        if name == "init_image" or name not in values:
            continue
        value = values[name]
        if value is None:
            raise FieldError(f"{name.replace('_', ' ')} is empty")
        try:
            if name == "resize_mode":
                value = index_of(value, catalog.resize_modes(), "resize mode")
            elif name == "inpainting_fill":
                value = index_of(value, catalog.masked_content(), "masked content")
            elif name == "inpainting_mask_invert":
                value = bool(index_of(value, list(catalog.MASK_MODES), "mask mode"))
            elif name == "inpaint_full_res":
                value = bool(index_of(value, list(catalog.INPAINT_AREAS), "inpaint area"))
            elif name in _INTS:
                value = int(round(float(value)))
            elif name in _FLOATS:
                value = float(value)
            elif name == "enable_hr":
                value = bool(value)
            elif name in ("prompt", "negative_prompt"):
                value = str(value)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, FieldError):
                raise
            raise FieldError(f"{name.replace('_', ' ')}: {value!r} is not a number") from exc
        out[name] = value
    return out


# -- infotext -> form ----------------------------------------------------------------------------


@dataclass
class Pasted:
    values: dict  # field name -> form value (labels for radios)
    notes: list[str] = field(default_factory=list)


def _num(params: dict, key: str, kind=float):
    value = params.get(key)
    if value is None or value == "":
        return None
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        return None


def fields_from_infotext(text: str) -> Pasted:
    """Parse infotext into form values for every field it determines."""
    from ldm_core.infotext import parse_infotext

    prompt, negative, p = parse_infotext(text)
    v: dict = {"prompt": prompt, "negative_prompt": negative}
    notes: list[str] = []
    if not any(k in p for k in ("Steps", "Sampler", "Seed", "CFG scale")):
        notes.append("no generation parameters found; only the prompt was read")
    sampler = p.get("Sampler")
    if sampler is not None:
        if sampler in catalog.samplers():
            v["sampler_name"] = sampler
        else:
            notes.append(f"sampler {sampler!r} is not available here; kept the current one")
    schedule = p.get("Schedule type")
    if schedule is not None:
        if schedule in catalog.schedules():
            v["scheduler"] = schedule
        else:
            notes.append(f"schedule type {schedule!r} is not available here; kept the current one")
    for key, name, kind in (
        ("Steps", "steps", int), ("CFG scale", "cfg_scale", float), ("Seed", "seed", int),
        ("Size-1", "width", int), ("Size-2", "height", int), ("Clip skip", "clip_skip", int),
        ("Denoising strength", "denoising_strength", float), ("Mask blur", "mask_blur", int),
        ("Masked area padding", "inpaint_full_res_padding", int),
    ):  # fmt: skip
        value = _num(p, key, kind)
        if value is not None:
            v[name] = value
    # variation seed: absent means none (reset the form, as A1111's paste does)
    v["subseed"] = _num(p, "Variation seed", int) if "Variation seed" in p else -1
    v["subseed_strength"] = _num(p, "Variation seed strength", float) or 0.0
    v["seed_resize_from_w"] = _num(p, "Seed resize from-1", int) or 0
    v["seed_resize_from_h"] = _num(p, "Seed resize from-2", int) or 0
    # hires fix
    hires = any(k in p for k in ("Hires upscale", "Hires upscaler", "Hires steps")) or bool(
        _num(p, "Hires resize-1", int) or _num(p, "Hires resize-2", int)
    )
    v["enable_hr"] = hires
    if hires:
        v["hr_scale"] = _num(p, "Hires upscale", float) or 2.0
        v["hr_resize_x"] = _num(p, "Hires resize-1", int) or 0
        v["hr_resize_y"] = _num(p, "Hires resize-2", int) or 0
        v["hr_second_pass_steps"] = _num(p, "Hires steps", int) or 0
        upscaler = p.get("Hires upscaler", "Latent")
        if upscaler in catalog.hires_upscalers():
            v["hr_upscaler"] = upscaler
        else:
            notes.append(f"hires upscaler {upscaler!r} is not available here; kept the current one")
        if "denoising_strength" in v:
            v["hr_denoising_strength"] = v["denoising_strength"]
    # inpainting
    if p.get("Masked content") in catalog.masked_content():
        v["inpainting_fill"] = p["Masked content"]
    if p.get("Inpaint area") in catalog.INPAINT_AREAS:
        v["inpaint_full_res"] = p["Inpaint area"]
    if p.get("Mask mode") in catalog.MASK_MODES:
        v["inpainting_mask_invert"] = p["Mask mode"]
    model = p.get("Model")
    if model:
        model_hash = p.get("Model hash")
        notes.append(f"made with model {model}" + (f" [{model_hash}]" if model_hash else ""))
    return Pasted(v, notes)
