"""App settings: what `launch.py` parsed (`AppSettings`), logins (`read_auth`) and the user's
options (`Options`), kept in a JSON file and changed from the Settings tab without a restart."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class AppSettings:
    """Everything the command line decides, passed down from `launch.py` to `create_app`."""

    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: list[tuple[str, str]] = field(default_factory=list)
    models_dir: Path = PROJECT_ROOT / "models"
    outputs_dir: Path = PROJECT_ROOT / "outputs"
    checkpoint: Path | None = None
    device: str | None = None
    precision: str | None = None  # "fp32" | "fp16" | "bf16" | None (device default)
    allow_insecure: bool = False
    open_browser: bool = True
    started_at: float | None = None  # time.perf_counter() when launch.py started
    # where the options file (config.json) and the hash cache live
    data_dir: Path = PROJECT_ROOT
    load_model: bool = True  # False: start without loading a checkpoint (tests)

    def __post_init__(self) -> None:
        self.models_dir = Path(self.models_dir)
        self.outputs_dir = Path(self.outputs_dir)
        self.data_dir = Path(self.data_dir)
        if self.checkpoint is not None:
            self.checkpoint = Path(self.checkpoint)

    @property
    def exposed(self) -> bool:
        """Reachable from other machines: a share link or listening on all interfaces."""
        return self.share or self.host not in LOCAL_HOSTS

    @property
    def insecure_allowed(self) -> bool:
        """Whether actions that write outside the outputs folder or run code are allowed."""
        return self.allow_insecure or not self.exposed

    @property
    def options_file(self) -> Path:
        return self.data_dir / "config.json"

    @property
    def hash_cache_file(self) -> Path:
        return self.data_dir / ".hash_cache.json"


def read_auth(auth: list[str] | None, auth_file: Path | None) -> list[tuple[str, str]]:
    """Logins from `--auth user:pass` (repeatable) and `--auth-file` (one `user:pass` per line;
    blank lines and lines starting with # are ignored). Raises ValueError naming the bad entry."""
    entries: list[tuple[str, str]] = [(value, "--auth") for value in auth or []]
    if auth_file is not None:
        path = Path(auth_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read --auth-file {path}: {exc.strerror or exc}") from exc
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append((line, f"{path}, line {number}"))
    logins = []
    for value, where in entries:
        user, sep, password = value.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"{where}: expected user:password, got {value!r}")
        logins.append((user.strip(), password))
    return logins


# -- options -------------------------------------------------------------------------------------

FILENAME_TOKENS = (
    "number", "seed", "date", "time", "datetime", "model_name", "model_hash", "sampler",
    "steps", "cfg", "width", "height", "prompt_words",
)  # fmt: skip
_TOKEN = re.compile(r"\[([a-z_]+)\]")
PREVIEW_METHODS = ("auto", "cheap", "full")


class OptionsError(ValueError):
    """An option value that cannot be used, with a message for the user."""


@dataclass
class Options:
    """User options; names follow A1111's settings where it has one. Sizes of 0 mean "the
    checkpoint's native size" (its `ldm.default_size` metadata, else 512)."""

    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 0
    height: int = 0
    preview_every: int = 5  # live preview every N sampling steps; 0 turns previews off
    preview_method: str = "auto"  # "cheap" latent colours, "full" VAE decode, "auto"
    outputs_folder: str = ""  # "" = the --outputs-dir folder
    filename_pattern: str = "[number]-[seed]"
    # state remembered between runs
    last_checkpoint: str = ""
    last_vae: str = "Automatic"


def validate_options(opts: Options, *, samplers=None, schedules=None) -> Options:
    """Check every field; return a copy with numbers coerced to their types."""
    out = dataclasses.replace(opts)
    try:
        out.steps = int(out.steps)
        out.cfg_scale = float(out.cfg_scale)
        out.width, out.height = int(out.width), int(out.height)
        out.preview_every = int(out.preview_every)
    except (TypeError, ValueError) as exc:
        raise OptionsError(f"a numeric option is not a number: {exc}") from exc
    if samplers is not None and out.sampler_name not in samplers:
        raise OptionsError(f"unknown sampler {out.sampler_name!r}")
    if schedules is not None and out.scheduler not in schedules:
        raise OptionsError(f"unknown schedule type {out.scheduler!r}")
    if not 1 <= out.steps <= 150:
        raise OptionsError(f"default steps must be between 1 and 150, got {out.steps}")
    if not 1 <= out.cfg_scale <= 30:
        raise OptionsError(f"default CFG scale must be between 1 and 30, got {out.cfg_scale}")
    for name in ("width", "height"):
        v = getattr(out, name)
        if v != 0 and not (64 <= v <= 2048 and v % 8 == 0):
            raise OptionsError(
                f"default {name} must be 0 (model's size) or 64-2048 in steps of 8, got {v}"
            )
    if not 0 <= out.preview_every <= 1000:
        raise OptionsError(
            f"preview frequency must be 0 (off) to 1000 steps, got {out.preview_every}"
        )
    if out.preview_method not in PREVIEW_METHODS:
        raise OptionsError(f"preview method must be one of {', '.join(PREVIEW_METHODS)}")
    check_filename_pattern(out.filename_pattern)
    return out


def check_filename_pattern(pattern: str) -> None:
    if not pattern.strip():
        raise OptionsError("the filename pattern is empty")
    if any(c in pattern for c in '/\\:*?"<>|\0') or ".." in pattern:
        raise OptionsError(
            "the filename pattern must not contain path separators, '..' or any of :*?\"<>|"
        )
    unknown = sorted(set(_TOKEN.findall(pattern)) - set(FILENAME_TOKENS))
    if unknown:
        raise OptionsError(
            f"unknown filename pattern tokens {', '.join(f'[{t}]' for t in unknown)}; "
            f"known: {', '.join(f'[{t}]' for t in FILENAME_TOKENS)}"
        )


class OptionsStore:
    """The options of one app, loaded from and saved to a JSON file (atomically)."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._options = self._read()

    def _read(self) -> Options:
        if not self.path or not self.path.is_file():
            return Options()
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable options file %s: %s", self.path, exc)
            return Options()
        known = {f.name for f in fields(Options)}
        opts = Options(**{k: v for k, v in data.items() if k in known})
        try:
            return validate_options(opts)
        except OptionsError as exc:
            log.warning("options file %s: %s; using the defaults", self.path, exc)
            return Options()

    def get(self) -> Options:
        with self._lock:
            return dataclasses.replace(self._options)

    def update(self, *, samplers=None, schedules=None, **changes) -> Options:
        """Validate and apply `changes`, then save. Raises OptionsError for bad values."""
        with self._lock:
            new = validate_options(
                dataclasses.replace(self._options, **changes),
                samplers=samplers,
                schedules=schedules,
            )
            self._options = new
            self._save(new)
            return dataclasses.replace(new)

    def remember(self, **changes) -> None:
        """Record state such as the last checkpoint; never raises."""
        try:
            with self._lock:
                self._options = dataclasses.replace(self._options, **changes)
                self._save(self._options)
        except OSError as exc:
            log.warning("could not save %s: %s", self.path, exc)

    def _save(self, opts: Options) -> None:
        if not self.path:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(dataclasses.asdict(opts), f, indent=2)
                f.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
