"""The page layout: top bar and the txt2img / img2img / Inpaint / PNG Info / Settings tabs.

Every component that matters to a test or a shortcut has an `elem_id` (`<tab>_generate`,
`<tab>_prompt`, `<tab>_gallery`, ...). The events are wired in `webui.events`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import gradio as gr

from webui import catalog, events
from webui.fields import TAB_FIELDS
from webui.settings import PREVIEW_METHODS

if TYPE_CHECKING:
    from webui.app import App

GENERATION_TABS = ("txt2img", "img2img", "inpaint")
TAB_LABELS = {"txt2img": "txt2img", "img2img": "img2img", "inpaint": "Inpaint"}


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


# -- building ------------------------------------------------------------------------------------------


def build(app: App) -> gr.Blocks:
    opts = app.options.get()
    width, height = app.default_size()
    # every result is also copied into Gradio's cache: clear day-old copies once an hour
    with gr.Blocks(title="ldm-webui", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
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
        events.wire_top_bar(app, demo, top, gen, settings)
        for tab in gen.values():
            events.wire_generation(app, tab, top)
            events.wire_results(app, tab, tabs, gen)
        events.wire_outpaint(gen["inpaint"])
        events.wire_pnginfo(png, tabs, gen)
        events.wire_settings(app, settings)
    return demo


def _top_bar(app: App) -> TopBar:
    names = app.models.checkpoint_names()
    candidates, _ = app.models.startup_candidates()
    with gr.Row(elem_id="topbar", equal_height=True):
        checkpoint = gr.Dropdown(
            names,
            value=candidates[0] if candidates else None,
            label="Checkpoint",
            elem_id="checkpoint",
            scale=4,
        )
        vae = gr.Dropdown(
            app.models.vae_names(), value=app.models.vae_name, label="VAE", elem_id="vae", scale=2
        )
        refresh = gr.Button("↻", elem_id="refresh_models", scale=0, min_width=44, size="sm")
        clip_skip = gr.Slider(
            1, 12, value=1, step=1, label="Clip skip", elem_id="clip_skip", scale=2
        )
        status = gr.Markdown(app.models.status().text, elem_id="model_status")
    return TopBar(checkpoint, vae, refresh, clip_skip, status)


def _counter(elem_id: str) -> gr.HTML:
    return gr.HTML(
        '<span class="ldm-tokens">0/75</span>', elem_id=elem_id, elem_classes="ldm-token-counter"
    )


def _generation_tab(name: str, opts, width: int, height: int, clip_skip: gr.Slider) -> GenTab:
    t = GenTab(name)
    f = t.fields
    with gr.Row(elem_classes="ldm-toprow"):
        with gr.Column(scale=6):
            f["prompt"] = gr.Textbox(
                "",
                label="Prompt",
                lines=3,
                max_lines=12,
                elem_id=f"{name}_prompt",
                placeholder="Prompt (Ctrl+Enter generates, Esc interrupts)",
            )
            t.counters["prompt"] = _counter(f"{name}_token_counter")
            f["negative_prompt"] = gr.Textbox(
                "",
                label="Negative prompt",
                lines=2,
                max_lines=8,
                elem_id=f"{name}_neg_prompt",
                placeholder="Negative prompt",
            )
            t.counters["negative_prompt"] = _counter(f"{name}_negative_token_counter")
        with gr.Column(scale=1, min_width=200, elem_classes="ldm-buttons"):
            t.generate = gr.Button(
                "Generate", variant="primary", elem_id=f"{name}_generate", size="lg"
            )
            with gr.Row():
                t.interrupt = gr.Button(
                    "Interrupt", variant="stop", elem_id=f"{name}_interrupt", size="sm"
                )
                t.skip = gr.Button("Skip", elem_id=f"{name}_skip", size="sm")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, elem_id=f"{name}_settings"):
            if name == "img2img":
                f["init_image"] = gr.Image(
                    label="Image for img2img",
                    type="pil",
                    image_mode="RGB",
                    sources=["upload", "clipboard"],
                    format="png",
                    height=360,
                    elem_id="img2img_image",
                )
            elif name == "inpaint":
                f["init_image"] = gr.ImageEditor(
                    label="Image (paint the area to change)",
                    type="pil",
                    image_mode="RGBA",
                    sources=["upload", "clipboard"],
                    layers=False,
                    transforms=(),
                    format="png",
                    height=480,
                    brush=gr.Brush(colors=["#ffffff", "#000000", "#ff3c3c"], color_mode="defaults"),
                    eraser=gr.Eraser(),
                    elem_id="inpaint_editor",
                )
            if name in ("img2img", "inpaint"):
                f["resize_mode"] = gr.Radio(
                    catalog.resize_modes(),
                    value=catalog.resize_modes()[0],
                    type="index",
                    label="Resize mode",
                    elem_id=f"{name}_resize_mode",
                )
            with gr.Row():
                f["sampler_name"] = gr.Dropdown(
                    catalog.samplers(),
                    value=opts.sampler_name,
                    label="Sampling method",
                    elem_id=f"{name}_sampler",
                )
                f["scheduler"] = gr.Dropdown(
                    catalog.schedules(),
                    value=opts.scheduler,
                    label="Schedule type",
                    elem_id=f"{name}_scheduler",
                )
            f["steps"] = gr.Slider(
                1, 150, value=opts.steps, step=1, label="Sampling steps", elem_id=f"{name}_steps"
            )
            if name == "txt2img":
                _hires_accordion(f)
            with gr.Row():
                with gr.Column(scale=4):
                    f["width"] = gr.Slider(
                        64, 2048, value=width, step=8, label="Width", elem_id=f"{name}_width"
                    )
                    f["height"] = gr.Slider(
                        64, 2048, value=height, step=8, label="Height", elem_id=f"{name}_height"
                    )
                t.swap = gr.Button(
                    "⇅", elem_id=f"{name}_swap_size", scale=0, min_width=44, size="sm"
                )
                with gr.Column(scale=2, min_width=120):
                    f["n_iter"] = gr.Slider(
                        1, 100, value=1, step=1, label="Batch count", elem_id=f"{name}_batch_count"
                    )
                    f["batch_size"] = gr.Slider(
                        1, 8, value=1, step=1, label="Batch size", elem_id=f"{name}_batch_size"
                    )
            f["cfg_scale"] = gr.Slider(
                1,
                30,
                value=opts.cfg_scale,
                step=0.5,
                label="CFG Scale",
                elem_id=f"{name}_cfg_scale",
            )
            if name in ("img2img", "inpaint"):
                f["denoising_strength"] = gr.Slider(
                    0,
                    1,
                    value=0.75,
                    step=0.01,
                    label="Denoising strength",
                    elem_id=f"{name}_denoising_strength",
                )
            _seed_rows(t)
            if name == "inpaint":
                _inpaint_controls(t)
        with gr.Column(scale=1, elem_id=f"{name}_results"):
            t.progress = gr.HTML(events.idle_html(), elem_id=f"{name}_progress")
            t.gallery = gr.Gallery(
                label="Output",
                show_label=False,
                format="png",
                type="pil",
                columns=2,
                height=520,
                object_fit="contain",
                preview=True,
                interactive=False,
                elem_id=f"{name}_gallery",
            )
            with gr.Row():
                t.send_img2img = gr.Button(
                    "Send to img2img", size="sm", elem_id=f"{name}_send_to_img2img"
                )
                t.send_inpaint = gr.Button(
                    "Send to inpaint", size="sm", elem_id=f"{name}_send_to_inpaint"
                )
                t.reuse_seed = gr.Button("♻ Reuse seed", size="sm", elem_id=f"{name}_reuse_seed")
            t.infotext = gr.Textbox(
                label="Generation parameters",
                lines=4,
                interactive=False,
                buttons=["copy"],
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
                catalog.hires_upscalers(),
                value="Latent",
                label="Upscaler",
                elem_id="txt2img_hr_upscaler",
            )
            f["hr_second_pass_steps"] = gr.Slider(
                0, 150, value=0, step=1, label="Hires steps", elem_id="txt2img_hires_steps"
            )
        with gr.Row():
            f["hr_denoising_strength"] = gr.Slider(
                0,
                1,
                value=0.7,
                step=0.01,
                label="Denoising strength",
                elem_id="txt2img_hr_denoising_strength",
            )
            f["hr_scale"] = gr.Slider(
                1, 4, value=2, step=0.05, label="Upscale by", elem_id="txt2img_hr_scale"
            )
        with gr.Row():
            f["hr_resize_x"] = gr.Slider(
                0, 2048, value=0, step=8, label="Resize width to", elem_id="txt2img_hr_resize_x"
            )
            f["hr_resize_y"] = gr.Slider(
                0, 2048, value=0, step=8, label="Resize height to", elem_id="txt2img_hr_resize_y"
            )


def _seed_rows(t: GenTab) -> None:
    f, name = t.fields, t.name
    with gr.Row(equal_height=True):
        f["seed"] = gr.Number(
            -1, precision=0, label="Seed (-1: random)", elem_id=f"{name}_seed", scale=4
        )
        t.seed_buttons["dice"] = gr.Button(
            "⚄", elem_id=f"{name}_random_seed", scale=0, min_width=44, size="sm"
        )
        t.seed_buttons["recycle"] = gr.Button(
            "♻", elem_id=f"{name}_reuse_last_seed", scale=0, min_width=44, size="sm"
        )
    with gr.Accordion("Variation seed", open=False, elem_id=f"{name}_variation"):
        with gr.Row(equal_height=True):
            f["subseed"] = gr.Number(
                -1, precision=0, label="Variation seed", elem_id=f"{name}_subseed", scale=4
            )
            t.seed_buttons["subseed_dice"] = gr.Button(
                "⚄", elem_id=f"{name}_random_subseed", scale=0, min_width=44, size="sm"
            )
            t.seed_buttons["subseed_recycle"] = gr.Button(
                "♻",
                elem_id=f"{name}_reuse_last_subseed",
                scale=0,
                min_width=44,
                size="sm",
            )
        f["subseed_strength"] = gr.Slider(
            0,
            1,
            value=0,
            step=0.01,
            label="Variation strength",
            elem_id=f"{name}_subseed_strength",
        )
        with gr.Row():
            f["seed_resize_from_w"] = gr.Slider(
                0,
                2048,
                value=0,
                step=8,
                label="Resize seed from width",
                elem_id=f"{name}_seed_resize_from_w",
            )
            f["seed_resize_from_h"] = gr.Slider(
                0,
                2048,
                value=0,
                step=8,
                label="Resize seed from height",
                elem_id=f"{name}_seed_resize_from_h",
            )


def _inpaint_controls(t: GenTab) -> None:
    f = t.fields
    f["mask_blur"] = gr.Slider(
        0, 64, value=4, step=1, label="Mask blur", elem_id="inpaint_mask_blur"
    )
    f["inpainting_mask_invert"] = gr.Radio(
        list(catalog.MASK_MODES),
        value=catalog.MASK_MODES[0],
        type="index",
        label="Mask mode",
        elem_id="inpaint_mask_mode",
    )
    f["inpainting_fill"] = gr.Radio(
        catalog.masked_content(),
        value="original",
        type="index",
        label="Masked content",
        elem_id="inpaint_masked_content",
    )
    with gr.Row():
        f["inpaint_full_res"] = gr.Radio(
            list(catalog.INPAINT_AREAS),
            value=catalog.INPAINT_AREAS[0],
            type="index",
            label="Inpaint area",
            elem_id="inpaint_area",
        )
        f["inpaint_full_res_padding"] = gr.Slider(
            0,
            256,
            value=32,
            step=4,
            label="Only masked padding, pixels",
            elem_id="inpaint_padding",
        )
    with gr.Accordion("Outpainting: extend the canvas", open=False, elem_id="inpaint_outpaint"):
        with gr.Row():
            for side in ("left", "right", "top", "bottom"):
                t.outpaint[side] = gr.Slider(
                    0,
                    512,
                    value=0,
                    step=8,
                    label=side.capitalize(),
                    elem_id=f"inpaint_outpaint_{side}",
                )
        t.outpaint["button"] = gr.Button("Extend canvas", elem_id="inpaint_extend_canvas")


def _pnginfo_tab() -> dict:
    with gr.Row():
        with gr.Column():
            image = gr.Image(
                label="Source",
                type="pil",
                image_mode=None,
                sources=["upload", "clipboard"],
                format="png",
                height=420,
                elem_id="pnginfo_image",
            )
        with gr.Column():
            text = gr.Textbox(
                label="Parameters",
                lines=8,
                interactive=False,
                buttons=["copy"],
                elem_id="pnginfo_text",
            )
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
        s["sampler_name"] = gr.Dropdown(
            catalog.samplers(),
            value=o.sampler_name,
            label="Default sampler",
            elem_id="settings_sampler",
        )
        s["scheduler"] = gr.Dropdown(
            catalog.schedules(),
            value=o.scheduler,
            label="Default schedule type",
            elem_id="settings_scheduler",
        )
    with gr.Row():
        s["steps"] = gr.Slider(
            1, 150, value=o.steps, step=1, label="Default sampling steps", elem_id="settings_steps"
        )
        s["cfg_scale"] = gr.Slider(
            1,
            30,
            value=o.cfg_scale,
            step=0.5,
            label="Default CFG Scale",
            elem_id="settings_cfg_scale",
        )
    with gr.Row():
        s["width"] = gr.Slider(
            0,
            2048,
            value=o.width,
            step=8,
            label="Default width (0: the model's size)",
            elem_id="settings_width",
        )
        s["height"] = gr.Slider(
            0,
            2048,
            value=o.height,
            step=8,
            label="Default height (0: the model's size)",
            elem_id="settings_height",
        )
    with gr.Row():
        s["preview_every"] = gr.Slider(
            0,
            100,
            value=o.preview_every,
            step=1,
            label="Live preview every N sampling steps (0: off)",
            elem_id="settings_preview_every",
        )
        s["preview_method"] = gr.Radio(
            list(PREVIEW_METHODS),
            value=o.preview_method,
            label="Live preview method",
            elem_id="settings_preview_method",
        )
    with gr.Row():
        s["outputs_folder"] = gr.Textbox(
            o.outputs_folder,
            label=f"Output folder (empty: {app.settings.outputs_dir}; relative paths are inside it)",
            elem_id="settings_outputs_folder",
        )
        s["filename_pattern"] = gr.Textbox(
            o.filename_pattern,
            label="File name pattern ([number] [seed] [date] [time] [model_name] "
            "[model_hash] [sampler] [steps] [cfg] [width] [height] [prompt_words])",
            elem_id="settings_filename_pattern",
        )
    s["apply"] = gr.Button("Apply settings", variant="primary", elem_id="settings_apply")
    s["message"] = gr.Markdown(elem_id="settings_message")
    return s
