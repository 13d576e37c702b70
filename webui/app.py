"""The app object (`create_app`) and the server entry point (`serve`).

All state (loaded model, job queue, options) lives in the `App` made by `create_app`, so tests
can build two apps side by side. `serve` brings the page up first and loads the model after,
in a background thread: the page answers in a few seconds even when torch is slow to import.
"""

from __future__ import annotations

import logging
import threading
import time
import webbrowser
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from webui import catalog
from webui.fields import FieldError, to_params_kwargs
from webui.jobs import Job, JobQueue
from webui.models import ModelError, ModelManager
from webui.outputs import OutputWriter
from webui.settings import AppSettings, Options, OptionsError, OptionsStore

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"


class InsecureActionError(PermissionError):
    """An action refused because the UI is reachable from other machines."""


class App:
    def __init__(self, settings: AppSettings):
        from webui import ui

        self.settings = settings
        self.options = OptionsStore(settings.options_file)
        self.jobs = JobQueue()
        self.models = ModelManager(settings, self.options, self.jobs.lock)
        self.outputs = OutputWriter()
        self.blocks = ui.build(self)
        self.local_url: str | None = None
        self.share_url: str | None = None

    # -- server ------------------------------------------------------------------------------------
    def launch(self, **overrides):
        """Start serving (see `gr.Blocks.launch`); returns (fastapi app, local url, share url)."""
        s = self.settings
        kwargs = dict(
            server_name=s.host,
            server_port=s.port,
            share=s.share,
            auth=list(s.auth) or None,
            auth_message="Log in to the image generator" if s.auth else None,
            inbrowser=False,
            quiet=True,
            show_error=True,
            max_file_size="64mb",
            # model folders and our own files are never served, whatever a handler returns
            blocked_paths=[
                str(s.models_dir.resolve()),
                str(s.options_file.resolve()),
                str(s.hash_cache_file.resolve()),
            ],
            css=(STATIC / "style.css").read_text(encoding="utf-8"),
            head=f"<script>{(STATIC / 'webui.js').read_text(encoding='utf-8')}</script>",
            footer_links=["api", "settings"],
        )
        kwargs.update(overrides)
        self.blocks.queue(default_concurrency_limit=1)
        result = self.blocks.launch(**kwargs)
        _, self.local_url, self.share_url = result
        return result

    def close(self) -> None:
        for job in self.jobs.active():
            job.token.interrupt()
        self.blocks.close()

    # -- security ---------------------------------------------------------------------------------
    def require_insecure_allowed(self, what: str) -> None:
        """Refuse `what` (something that writes outside outputs or runs code) when the UI is
        shared or listening, unless --enable-insecure-extension-access was given."""
        if not self.settings.insecure_allowed:
            raise InsecureActionError(
                f"{what} is disabled because the UI is reachable from other machines "
                "(--share or --listen); restart with --enable-insecure-extension-access to allow it"
            )

    # -- options ----------------------------------------------------------------------------------
    def outputs_root(self, opts: Options | None = None) -> Path:
        folder = (opts or self.options.get()).outputs_folder.strip()
        base = self.settings.outputs_dir
        return (base / folder).resolve() if folder else base.resolve()

    def apply_options(self, **changes) -> Options:
        """Validate, refuse unsafe folders, save; applies to the next page load / generation."""
        folder = str(changes.get("outputs_folder", "") or "").strip()
        changes["outputs_folder"] = folder
        if folder:
            target = (self.settings.outputs_dir / folder).resolve()
            if not target.is_relative_to(self.settings.outputs_dir.resolve()):
                self.require_insecure_allowed(f"saving images outside {self.settings.outputs_dir}")
        return self.options.update(
            samplers=catalog.samplers(), schedules=catalog.schedules(), **changes
        )

    def default_size(self) -> tuple[int, int]:
        opts = self.options.get()
        native = self.models.default_size()
        return opts.width or native, opts.height or native

    # -- generation -------------------------------------------------------------------------------
    def start_job(self, tab: str, values: dict, session: str) -> Job:
        """Check the form values of `tab` and queue the job. Raises FieldError, GenerationError
        or ModelError (all ValueError) with a message for the user."""
        from ldm_core import pipeline

        kwargs = to_params_kwargs(tab, values)
        needs_image = tab in ("img2img", "inpaint")
        image = mask = None
        if tab == "img2img":
            image = values.get("init_image")
            if image is None:
                raise FieldError("img2img needs an input image: drop one on the image box first")
        elif tab == "inpaint":
            image, mask = editor_image_and_mask(values.get("init_image"))
        params = pipeline.GenerationParams(**kwargs, init_image=image, mask=mask)
        params = pipeline.validate(params, needs_image=needs_image, needs_mask=tab == "inpaint")
        status = self.models.status()
        if self.models.checkpoint is None and status.state in ("error", "empty"):
            raise ModelError(f"no model is loaded: {status.message}")
        token = pipeline.CancelToken()
        hires = tab == "txt2img" and params.enable_hr
        return self.jobs.submit(
            session,
            tab,
            lambda job: self._work(job, tab, params),
            token=token,
            hires=hires,
            model_ready=self.models.ready,
        )

    def _work(self, job: Job, tab: str, params):
        from ldm_core import pipeline

        ckpt = self.models.checkpoint
        if ckpt is None:
            raise ModelError(f"no model is loaded: {self.models.status().message}")
        opts = self.options.get()
        params = replace(
            params, preview_every=opts.preview_every, preview_method=opts.preview_method
        )
        run = {
            "txt2img": pipeline.txt2img,
            "img2img": pipeline.img2img,
            "inpaint": pipeline.inpaint,
        }[tab]
        result = run(
            ckpt, params, on_step=job.on_step, cancel=job.token, embeddings=self.models.embeddings
        )
        if result.images:
            try:
                job.paths = self.outputs.save(
                    result.images,
                    result.infotexts,
                    result.records,
                    root=self.outputs_root(opts),
                    tab=tab,
                    pattern=opts.filename_pattern,
                    prompt=params.prompt,
                )
            except (OSError, ValueError) as exc:
                log.warning("could not save images: %s", exc)
                job.warnings.append(f"the images were not saved: {exc}")
        return result


def editor_image_and_mask(value) -> tuple[Image.Image, Image.Image]:
    """Background and mask of a `gr.ImageEditor` value: the mask is every pixel any layer
    painted (alpha > 0), white on black, at the background's size."""
    if not isinstance(value, dict) or value.get("background") is None:
        raise FieldError("inpainting needs an image: upload one into the editor first")
    background = _pil(value["background"])
    alpha = np.zeros((background.height, background.width), dtype=bool)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        layer = _pil(layer)
        if layer.mode != "RGBA":
            continue  # no alpha: nothing painted can be told apart
        if layer.size != background.size:
            layer = layer.resize(background.size, Image.Resampling.NEAREST)
        alpha |= np.asarray(layer.getchannel("A")) > 0
    if not alpha.any():
        raise FieldError("the mask is empty: paint over the area to change with the brush")
    return background.convert("RGB"), Image.fromarray((alpha * 255).astype(np.uint8), "L")


def _pil(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    return Image.open(value)


def create_app(settings: AppSettings) -> App:
    return App(settings)


def serve(settings: AppSettings) -> None:
    """Start the app, print its URL and the start-up time, load the model, then serve."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    app = create_app(settings)
    app.launch(prevent_thread_lock=True)
    started = settings.started_at
    took = f" in {time.perf_counter() - started:.1f} s" if started is not None else ""
    print(
        f"Running on {app.local_url} (page ready{took}; the model loads in the background)",
        flush=True,
    )
    if app.share_url:
        print(f"Public link: {app.share_url}", flush=True)
    if settings.exposed and not settings.auth:
        print(
            "Warning: the UI is reachable from other machines and has no --auth login.", flush=True
        )
    if settings.load_model:
        app.models.start()
    if settings.open_browser:
        threading.Thread(target=webbrowser.open, args=(app.local_url,), daemon=True).start()
    try:
        app.blocks.block_thread()
    finally:
        for job in app.jobs.active():
            job.token.interrupt()


__all__ = [
    "App",
    "InsecureActionError",
    "OptionsError",
    "create_app",
    "editor_image_and_mask",
    "serve",
]
