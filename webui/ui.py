"""The page: top bar, txt2img / img2img / Inpaint / PNG Info / Settings tabs, and their events.

Every component that matters to a test or a shortcut has an `elem_id` (`<tab>_generate`,
`<tab>_prompt`, `<tab>_gallery`, ...). Generation handlers are generators: they stream the
progress bar and live previews while the job waits and runs, then the PNG results.
"""

from __future__ import annotations

import html
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import gradio as gr
import numpy as np
from PIL import Image

from webui import catalog
from webui.fields import TAB_FIELDS, FieldError, fields_from_infotext
from webui.jobs import Progress, Waiting
from webui.models import ModelError
from webui.settings import PREVIEW_METHODS, OptionsError

if TYPE_CHECKING:
    from webui.app import App

log = logging.getLogger(__name__)

GENERATION_TABS = ("txt2img", "img2img", "inpaint")
TAB_LABELS = {"txt2img": "txt2img", "img2img": "img2img", "inpaint": "Inpaint"}
STATUS_POLL_SECONDS = 0.4


@dataclass
class GenTab:
    """The components of one generation tab."""

    name: str
    fields: dict[str, gr.components.Component] = field(default_factory=dict)
    generate: gr.Button | None = None
    interrupt: gr.Button | None = None
    skip: gr.Button | None = None
    gallery: gr.Gallery | None = None
    progress: gr.HTML | None = None
    infotext: gr.Textbox | None = None
    state: gr.State | None = None
    send_img2img: gr.Button | None = None
    send_inpaint: gr.Button | None = None
    reuse_seed: gr.Button | None = None
    counters: dict[str, gr.HTML] = field(default_factory=dict)
    seed_buttons: dict[str, gr.Button] = field(default_factory=dict)
    swap: gr.Button | None = None
    outpaint: dict[str, gr.components.Component] = field(default_factory=dict)


@dataclass
class TopBar:
    checkpoint: gr.Dropdown
    vae: gr.Dropdown
    refresh: gr.Button
    clip_skip: gr.Slider
    status: gr.Markdown


# -- small HTML helpers ------------------------------------------------------------------------------


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {int(s % 60):02d} s"


def _bar(fraction: float, text: str, state: str) -> str:
    pct = max(0.0, min(1.0, fraction)) * 100
    return (
        f'<div class="ldm-progress" data-state="{state}" data-fraction="{fraction:.4f}">'
        f'<div class="ldm-progress-track"><div class="ldm-progress-fill" style="width:{pct:.1f}%"></div></div>'
        f'<div class="ldm-progress-text">{html.escape(text)}</div></div>'
    )


def progress_html(p: Progress) -> str:
    parts = [f"Step {p.step}/{p.total_steps}"]
    if p.phase == "hires":
        parts[0] = f"Hires step {p.step}/{p.total_steps}"
    if p.batch_count > 1:
        parts.append(f"batch {p.batch_index + 1}/{p.batch_count}")
    parts.append(f"{_seconds(p.elapsed)} elapsed")
    if p.eta is not None:
        parts.append(f"ETA {_seconds(p.eta)}")
    return _bar(p.fraction, " · ".join(parts), "running")


def waiting_html(w: Waiting) -> str:
    if w.reason == "model":
        text = "Waiting for the model to load…"
    elif w.ahead > 0:
        text = f"Queued: {w.ahead} job{'s' if w.ahead != 1 else ''} ahead"
    else:
        text = "Starting…"
    return _bar(0.0, text, "waiting")


def idle_html(text: str = "") -> str:
    return _bar(0.0, text, "idle") if text else '<div class="ldm-progress" data-state="idle"></div>'


# -- building ------------------------------------------------------------------------------------------


def build(app: App) -> gr.Blocks:
    opts = app.options.get()
    width, height = app.default_size()
    with gr.Blocks(title="ldm-webui", analytics_enabled=False) as demo:
        top = _top_bar(app)
        with gr.Tabs(elem_id="tabs") as tabs:
            gen: dict[str, GenTab] = {}
            for name in GENERATION_TABS:
                with gr.Tab(TAB_LABELS[name], id=name, elem_id=f"tab_{name}"):
                    gen[name] = _generation_tab(name, opts, width, height, top.clip_skip)
            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
                png = _pnginfo_tab()
            with gr.Tab("Settings", id="settings", elem_id="tab_settings"):
                settings = _settings_tab(app)
        _wire_top_bar(app, demo, top, gen, settings)
        for tab in gen.values():
            _wire_generation(app, tab, top)
            _wire_results(app, tab, tabs, gen)
        _wire_outpaint(gen["inpaint"])
        _wire_pnginfo(png, tabs, gen)
        _wire_settings(app, settings)
    return demo


def _top_bar(app: App) -> TopBar:
    names = app.models.checkpoint_names()
    candidates, _ = app.models.startup_candidates()
    with gr.Row(elem_id="topbar", equal_height=True):
        checkpoint = gr.Dropdown(
            names, value=candidates[0] if candidates else None, label="Checkpoint", elem_id="checkpoint", scale=4,
        )
        vae = gr.Dropdown(app.models.vae_names(), value=app.models.vae_name, label="VAE", elem_id="vae", scale=2)
        refresh = gr.Button("↻", elem_id="refresh_models", scale=0, min_width=44, size="sm")
        clip_skip = gr.Slider(1, 12, value=1, step=1, label="Clip skip", elem_id="clip_skip", scale=2)
        status = gr.Markdown(app.models.status().text, elem_id="model_status")
    return TopBar(checkpoint, vae, refresh, clip_skip, status)


def _counter(elem_id: str) -> gr.HTML:
    return gr.HTML('<span class="ldm-tokens">0/75</span>', elem_id=elem_id, elem_classes="ldm-token-counter")


def _generation_tab(name: str, opts, width: int, height: int, clip_skip: gr.Slider) -> GenTab:
    t = GenTab(name)
    f = t.fields
    with gr.Row(elem_classes="ldm-toprow"):
        with gr.Column(scale=6):
            f["prompt"] = gr.Textbox(
                "", label="Prompt", lines=3, max_lines=12, elem_id=f"{name}_prompt",
                placeholder="Prompt (Ctrl+Enter generates, Esc interrupts)",
            )
            t.counters["prompt"] = _counter(f"{name}_token_counter")
            f["negative_prompt"] = gr.Textbox(
                "", label="Negative prompt", lines=2, max_lines=8, elem_id=f"{name}_neg_prompt",
                placeholder="Negative prompt",
            )
            t.counters["negative_prompt"] = _counter(f"{name}_negative_token_counter")
        with gr.Column(scale=1, min_width=200, elem_classes="ldm-buttons"):
            t.generate = gr.Button("Generate", variant="primary", elem_id=f"{name}_generate", size="lg")
            with gr.Row():
                t.interrupt = gr.Button("Interrupt", variant="stop", elem_id=f"{name}_interrupt", size="sm")
                t.skip = gr.Button("Skip", elem_id=f"{name}_skip", size="sm")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, elem_id=f"{name}_settings"):
            if name == "img2img":
                f["init_image"] = gr.Image(
                    label="Image for img2img", type="pil", image_mode="RGB", sources=["upload", "clipboard"],
                    format="png", height=360, elem_id="img2img_image",
                )
            elif name == "inpaint":
                f["init_image"] = gr.ImageEditor(
                    label="Image (paint the area to change)", type="pil", image_mode="RGBA",
                    sources=["upload", "clipboard"], layers=False, transforms=(), format="png", height=480,
                    brush=gr.Brush(colors=["#ffffff", "#000000", "#ff3c3c"], color_mode="defaults"),
                    eraser=gr.Eraser(), elem_id="inpaint_editor",
                )
            if name in ("img2img", "inpaint"):
                f["resize_mode"] = gr.Radio(
                    catalog.resize_modes(), value=catalog.resize_modes()[0], type="index",
                    label="Resize mode", elem_id=f"{name}_resize_mode",
                )
            with gr.Row():
                f["sampler_name"] = gr.Dropdown(
                    catalog.samplers(), value=opts.sampler_name, label="Sampling method",
                    elem_id=f"{name}_sampler",
                )
                f["scheduler"] = gr.Dropdown(
                    catalog.schedules(), value=opts.scheduler, label="Schedule type", elem_id=f"{name}_scheduler",
                )
            f["steps"] = gr.Slider(1, 150, value=opts.steps, step=1, label="Sampling steps", elem_id=f"{name}_steps")
            if name == "txt2img":
                _hires_accordion(f)
            with gr.Row():
                with gr.Column(scale=4):
                    f["width"] = gr.Slider(64, 2048, value=width, step=8, label="Width", elem_id=f"{name}_width")
                    f["height"] = gr.Slider(64, 2048, value=height, step=8, label="Height", elem_id=f"{name}_height")
                t.swap = gr.Button("⇅", elem_id=f"{name}_swap_size", scale=0, min_width=44, size="sm")
                with gr.Column(scale=2, min_width=120):
                    f["n_iter"] = gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id=f"{name}_batch_count")
                    f["batch_size"] = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id=f"{name}_batch_size")
            f["cfg_scale"] = gr.Slider(1, 30, value=opts.cfg_scale, step=0.5, label="CFG Scale", elem_id=f"{name}_cfg_scale")
            if name in ("img2img", "inpaint"):
                f["denoising_strength"] = gr.Slider(
                    0, 1, value=0.75, step=0.01, label="Denoising strength", elem_id=f"{name}_denoising_strength",
                )
            _seed_rows(t)
            if name == "inpaint":
                _inpaint_controls(t)
        with gr.Column(scale=1, elem_id=f"{name}_results"):
            t.progress = gr.HTML(idle_html(), elem_id=f"{name}_progress")
            t.gallery = gr.Gallery(
                label="Output", show_label=False, format="png", type="pil", columns=2, height=520,
                object_fit="contain", preview=True, interactive=False, elem_id=f"{name}_gallery",
            )
            with gr.Row():
                t.send_img2img = gr.Button("Send to img2img", size="sm", elem_id=f"{name}_send_to_img2img")
                t.send_inpaint = gr.Button("Send to inpaint", size="sm", elem_id=f"{name}_send_to_inpaint")
                t.reuse_seed = gr.Button("♻ Reuse seed", size="sm", elem_id=f"{name}_reuse_seed")
            t.infotext = gr.Textbox(
                label="Generation parameters", lines=4, interactive=False, buttons=["copy"],
                elem_id=f"{name}_infotext",
            )
            t.state = gr.State({})
    f["clip_skip"] = clip_skip
    missing = set(TAB_FIELDS[name]) - set(f)
    assert not missing, f"{name} tab lacks fields {missing}"
    return t


def _hires_accordion(f: dict) -> None:
    with gr.Accordion("Hires. fix", open=False, elem_id="txt2img_hires_fix"):
        f["enable_hr"] = gr.Checkbox(False, label="Enable hires. fix", elem_id="txt2img_enable_hr")
        with gr.Row():
            f["hr_upscaler"] = gr.Dropdown(
                catalog.hires_upscalers(), value="Latent", label="Upscaler", elem_id="txt2img_hr_upscaler",
            )
            f["hr_second_pass_steps"] = gr.Slider(0, 150, value=0, step=1, label="Hires steps", elem_id="txt2img_hires_steps")
        with gr.Row():
            f["hr_denoising_strength"] = gr.Slider(
                0, 1, value=0.7, step=0.01, label="Denoising strength", elem_id="txt2img_hr_denoising_strength",
            )
            f["hr_scale"] = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by", elem_id="txt2img_hr_scale")
        with gr.Row():
            f["hr_resize_x"] = gr.Slider(0, 2048, value=0, step=8, label="Resize width to", elem_id="txt2img_hr_resize_x")
            f["hr_resize_y"] = gr.Slider(0, 2048, value=0, step=8, label="Resize height to", elem_id="txt2img_hr_resize_y")


def _seed_rows(t: GenTab) -> None:
    f, name = t.fields, t.name
    with gr.Row(equal_height=True):
        f["seed"] = gr.Number(-1, precision=0, label="Seed (-1: random)", elem_id=f"{name}_seed", scale=4)
        t.seed_buttons["dice"] = gr.Button("⚄", elem_id=f"{name}_random_seed", scale=0, min_width=44, size="sm")
        t.seed_buttons["recycle"] = gr.Button("♻", elem_id=f"{name}_reuse_last_seed", scale=0, min_width=44, size="sm")
    with gr.Accordion("Variation seed", open=False, elem_id=f"{name}_variation"):
        with gr.Row(equal_height=True):
            f["subseed"] = gr.Number(-1, precision=0, label="Variation seed", elem_id=f"{name}_subseed", scale=4)
            t.seed_buttons["subseed_dice"] = gr.Button("⚄", elem_id=f"{name}_random_subseed", scale=0, min_width=44, size="sm")
            t.seed_buttons["subseed_recycle"] = gr.Button(
                "♻", elem_id=f"{name}_reuse_last_subseed", scale=0, min_width=44, size="sm",
            )
        f["subseed_strength"] = gr.Slider(
            0, 1, value=0, step=0.01, label="Variation strength", elem_id=f"{name}_subseed_strength",
        )
        with gr.Row():
            f["seed_resize_from_w"] = gr.Slider(
                0, 2048, value=0, step=8, label="Resize seed from width", elem_id=f"{name}_seed_resize_from_w",
            )
            f["seed_resize_from_h"] = gr.Slider(
                0, 2048, value=0, step=8, label="Resize seed from height", elem_id=f"{name}_seed_resize_from_h",
            )


def _inpaint_controls(t: GenTab) -> None:
    f = t.fields
    f["mask_blur"] = gr.Slider(0, 64, value=4, step=1, label="Mask blur", elem_id="inpaint_mask_blur")
    f["inpainting_mask_invert"] = gr.Radio(
        list(catalog.MASK_MODES), value=catalog.MASK_MODES[0], type="index", label="Mask mode",
        elem_id="inpaint_mask_mode",
    )
    f["inpainting_fill"] = gr.Radio(
        catalog.masked_content(), value="original", type="index", label="Masked content",
        elem_id="inpaint_masked_content",
    )
    with gr.Row():
        f["inpaint_full_res"] = gr.Radio(
            list(catalog.INPAINT_AREAS), value=catalog.INPAINT_AREAS[0], type="index", label="Inpaint area",
            elem_id="inpaint_area",
        )
        f["inpaint_full_res_padding"] = gr.Slider(
            0, 256, value=32, step=4, label="Only masked padding, pixels", elem_id="inpaint_padding",
        )
    with gr.Accordion("Outpainting: extend the canvas", open=False, elem_id="inpaint_outpaint"):
        with gr.Row():
            for side in ("left", "right", "top", "bottom"):
                t.outpaint[side] = gr.Slider(0, 512, value=0, step=8, label=side.capitalize(),
                                             elem_id=f"inpaint_outpaint_{side}")
        t.outpaint["button"] = gr.Button("Extend canvas", elem_id="inpaint_extend_canvas")


def _pnginfo_tab() -> dict:
    with gr.Row():
        with gr.Column():
            image = gr.Image(
                label="Source", type="pil", image_mode=None, sources=["upload", "clipboard"], format="png",
                height=420, elem_id="pnginfo_image",
            )
        with gr.Column():
            text = gr.Textbox(label="Parameters", lines=8, interactive=False, buttons=["copy"], elem_id="pnginfo_text")
            fields = gr.JSON(label="Fields", elem_id="pnginfo_fields")
            with gr.Row():
                buttons = {
                    tab: gr.Button(f"Send to {TAB_LABELS[tab]}", elem_id=f"pnginfo_send_to_{tab}")
                    for tab in GENERATION_TABS
                }
    return {"image": image, "text": text, "fields": fields, "buttons": buttons}


def _settings_tab(app: App) -> dict:
    o = app.options.get()
    s: dict = {}
    gr.Markdown(
        f"Defaults for new pages, live previews and saving. Saved to `{app.settings.options_file}`; "
        "no restart needed (reload the page to see new defaults)."
    )
    with gr.Row():
        s["sampler_name"] = gr.Dropdown(catalog.samplers(), value=o.sampler_name, label="Default sampler",
                                        elem_id="settings_sampler")
        s["scheduler"] = gr.Dropdown(catalog.schedules(), value=o.scheduler, label="Default schedule type",
                                     elem_id="settings_scheduler")
    with gr.Row():
        s["steps"] = gr.Slider(1, 150, value=o.steps, step=1, label="Default sampling steps", elem_id="settings_steps")
        s["cfg_scale"] = gr.Slider(1, 30, value=o.cfg_scale, step=0.5, label="Default CFG Scale",
                                   elem_id="settings_cfg_scale")
    with gr.Row():
        s["width"] = gr.Slider(0, 2048, value=o.width, step=8, label="Default width (0: the model's size)",
                               elem_id="settings_width")
        s["height"] = gr.Slider(0, 2048, value=o.height, step=8, label="Default height (0: the model's size)",
                                elem_id="settings_height")
    with gr.Row():
        s["preview_every"] = gr.Slider(0, 100, value=o.preview_every, step=1,
                                       label="Live preview every N sampling steps (0: off)",
                                       elem_id="settings_preview_every")
        s["preview_method"] = gr.Radio(list(PREVIEW_METHODS), value=o.preview_method,
                                       label="Live preview method", elem_id="settings_preview_method")
    with gr.Row():
        s["outputs_folder"] = gr.Textbox(
            o.outputs_folder, label=f"Output folder (empty: {app.settings.outputs_dir}; relative paths are inside it)",
            elem_id="settings_outputs_folder",
        )
        s["filename_pattern"] = gr.Textbox(
            o.filename_pattern, label="File name pattern ([number] [seed] [date] [time] [model_name] "
            "[model_hash] [sampler] [steps] [cfg] [width] [height] [prompt_words])",
            elem_id="settings_filename_pattern",
        )
    s["apply"] = gr.Button("Apply settings", variant="primary", elem_id="settings_apply")
    s["message"] = gr.Markdown(elem_id="settings_message")
    return s


# -- events: top bar -------------------------------------------------------------------------------------


def _wire_top_bar(app: App, demo: gr.Blocks, top: TopBar, gen: dict[str, GenTab], settings: dict) -> None:
    sizes = [c for t in gen.values() for c in (t.fields["width"], t.fields["height"])]

    def status_stream(previous_size: int | None = None):
        """Yield the status line until no load is pending, then the final state."""
        while not app.models.ready.is_set():
            yield {top.status: app.models.status().text}
            app.models.ready.wait(STATUS_POLL_SECONDS)
        status = app.models.status()
        update = {
            top.status: status.text,
            top.checkpoint: gr.Dropdown(choices=app.models.checkpoint_names(), value=app.models.checkpoint_name),
            top.vae: gr.Dropdown(choices=app.models.vae_names(), value=app.models.vae_name),
        }
        size = app.models.default_size()
        if previous_size is not None and size != previous_size and not app.options.get().width:
            update.update({c: size for c in sizes})
        if status.state == "error" or (status.state == "ready" and "could not" in status.message):
            gr.Warning(status.message)
        yield update

    def switch(checkpoint: str, vae: str):
        previous = app.models.default_size()
        try:
            app.models.select(checkpoint, vae)
        except ModelError as exc:
            raise gr.Error(str(exc)) from None
        yield from status_stream(previous)

    def refresh():
        app.models.scan()
        return (
            gr.Dropdown(choices=app.models.checkpoint_names(), value=app.models.checkpoint_name),
            gr.Dropdown(choices=app.models.vae_names(), value=app.models.vae_name),
            app.models.status().text,
        )

    def page_defaults():
        """Options -> this page's generation fields, so new defaults apply without a restart."""
        o = app.options.get()
        width, height = app.default_size()
        out = {}
        for t in gen.values():
            f = t.fields
            out.update({f["sampler_name"]: o.sampler_name, f["scheduler"]: o.scheduler, f["steps"]: o.steps,
                        f["cfg_scale"]: o.cfg_scale, f["width"]: width, f["height"]: height})
        for key in ("sampler_name", "scheduler", "steps", "cfg_scale", "width", "height", "preview_every",
                    "preview_method", "outputs_folder", "filename_pattern"):
            out[settings[key]] = getattr(o, key)
        return out

    outputs = [top.status, top.checkpoint, top.vae, *sizes]
    top.checkpoint.input(switch, [top.checkpoint, top.vae], outputs, api_name="switch_checkpoint",
                         concurrency_limit=None, show_progress="hidden")
    top.vae.input(switch, [top.checkpoint, top.vae], outputs, api_visibility="private",
                  concurrency_limit=None, show_progress="hidden")
    top.refresh.click(refresh, None, [top.checkpoint, top.vae, top.status], api_name="refresh_models",
                      concurrency_limit=None)
    default_outputs = [c for t in gen.values() for k in ("sampler_name", "scheduler", "steps", "cfg_scale",
                                                             "width", "height") for c in [t.fields[k]]]
    default_outputs += [settings[k] for k in ("sampler_name", "scheduler", "steps", "cfg_scale", "width", "height",
                                              "preview_every", "preview_method", "outputs_folder",
                                              "filename_pattern")]

    def on_load():
        yield {**page_defaults(), top.status: app.models.status().text}
        yield from status_stream()

    load_outputs = list({id(c): c for c in [*outputs, *default_outputs]}.values())
    demo.load(on_load, None, load_outputs, api_visibility="private", concurrency_limit=None,
              show_progress="hidden")


# -- events: generation ------------------------------------------------------------------------------------


def _session(request: gr.Request | None) -> str:
    return (request.session_hash if request is not None else None) or "anonymous"


def _user_message(exc: BaseException) -> str:
    if isinstance(exc, ValueError):
        return str(exc)
    return f"generation failed: {type(exc).__name__}: {exc} (details in the server log)"


def _wire_generation(app: App, t: GenTab, top: TopBar) -> None:
    name = t.name
    outputs = [t.gallery, t.progress, t.infotext, t.state]

    def generate(request: gr.Request, **values):
        try:
            job = app.start_job(name, values, _session(request))
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        try:
            for event in app.jobs.stream(job):
                if isinstance(event, Waiting):
                    yield {t.progress: waiting_html(event)}
                elif isinstance(event, Progress):
                    update = {t.progress: progress_html(event)}
                    if event.preview is not None:
                        update[t.gallery] = [event.preview]
                    yield update
        finally:
            if not job.finished:  # the browser went away: stop the job
                job.token.interrupt()
        if job.error is not None:
            raise gr.Error(_user_message(job.error))
        for warning in job.warnings:
            gr.Warning(warning)
        if job.result is None:
            yield {t.progress: idle_html("Interrupted before it started"), t.gallery: []}
            return
        result = job.result
        n = len(result.images)
        if result.interrupted:
            gr.Info(f"Interrupted: kept {n} finished image{'s' if n != 1 else ''}")
            text = f"Interrupted after {_seconds(result.seconds)}: kept {n} image{'s' if n != 1 else ''}"
        else:
            text = f"Done: {n} image{'s' if n != 1 else ''} in {_seconds(result.seconds)}"
        state = {"infotexts": result.infotexts, "seeds": result.seeds, "subseeds": result.subseeds, "selected": 0}
        yield {
            t.gallery: list(result.images),
            t.progress: _bar(1.0 if n else 0.0, text, "interrupted" if result.interrupted else "done"),
            t.infotext: result.infotexts[0] if n else "",
            t.state: state,
        }

    def interrupt(request: gr.Request):
        app.jobs.interrupt(_session(request))

    def skip(request: gr.Request):
        app.jobs.skip(_session(request))

    public = name == "txt2img"
    t.generate.click(
        generate, inputs_kwargs={k: t.fields[k] for k in TAB_FIELDS[name]}, outputs=outputs, api_name=name,
        concurrency_limit=8, concurrency_id="generate", show_progress="hidden",
    )
    t.interrupt.click(interrupt, None, None, api_name="interrupt" if public else None,
                      api_visibility="public" if public else "private", concurrency_limit=None,
                      show_progress="hidden")
    t.skip.click(skip, None, None, api_name="skip" if public else None,
                 api_visibility="public" if public else "private", concurrency_limit=None,
                 show_progress="hidden")

    def count(text: str, steps: float, is_positive: bool) -> str:
        if "ldm_core.conditioning" not in sys.modules:
            return '<span class="ldm-tokens">…/75</span>'
        from ldm_core.conditioning import count_tokens

        used, limit = count_tokens(text or "", int(steps or 1), embeddings=app.models.embeddings,
                                   is_positive=is_positive)
        cls = "ldm-tokens ldm-tokens-more" if limit > 75 else "ldm-tokens"
        return f'<span class="{cls}">{used}/{limit}</span>'

    for key, positive in (("prompt", True), ("negative_prompt", False)):
        t.fields[key].change(
            lambda text, steps, _p=positive: count(text, steps, _p), [t.fields[key], t.fields["steps"]],
            t.counters[key], api_visibility="private", concurrency_limit=None, show_progress="hidden",
            trigger_mode="always_last",
        )

    f = t.fields
    t.seed_buttons["dice"].click(None, None, f["seed"], js="() => -1", api_visibility="private")
    t.seed_buttons["subseed_dice"].click(None, None, f["subseed"], js="() => -1", api_visibility="private")
    t.swap.click(None, [f["width"], f["height"]], [f["width"], f["height"]], js="(w, h) => [h, w]",
                 api_visibility="private")

    def last_seed(state: dict, key: str):
        values = (state or {}).get(key) or []
        if not values:
            gr.Info("No image generated yet in this tab")
            return gr.skip()
        selected = min(int(state.get("selected", 0)), len(values) - 1)
        return values[selected]

    t.seed_buttons["recycle"].click(lambda s: last_seed(s, "seeds"), t.state, f["seed"], api_visibility="private",
                                    concurrency_limit=None, show_progress="hidden")
    t.reuse_seed.click(lambda s: last_seed(s, "seeds"), t.state, f["seed"], api_visibility="private",
                       concurrency_limit=None, show_progress="hidden")
    t.seed_buttons["subseed_recycle"].click(lambda s: last_seed(s, "subseeds"), t.state, f["subseed"],
                                            api_visibility="private", concurrency_limit=None,
                                            show_progress="hidden")


def _paste(target: GenTab, text: str) -> tuple[dict, list[str]]:
    """Updates that put the fields of infotext `text` into `target`'s form."""
    pasted = fields_from_infotext(text)
    updates = {target.fields[k]: v for k, v in pasted.values.items() if k in target.fields and k != "init_image"}
    return updates, pasted.notes


def _wire_results(app: App, t: GenTab, tabs: gr.Tabs, gen: dict[str, GenTab]) -> None:
    def select(state: dict, evt: gr.SelectData):
        state = dict(state or {})
        infotexts = state.get("infotexts") or []
        if not infotexts or evt.index is None:
            return state, gr.skip()
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        state["selected"] = min(index, len(infotexts) - 1)
        return state, infotexts[state["selected"]]

    t.gallery.select(select, t.state, [t.state, t.infotext], api_visibility="private", concurrency_limit=None,
                     show_progress="hidden")

    for target_name, button in (("img2img", t.send_img2img), ("inpaint", t.send_inpaint)):
        target = gen[target_name]

        def send(gallery, state, _target=target):
            state = state or {}
            infotexts = state.get("infotexts") or []
            if not gallery or not infotexts:
                raise gr.Error("Generate an image first")
            index = min(int(state.get("selected", 0)), len(gallery) - 1, len(infotexts) - 1)
            item = gallery[index]
            image = item[0] if isinstance(item, (tuple, list)) else item
            image = image.convert("RGB")
            updates, _ = _paste(_target, infotexts[index])
            updates[tabs] = gr.Tabs(selected=_target.name)
            updates.update(_image_update(_target, image))
            return updates

        outputs = [tabs, target.fields["init_image"], *_pasteable(target)]
        button.click(send, [t.gallery, t.state], outputs, api_visibility="private", concurrency_limit=None,
                     show_progress="hidden")


def _pasteable(target: GenTab) -> list:
    return [c for k, c in target.fields.items() if k not in ("init_image", "clip_skip")] + [target.fields["clip_skip"]]


def _image_update(target: GenTab, image: Image.Image) -> dict:
    if target.name == "inpaint":
        return {target.fields["init_image"]: {"background": image, "layers": [], "composite": image}}
    return {target.fields["init_image"]: image}


def _wire_outpaint(t: GenTab) -> None:
    o = t.outpaint

    def extend(editor, left, right, top, bottom):
        from ldm_core.pipeline import outpaint_pad

        if not isinstance(editor, dict) or editor.get("background") is None:
            raise gr.Error("Upload an image into the editor first")
        amounts = {k: int(v or 0) for k, v in (("left", left), ("right", right), ("top", top), ("bottom", bottom))}
        if not any(amounts.values()):
            raise gr.Error("Choose how many pixels to add on at least one side")
        background = editor["background"].convert("RGB")
        padded, new_area = outpaint_pad(background, **amounts)
        mask = np.asarray(new_area) > 0
        for layer in editor.get("layers") or []:  # keep what was painted already
            if layer is not None and layer.mode == "RGBA":
                a = np.asarray(layer.resize(background.size, Image.Resampling.NEAREST).getchannel("A")) > 0
                mask[amounts["top"]: amounts["top"] + background.height,
                     amounts["left"]: amounts["left"] + background.width] |= a
        layer = np.zeros((*mask.shape, 4), dtype=np.uint8)
        layer[mask] = (255, 255, 255, 255)
        w, h = padded.size
        return {
            t.fields["init_image"]: {"background": padded, "layers": [Image.fromarray(layer, "RGBA")],
                                     "composite": padded},
            t.fields["inpainting_fill"]: "fill",
            t.fields["width"]: max(64, min(2048, w // 8 * 8)),
            t.fields["height"]: max(64, min(2048, h // 8 * 8)),
        }

    o["button"].click(
        extend, [t.fields["init_image"], o["left"], o["right"], o["top"], o["bottom"]],
        [t.fields["init_image"], t.fields["inpainting_fill"], t.fields["width"], t.fields["height"]],
        api_name="extend_canvas", concurrency_limit=None,
    )


# -- events: PNG Info and settings ---------------------------------------------------------------------


def _wire_pnginfo(png: dict, tabs: gr.Tabs, gen: dict[str, GenTab]) -> None:
    def read(image):
        if image is None:
            return "", None
        from ldm_core.infotext import parse_infotext, read_infotext_from_image

        text = read_infotext_from_image(image)
        if not text:
            gr.Warning("This image carries no generation parameters")
            return "", None
        prompt, negative, params = parse_infotext(text, defaults=False)
        return text, {"Prompt": prompt, "Negative prompt": negative, **params}

    png["image"].change(read, png["image"], [png["text"], png["fields"]], api_name="png_info", concurrency_limit=None)

    for name, button in png["buttons"].items():
        target = gen[name]

        def send(text, image, _target=target):
            if not text:
                raise gr.Error("Drop a PNG with generation parameters first")
            updates, notes = _paste(_target, text)
            for note in notes:
                gr.Info(note)
            updates[tabs] = gr.Tabs(selected=_target.name)
            if _target.name != "txt2img" and image is not None:
                updates.update(_image_update(_target, image.convert("RGB")))
            return updates

        outputs = [tabs, *_pasteable(target)]
        if name != "txt2img":
            outputs.insert(1, target.fields["init_image"])
        button.click(send, [png["text"], png["image"]], outputs, api_name=f"pnginfo_to_{name}",
                     concurrency_limit=None)


def _wire_settings(app: App, s: dict) -> None:
    keys = ("sampler_name", "scheduler", "steps", "cfg_scale", "width", "height", "preview_every",
            "preview_method", "outputs_folder", "filename_pattern")

    def apply(**values):
        try:
            opts = app.apply_options(**values)
        except (OptionsError, PermissionError, FieldError) as exc:
            raise gr.Error(str(exc)) from None
        stamp = time.strftime("%H:%M:%S")
        return (f"Saved at {stamp}. Previews and saving use the new settings from the next image; "
                f"reload the page for the new defaults. Images go to `{app.outputs_root(opts)}`.")

    s["apply"].click(apply, inputs_kwargs={k: s[k] for k in keys}, outputs=s["message"], api_name="apply_settings",
                     concurrency_limit=None)
