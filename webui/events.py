"""The page's events: generation handlers that stream progress and previews, model switching,
"send to" and PNG Info pasting, outpainting, settings.

Generation handlers are generators: they stream the progress bar and live previews while the
job waits and runs, then the PNG results.
"""

from __future__ import annotations

import html
import logging
import sys
import time
from typing import TYPE_CHECKING

import gradio as gr
import numpy as np
from PIL import Image

from webui.fields import TAB_FIELDS, FieldError, fields_from_infotext
from webui.jobs import Progress, Waiting
from webui.models import ModelError
from webui.settings import OptionsError

if TYPE_CHECKING:
    from webui.app import App
    from webui.ui import GenTab, TopBar

log = logging.getLogger(__name__)

STATUS_POLL_SECONDS = 0.4

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


# -- events: top bar -------------------------------------------------------------------------------------


def wire_top_bar(
    app: App, demo: gr.Blocks, top: TopBar, gen: dict[str, GenTab], settings: dict
) -> None:
    sizes = [c for t in gen.values() for c in (t.fields["width"], t.fields["height"])]

    def status_stream(previous_size: int | None = None, warn: bool = False):
        """Yield the status line until no load is pending, then the final state."""
        while not app.models.ready.is_set():
            yield {top.status: app.models.status().text}
            app.models.ready.wait(STATUS_POLL_SECONDS)
        status = app.models.status()
        update = {
            top.status: status.text,
            top.checkpoint: gr.Dropdown(
                choices=app.models.checkpoint_names(), value=app.models.checkpoint_name
            ),
            top.vae: gr.Dropdown(choices=app.models.vae_names(), value=app.models.vae_name),
        }
        size = app.models.default_size()
        if previous_size is not None and size != previous_size and not app.options.get().width:
            update.update({c: size for c in sizes})
        if warn and (status.state == "error" or "could not" in status.message):
            gr.Warning(status.message)
        yield update

    def switch(checkpoint: str, vae: str):
        previous = app.models.default_size()
        try:
            app.models.select(checkpoint, vae)
        except ModelError as exc:
            # put the dropdowns back on the model in use, then say why
            yield {
                top.checkpoint: gr.Dropdown(
                    choices=app.models.checkpoint_names(), value=app.models.checkpoint_name
                ),
                top.vae: gr.Dropdown(value=app.models.vae_name),
                top.status: app.models.status().text,
            }
            raise gr.Error(str(exc)) from None
        yield from status_stream(previous, warn=True)

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
            out.update(
                {
                    f["sampler_name"]: o.sampler_name,
                    f["scheduler"]: o.scheduler,
                    f["steps"]: o.steps,
                    f["cfg_scale"]: o.cfg_scale,
                    f["width"]: width,
                    f["height"]: height,
                }
            )
        for key in (
            "sampler_name",
            "scheduler",
            "steps",
            "cfg_scale",
            "width",
            "height",
            "preview_every",
            "preview_method",
            "outputs_folder",
            "filename_pattern",
        ):
            out[settings[key]] = getattr(o, key)
        return out

    outputs = [top.status, top.checkpoint, top.vae, *sizes]
    top.checkpoint.select(
        switch,
        [top.checkpoint, top.vae],
        outputs,
        api_name="switch_checkpoint",
        concurrency_limit=None,
        show_progress="hidden",
    )
    top.vae.select(
        switch,
        [top.checkpoint, top.vae],
        outputs,
        api_visibility="private",
        concurrency_limit=None,
        show_progress="hidden",
    )
    top.refresh.click(
        refresh,
        None,
        [top.checkpoint, top.vae, top.status],
        api_name="refresh_models",
        concurrency_limit=None,
    )
    default_outputs = [
        c
        for t in gen.values()
        for k in ("sampler_name", "scheduler", "steps", "cfg_scale", "width", "height")
        for c in [t.fields[k]]
    ]
    default_outputs += [
        settings[k]
        for k in (
            "sampler_name",
            "scheduler",
            "steps",
            "cfg_scale",
            "width",
            "height",
            "preview_every",
            "preview_method",
            "outputs_folder",
            "filename_pattern",
        )
    ]

    def on_load():
        yield {**page_defaults(), top.status: app.models.status().text}
        yield from status_stream()

    load_outputs = list({id(c): c for c in [*outputs, *default_outputs]}.values())
    demo.load(
        on_load,
        None,
        load_outputs,
        api_visibility="private",
        concurrency_limit=None,
        show_progress="hidden",
    )


# -- events: generation ------------------------------------------------------------------------------------


def _session(request: gr.Request | None) -> str:
    return (request.session_hash if request is not None else None) or "anonymous"


def _user_message(exc: BaseException) -> str:
    if isinstance(exc, ValueError):
        return str(exc)
    return f"generation failed: {type(exc).__name__}: {exc} (details in the server log)"


def wire_generation(app: App, t: GenTab, top: TopBar) -> None:
    name = t.name
    outputs = [t.gallery, t.progress, t.infotext, t.state]

    def generate(request: gr.Request, **values):
        try:
            job = app.start_job(name, values, _session(request))
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        fraction = 0.0
        try:
            for event in app.jobs.stream(job):
                if isinstance(event, Waiting):
                    yield {t.progress: waiting_html(event)}
                elif isinstance(event, Progress):
                    fraction = event.fraction
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
        state = {
            "infotexts": result.infotexts,
            "seeds": result.seeds,
            "subseeds": result.subseeds,
            "selected": 0,
        }
        yield {
            t.gallery: list(result.images),
            t.progress: _bar(
                fraction if result.interrupted else 1.0,
                text,
                "interrupted" if result.interrupted else "done",
            ),
            t.infotext: result.infotexts[0] if n else "",
            t.state: state,
        }

    def interrupt(request: gr.Request):
        app.jobs.interrupt(_session(request))

    def skip(request: gr.Request):
        app.jobs.skip(_session(request))

    public = name == "txt2img"
    t.generate.click(
        generate,
        inputs_kwargs={k: t.fields[k] for k in TAB_FIELDS[name]},
        outputs=outputs,
        api_name=name,
        concurrency_limit=8,
        concurrency_id="generate",
        show_progress="hidden",
    )
    t.interrupt.click(
        interrupt,
        None,
        None,
        api_name="interrupt" if public else None,
        api_visibility="public" if public else "private",
        concurrency_limit=None,
        show_progress="hidden",
    )
    t.skip.click(
        skip,
        None,
        None,
        api_name="skip" if public else None,
        api_visibility="public" if public else "private",
        concurrency_limit=None,
        show_progress="hidden",
    )

    def count(text: str, steps: float, is_positive: bool) -> str:
        if not app.models.core_loaded.is_set() and "ldm_core.conditioning" not in sys.modules:
            return '<span class="ldm-tokens">…/75</span>'  # the core is still being imported
        from ldm_core.conditioning import count_tokens

        used, limit = count_tokens(
            text or "", int(steps or 1), embeddings=app.models.embeddings, is_positive=is_positive
        )
        cls = "ldm-tokens ldm-tokens-more" if limit > 75 else "ldm-tokens"
        return f'<span class="{cls}">{used}/{limit}</span>'

    for key, positive in (("prompt", True), ("negative_prompt", False)):
        t.fields[key].change(
            lambda text, steps, _p=positive: count(text, steps, _p),
            [t.fields[key], t.fields["steps"]],
            t.counters[key],
            api_visibility="private",
            concurrency_limit=None,
            show_progress="hidden",
            trigger_mode="always_last",
        )

    f = t.fields
    t.seed_buttons["dice"].click(None, None, f["seed"], js="() => -1", api_visibility="private")
    t.seed_buttons["subseed_dice"].click(
        None, None, f["subseed"], js="() => -1", api_visibility="private"
    )
    t.swap.click(
        None,
        [f["width"], f["height"]],
        [f["width"], f["height"]],
        js="(w, h) => [h, w]",
        api_visibility="private",
    )

    def last_seed(state: dict, key: str):
        values = (state or {}).get(key) or []
        if not values:
            gr.Info("No image generated yet in this tab")
            return gr.skip()
        selected = min(int(state.get("selected", 0)), len(values) - 1)
        return values[selected]

    t.seed_buttons["recycle"].click(
        lambda s: last_seed(s, "seeds"),
        t.state,
        f["seed"],
        api_visibility="private",
        concurrency_limit=None,
        show_progress="hidden",
    )
    t.reuse_seed.click(
        lambda s: last_seed(s, "seeds"),
        t.state,
        f["seed"],
        api_visibility="private",
        concurrency_limit=None,
        show_progress="hidden",
    )
    t.seed_buttons["subseed_recycle"].click(
        lambda s: last_seed(s, "subseeds"),
        t.state,
        f["subseed"],
        api_visibility="private",
        concurrency_limit=None,
        show_progress="hidden",
    )


def _paste(target: GenTab, text: str) -> tuple[dict, list[str]]:
    """Updates that put the fields of infotext `text` into `target`'s form."""
    pasted = fields_from_infotext(text)
    updates = {
        target.fields[k]: v
        for k, v in pasted.values.items()
        if k in target.fields and k != "init_image"
    }
    return updates, pasted.notes


def wire_results(app: App, t: GenTab, tabs: gr.Tabs, gen: dict[str, GenTab]) -> None:
    def select(state: dict, evt: gr.SelectData):
        state = dict(state or {})
        infotexts = state.get("infotexts") or []
        if not infotexts or evt.index is None:
            return state, gr.skip()
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        state["selected"] = min(index, len(infotexts) - 1)
        return state, infotexts[state["selected"]]

    t.gallery.select(
        select,
        t.state,
        [t.state, t.infotext],
        api_visibility="private",
        concurrency_limit=None,
        show_progress="hidden",
    )

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
        button.click(
            send,
            [t.gallery, t.state],
            outputs,
            api_visibility="private",
            concurrency_limit=None,
            show_progress="hidden",
        )


def _pasteable(target: GenTab) -> list:
    return [c for k, c in target.fields.items() if k not in ("init_image", "clip_skip")] + [
        target.fields["clip_skip"]
    ]


def _image_update(target: GenTab, image: Image.Image) -> dict:
    if target.name == "inpaint":
        return {
            target.fields["init_image"]: {"background": image, "layers": [], "composite": image}
        }
    return {target.fields["init_image"]: image}


def wire_outpaint(t: GenTab) -> None:
    o = t.outpaint

    def extend(editor, left, right, top, bottom):
        from ldm_core.pipeline import outpaint_pad

        if not isinstance(editor, dict) or editor.get("background") is None:
            raise gr.Error("Upload an image into the editor first")
        amounts = {
            k: int(v or 0)
            for k, v in (("left", left), ("right", right), ("top", top), ("bottom", bottom))
        }
        if not any(amounts.values()):
            raise gr.Error("Choose how many pixels to add on at least one side")
        background = editor["background"].convert("RGB")
        padded, new_area = outpaint_pad(background, **amounts)
        mask = np.asarray(new_area) > 0
        for layer in editor.get("layers") or []:  # keep what was painted already
            if layer is not None and layer.mode == "RGBA":
                a = (
                    np.asarray(
                        layer.resize(background.size, Image.Resampling.NEAREST).getchannel("A")
                    )
                    > 0
                )
                mask[
                    amounts["top"] : amounts["top"] + background.height,
                    amounts["left"] : amounts["left"] + background.width,
                ] |= a
        layer = np.zeros((*mask.shape, 4), dtype=np.uint8)
        layer[mask] = (255, 255, 255, 255)
        w, h = padded.size
        return {
            t.fields["init_image"]: {
                "background": padded,
                "layers": [Image.fromarray(layer, "RGBA")],
                "composite": padded,
            },
            t.fields["inpainting_fill"]: "fill",
            t.fields["width"]: max(64, min(2048, w // 8 * 8)),
            t.fields["height"]: max(64, min(2048, h // 8 * 8)),
        }

    o["button"].click(
        extend,
        [t.fields["init_image"], o["left"], o["right"], o["top"], o["bottom"]],
        [
            t.fields["init_image"],
            t.fields["inpainting_fill"],
            t.fields["width"],
            t.fields["height"],
        ],
        api_name="extend_canvas",
        concurrency_limit=None,
    )


# -- events: PNG Info and settings ---------------------------------------------------------------------


def wire_pnginfo(png: dict, tabs: gr.Tabs, gen: dict[str, GenTab]) -> None:
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

    png["image"].change(
        read,
        png["image"],
        [png["text"], png["fields"]],
        api_name="png_info",
        concurrency_limit=None,
    )

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
        button.click(
            send,
            [png["text"], png["image"]],
            outputs,
            api_name=f"pnginfo_to_{name}",
            concurrency_limit=None,
        )


def wire_settings(app: App, s: dict) -> None:
    keys = (
        "sampler_name",
        "scheduler",
        "steps",
        "cfg_scale",
        "width",
        "height",
        "preview_every",
        "preview_method",
        "outputs_folder",
        "filename_pattern",
    )

    def apply(**values):
        try:
            opts = app.apply_options(**values)
        except (OptionsError, PermissionError, FieldError) as exc:
            raise gr.Error(str(exc)) from None
        stamp = time.strftime("%H:%M:%S")
        return (
            f"Saved at {stamp}. Previews and saving use the new settings from the next image; "
            f"reload the page for the new defaults. Images go to `{app.outputs_root(opts)}`."
        )

    s["apply"].click(
        apply,
        inputs_kwargs={k: s[k] for k in keys},
        outputs=s["message"],
        api_name="apply_settings",
        concurrency_limit=None,
    )
