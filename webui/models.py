"""The checkpoint in use: scanning the model folders, loading in the background, fallbacks.

Loading takes the app's generation lock, so a switch waits for the running job and the jobs
queued behind it wait for the switch. The previous model is released first (memory); if the
new one fails to load, the previous one (else the demo model) is loaded again.
"""

from __future__ import annotations

import gc
import json
import logging
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from webui.settings import AppSettings, OptionsStore

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt")
DEMO_CHECKPOINT = "demo-shapes.safetensors"
AUTOMATIC_VAE = "Automatic"
NO_VAE = "None"
DEFAULT_SIZE = 512
MAX_HEADER_BYTES = 100 * 1024 * 1024


class ModelError(ValueError):
    """A model that cannot be selected or loaded, with a message for the user."""


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a .safetensors file, read from its header only ({} otherwise)."""
    if Path(path).suffix.lower() != ".safetensors":
        return {}
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES:
                return {}
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def native_size(metadata: dict[str, str]) -> int:
    """The image size a checkpoint was trained for: `ldm.default_size`, else 512."""
    try:
        size = int(metadata.get("ldm.default_size", DEFAULT_SIZE))
    except ValueError:
        return DEFAULT_SIZE
    return size if 64 <= size <= 4096 and size % 8 == 0 else DEFAULT_SIZE


@dataclass(frozen=True)
class ModelStatus:
    state: str  # "empty" | "loading" | "ready" | "error"
    checkpoint: str | None
    vae: str
    message: str
    elapsed: float = 0.0

    @property
    def text(self) -> str:
        if self.state == "loading":
            return f"Loading {self.checkpoint or 'the core'}… {self.elapsed:.1f} s"
        if self.state == "ready":
            note = f" — {self.message}" if self.message else ""
            return f"✔ {self.checkpoint}{note}"
        if self.state == "error":
            return f"⚠ {self.message}"
        return f"No model loaded. {self.message}".strip()


def _core():
    """Import the core lazily: it pulls in torch, which the page does not need to answer."""
    import ldm_core
    import ldm_core.conditioning
    import ldm_core.pipeline
    import ldm_core.weights  # noqa: F401

    return ldm_core


class ModelManager:
    def __init__(self, settings: AppSettings, options: OptionsStore, gpu_lock: threading.Lock):
        self.settings = settings
        self.options = options
        self.gpu_lock = gpu_lock
        self.checkpoints_dir = settings.models_dir / "Stable-diffusion"
        self.vae_dir = settings.models_dir / "VAE"
        self.embeddings_dir = settings.models_dir / "embeddings"
        self.checkpoint = None  # the loaded ldm_core Checkpoint
        self.checkpoint_name: str | None = None
        self.vae_name = AUTOMATIC_VAE
        self.embeddings = None
        self._checkpoints: dict[str, Path] = {}
        self._vaes: dict[str, Path] = {}
        self._state = "empty"
        self._message = ""
        self._target: str | None = None
        self._load_started = 0.0
        self._ticket = 0
        self._load_lock = threading.Lock()
        self._status_lock = threading.Lock()
        self.ready = threading.Event()  # set when no load is pending
        self.ready.set()
        self.core_loaded = threading.Event()  # set once the core (torch) is imported
        self.scan()

    # -- folders ---------------------------------------------------------------------------------
    def scan(self) -> None:
        """Re-read the checkpoint and VAE folders."""
        found: dict[str, Path] = {}
        for path in _files(self.checkpoints_dir, CHECKPOINT_SUFFIXES):
            found[path.relative_to(self.checkpoints_dir).as_posix()] = path
        extra = self.settings.checkpoint
        if (
            extra is not None
            and extra.is_file()
            and extra.resolve() not in {p.resolve() for p in found.values()}
        ):
            found[str(extra.resolve())] = extra.resolve()
        self._checkpoints = found
        self._vaes = {
            p.relative_to(self.vae_dir).as_posix(): p for p in _files(self.vae_dir, VAE_SUFFIXES)
        }
        if self.embeddings is not None:
            self.embeddings.refresh()

    def checkpoint_names(self) -> list[str]:
        return list(self._checkpoints)

    def vae_names(self) -> list[str]:
        return [AUTOMATIC_VAE, NO_VAE, *self._vaes]

    def name_for(self, path: Path) -> str | None:
        path = Path(path).resolve()
        for name, p in self._checkpoints.items():
            if p.resolve() == path:
                return name
        return None

    def startup_candidates(self) -> tuple[list[str], str]:
        """Checkpoints to try at start, in order (--ckpt, last used, demo, any), and a note."""
        names, note = [], ""
        ckpt = self.settings.checkpoint
        if ckpt is not None:
            name = self.name_for(ckpt) if ckpt.is_file() else None
            if name is None:
                note = f"--ckpt {ckpt}: file not found"
            else:
                names.append(name)
        last = self.options.get().last_checkpoint
        for name in (last, DEMO_CHECKPOINT, *self._checkpoints):
            if name in self._checkpoints and name not in names:
                names.append(name)
        return names, note

    def default_size(self, name: str | None = None) -> int:
        """Native image size of checkpoint `name` (default: the loaded or the startup one)."""
        if name is None:
            if self.checkpoint is not None:
                return native_size(self.checkpoint.metadata)
            candidates, _ = self.startup_candidates()
            name = self._target or (candidates[0] if candidates else None)
        path = self._checkpoints.get(name) if name else None
        return native_size(read_safetensors_metadata(path)) if path else DEFAULT_SIZE

    def resolve_vae(self, vae: str, checkpoint: Path) -> Path | None:
        if vae == NO_VAE:
            return None
        if vae == AUTOMATIC_VAE:
            for folder in (self.vae_dir, checkpoint.parent):
                for suffix in VAE_SUFFIXES:
                    candidate = folder / f"{checkpoint.stem}.vae{suffix}"
                    if candidate.is_file():
                        return candidate
            return None
        path = self._vaes.get(vae)
        if path is None or not path.is_file():
            raise ModelError(
                f"VAE {vae!r} not found in {self.vae_dir}; press ↻ to rescan the folder"
            )
        return path

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> ModelStatus:
        with self._status_lock:
            if self._state == "loading":
                return ModelStatus(
                    "loading",
                    self._target,
                    self.vae_name,
                    self._message,
                    time.perf_counter() - self._load_started,
                )
            return ModelStatus(self._state, self.checkpoint_name, self.vae_name, self._message)

    def _set(self, state: str, message: str = "", target: str | None = None) -> None:
        with self._status_lock:
            self._state, self._message = state, message
            if state == "loading":
                self._target, self._load_started = target, time.perf_counter()

    # -- loading ---------------------------------------------------------------------------------
    def start(self, *, wait: bool = False) -> None:
        """Load the startup checkpoint in a background thread (imports the core there too)."""
        names, note = self.startup_candidates()
        last = self.options.get()
        pairs = [(n, last.last_vae if n == last.last_checkpoint else AUTOMATIC_VAE) for n in names]
        self._begin(pairs, note, remember=False, wait=wait)

    def select(self, name: str, vae: str = AUTOMATIC_VAE, *, wait: bool = False) -> None:
        """Switch to checkpoint `name` with `vae` in the background. Raises ModelError at once
        for a name that is not in the folder or a file that has gone."""
        if name not in self._checkpoints or not self._checkpoints[name].is_file():
            self.scan()
        path = self._checkpoints.get(name)
        if path is None or not path.is_file():
            raise ModelError(
                f"checkpoint {name!r} not found in {self.checkpoints_dir}; press ↻ to rescan the folder"
            )
        if vae not in self.vae_names():
            raise ModelError(
                f"VAE {vae!r} not found in {self.vae_dir}; press ↻ to rescan the folder"
            )
        pairs = [(name, vae)]
        if self.checkpoint_name and self.checkpoint_name != name:
            pairs.append((self.checkpoint_name, self.vae_name))
        if DEMO_CHECKPOINT in self._checkpoints and DEMO_CHECKPOINT not in (
            name,
            self.checkpoint_name,
        ):
            pairs.append((DEMO_CHECKPOINT, AUTOMATIC_VAE))
        self._begin(pairs, "", remember=True, wait=wait)

    def _begin(
        self, pairs: list[tuple[str, str]], note: str, *, remember: bool, wait: bool
    ) -> None:
        with self._status_lock:
            self._ticket += 1
            ticket = self._ticket
        self.ready.clear()
        self._set("loading", "", pairs[0][0] if pairs else None)
        thread = threading.Thread(
            target=self._load_first,
            args=(ticket, pairs, note, remember),
            name="model-loader",
            daemon=True,
        )
        thread.start()
        if wait:
            thread.join()

    def _load_first(
        self, ticket: int, pairs: list[tuple[str, str]], note: str, remember: bool
    ) -> None:
        with self._load_lock:
            if ticket != self._ticket:
                return  # a newer request replaced this one
            try:
                core = _core()
                self.core_loaded.set()
                if self.embeddings is None:
                    self.embeddings = core.conditioning.EmbeddingLibrary(self.embeddings_dir)
                self._load_locked(core, pairs, note, remember)
            except Exception as exc:  # never let the loader thread die silently
                log.exception("model loading failed")
                self._set("error", f"loading failed: {exc}")
            finally:
                if ticket == self._ticket:
                    self.ready.set()

    def _load_locked(self, core, pairs: list[tuple[str, str]], note: str, remember: bool) -> None:
        if not pairs:
            msg = f"put a .safetensors checkpoint in {self.checkpoints_dir} and press ↻"
            self._set("empty", f"{note}; {msg}" if note else msg)
            return
        errors = [note] if note else []
        with self.gpu_lock:
            self._release()
            for i, (name, use_vae) in enumerate(pairs):
                if use_vae not in self.vae_names():
                    use_vae = AUTOMATIC_VAE
                self._set("loading", "", name)
                try:
                    path = self._checkpoints[name]
                    ckpt = core.load_checkpoint(
                        path,
                        vae=self.resolve_vae(use_vae, path),
                        device=self.settings.device,
                        dtype=self.settings.precision,
                        hash_cache=core.weights.HashCache(self.settings.hash_cache_file),
                    )
                except Exception as exc:  # any failure: report it and try the next candidate
                    log.warning("could not load %s: %s", name, exc)
                    errors.append(f"could not load {name}: {exc}")
                    continue
                self.checkpoint, self.checkpoint_name, self.vae_name = ckpt, name, use_vae
                if i == 0 and remember:
                    self.options.remember(last_checkpoint=name, last_vae=use_vae)
                message = "; ".join(errors + ([f"loaded {name} instead"] if errors else []))
                self._set("ready", message or f"loaded in {ckpt.load_seconds:.1f} s")
                log.info("checkpoint %s ready (%.1f s)", name, ckpt.load_seconds)
                break
            else:
                self._set("error", "; ".join(errors))
                return
        # hash the file now (cached on disk) rather than in the first job, without holding it up
        threading.Thread(target=_hash, args=(ckpt,), name="model-hash", daemon=True).start()

    def _release(self) -> None:
        if self.checkpoint is None:
            return
        device = self.checkpoint.device
        self.checkpoint = None
        self.checkpoint_name = None
        gc.collect()
        if getattr(device, "type", "cpu") == "cuda":
            import torch

            torch.cuda.empty_cache()


def _hash(ckpt) -> None:
    try:
        _ = ckpt.model_hash
    except OSError as exc:
        log.warning("could not hash %s: %s", ckpt.path, exc)


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        (
            p
            for p in folder.rglob("*")
            if p.suffix.lower() in suffixes and p.is_file() and not p.name.startswith(".")
        ),
        key=lambda p: p.relative_to(folder).as_posix().lower(),
    )
