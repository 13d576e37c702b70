"""A1111 infotext: the "parameters" text stored in generated images.

Layout (AUTOMATIC1111 v1.10 `create_infotext`), lines joined with newlines and stripped:

    <prompt, may span lines>
    Negative prompt: <negative prompt, may span lines>      (only when non-empty)
    Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, ...

Parameters are an ordered `dict[str, Any]` of A1111 keys. `parse_infotext` keeps values as the
strings found in the text (quoted values unquoted, `WxH` values split into `Key-1`/`Key-2`
like A1111, e.g. `Size-1`/`Size-2`); only the defaults it fills in carry A1111's mixed types.
Typed conversion belongs to whoever maps these keys onto generation settings.

PNG files carry the text in a `parameters` tEXt chunk (iTXt when it is not Latin-1); JPEG and
WebP in the EXIF UserComment, UTF-16 with the `UNICODE` prefix, as A1111 and piexif write it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from PIL import Image, PngImagePlugin

from ldm_core.prompts import parse_attention

__all__ = [
    "INFOTEXT_KEY_ORDER",
    "INFOTEXT_TRAILING_KEYS",
    "build_infotext",
    "parse_infotext",
    "quote",
    "read_infotext_from_image",
    "save_image_with_infotext",
    "save_png_with_infotext",
    "split_sampler_scheduler",
    "unquote",
]

# Keys A1111 writes itself, in its order; every other key follows them in the order given
# (A1111's `extra_generation_params`: hires, inpainting, Lora hashes, ...), then these two.
INFOTEXT_KEY_ORDER: tuple[str, ...] = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "NGMS",
    "Tiling",
)
INFOTEXT_TRAILING_KEYS: tuple[str, ...] = ("Version", "User")

_KEY_RANK = {key: i for i, key in enumerate(INFOTEXT_KEY_ORDER)}
_NEGATIVE_PREFIX = "Negative prompt:"

# ------------------------------------------------------------------------------------------
# Quoting
# ------------------------------------------------------------------------------------------


def quote(value: str) -> str:
    """Write `value` as a JSON string when it could not be read back raw.

    A1111 quotes values holding `,`, `:` or a newline. We also quote values holding `"`,
    empty ones, ones with surrounding whitespace and ones starting with `{` or `[` (which
    would read back as JSON); A1111's reader unquotes all of these the same way.
    """
    if (
        value
        and value == value.strip()
        and not any(char in value for char in ',:\n"')
        and value[0] not in "{["
    ):
        return value
    return json.dumps(value, ensure_ascii=False)


def unquote(text: str) -> str:
    """Undo `quote`: a `"..."` value is decoded as JSON, anything else is returned as is."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------

_SIZE_PART = re.compile(r"^\d+$")


def _is_size_part(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and bool(_SIZE_PART.match(value)))


def _join_split_sizes(params: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Turn `Key-1`/`Key-2` pairs (as `parse_infotext` produces) back into `Key: AxB`."""

    def joinable(base: str) -> bool:
        first, second = params.get(f"{base}-1"), params.get(f"{base}-2")
        return base not in params and _is_size_part(first) and _is_size_part(second)

    items: list[tuple[str, Any]] = []
    for key, value in params.items():
        base = key[:-2]
        if key.endswith("-1") and joinable(base):
            items.append((base, f"{value}x{params[f'{base}-2']}"))
        elif not (key.endswith("-2") and joinable(base)):
            items.append((key, value))
    return items


def _format_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        # e.g. Civitai's `Hashes: {"model": "..."}`, written as bare JSON
        return json.dumps(value, ensure_ascii=False)
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return f"{value[0]}x{value[1]}"
    return quote(value if isinstance(value, str) else str(value))


def build_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """Write A1111's infotext for a prompt, a negative prompt and generation parameters.

    Keys in `INFOTEXT_KEY_ORDER` come first in A1111's order, other keys follow in the order
    given, `Version` and `User` come last. `None` values are left out; a value equal to its key
    is written as the bare key (as A1111 does). Values are written with `str()`, quoted by
    `quote`; a dict or list is written as JSON, a 2-tuple of ints as `AxB`, and a `Key-1`/`Key-2`
    pair of integers as `Key: AxB`. Nothing else is added or dropped: A1111's habit of leaving
    out defaults (`Clip skip` 1, `RNG` GPU, ...) is the caller's choice.

    Raises ValueError for a key that would break the line (empty, or holding `,` `:` or a
    newline).
    """
    entries = []
    for key, value in _join_split_sizes(params):
        if value is None:
            continue
        if not key or any(char in key for char in ",:\n"):
            raise ValueError(
                f"infotext key {key!r} must be non-empty and free of ',', ':', newlines"
            )
        entries.append((key, value))

    def rank(entry: tuple[str, Any]) -> tuple[int, int]:
        key = entry[0]
        if key in _KEY_RANK:
            return 0, _KEY_RANK[key]
        if key in INFOTEXT_TRAILING_KEYS:
            return 2, INFOTEXT_TRAILING_KEYS.index(key)
        return 1, 0  # sorted() is stable: extra keys keep their given order

    parts = [
        key if isinstance(value, str) and value == key else f"{key}: {_format_value(value)}"
        for key, value in sorted(entries, key=rank)
    ]
    negative = f"\n{_NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(parts)}".strip()


# ------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------

# A1111's `re_param`: a key of 2+ word characters, spaces, '-' or '/', a quoted or raw value.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# The same with the value optional, so bare keys (written when key == value) read back.
_ITEM = re.compile(r'\s*(\w[\w \-/]+)(?::\s*("(?:\\.|[^\\"])+"|[^,]*))?(?:,|$)')
_JSON_ITEM = re.compile(r"\s*(\w[\w \-/]+):\s*(?=[\[{])")
_ITEM_END = re.compile(r"\s*(?:,|$)")
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
_JSON = json.JSONDecoder()


def _store(params: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, str):
        size = _IMAGE_SIZE.match(value)
        if size is not None:
            params[f"{key}-1"] = size.group(1)
            params[f"{key}-2"] = size.group(2)
            return
    params[key] = value


def _parse_parameters_line(line: str) -> dict[str, Any]:
    """Scan `key: value` items left to right, skipping what does not parse, like A1111.

    Beyond A1111: a value that is a JSON object or array (Civitai's `Hashes: {...}`) is read
    whole, and a bare key (written when key == value) reads back as itself.
    """
    params: dict[str, Any] = {}
    pos = 0
    while pos < len(line):
        json_item = _JSON_ITEM.match(line, pos)
        if json_item is not None:
            try:
                value, end = _JSON.raw_decode(line, json_item.end())
            except ValueError:
                end = -1
            tail = _ITEM_END.match(line, end) if end >= 0 else None
            if tail is not None:
                params[json_item.group(1)] = value
                pos = tail.end()
                continue
        item = _ITEM.match(line, pos)
        if item is None:
            pos += 1
            continue
        key, raw = item.group(1), item.group(2)
        if raw is None:
            params[key] = key
        else:
            _store(params, key, unquote(raw))
        pos = max(item.end(), pos + 1)
    return params


def parse_infotext(text: str, *, defaults: bool = True) -> tuple[str, str, dict[str, Any]]:
    """Read A1111 infotext into `(prompt, negative_prompt, params)`.

    Follows A1111's `parse_generation_parameters`: the last line is the parameters line only
    if it holds at least 3 `key: value` items, otherwise it belongs to the prompt; lines from
    one starting with `Negative prompt:` on are the negative prompt; each prompt line is
    stripped of surrounding whitespace (as A1111 does). Unknown keys are kept in text order.

    With `defaults` (the default) A1111's defaults and back-compat rules are applied: missing
    `Clip skip` is "1", `RNG` "GPU", hires/inpaint/schedule fields get A1111's default values,
    an old `First pass size` becomes `Size` + `Hires resize`, `Hypernet` becomes a
    `<hypernet:...>` tag in the prompt, `Emphasis` is "Original" when the prompt uses
    brackets, old `Version`s switch on A1111's compatibility flags, and a missing
    `Schedule type` is taken from an old combined sampler name ("DPM++ 2M Karras" ->
    "DPM++ 2M" + "Karras") or else set to "Automatic". Use `defaults=False` to get exactly
    what the text says, for example to rewrite it unchanged with `build_infotext`.
    """
    *lines, last = text.replace("\r\n", "\n").strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX) :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    prompt, negative_prompt = "\n".join(prompt_lines), "\n".join(negative_lines)

    params = _parse_parameters_line(last)
    if defaults:
        prompt = _apply_a1111_defaults(prompt, negative_prompt, params)
    return prompt, negative_prompt, params


# A1111's scheduler labels, names and aliases (v1.10, plus Forge's), for old sampler names
# such as "DPM++ 2M Karras". The sampler module has the full sampler/scheduler tables.
_SCHEDULER_NAMES: tuple[tuple[str, ...], ...] = (
    ("Automatic", "automatic"),
    ("Uniform", "uniform"),
    ("Karras", "karras"),
    ("Exponential", "exponential"),
    ("Polyexponential", "polyexponential"),
    ("SGM Uniform", "sgm_uniform", "SGMUniform"),
    ("KL Optimal", "kl_optimal"),
    ("Align Your Steps", "align_your_steps"),
    ("Align Your Steps GITS", "align_your_steps_GITS"),
    ("Align Your Steps 11", "align_your_steps_11"),
    ("Align Your Steps 32", "align_your_steps_32"),
    ("Simple", "simple"),
    ("Normal", "normal"),
    ("DDIM", "ddim"),
    ("Beta", "beta"),
    ("Turbo", "turbo"),
)
# every spelling -> label, longest first so "SGM Uniform" wins over "Uniform"
_SCHEDULER_SUFFIXES: dict[str, str] = dict(
    sorted(
        ((name, names[0]) for names in _SCHEDULER_NAMES for name in names),
        key=lambda item: -len(item[0]),
    )
)


def split_sampler_scheduler(sampler: str) -> tuple[str, str | None]:
    """Split an old combined sampler name: "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras").

    Returns `(sampler, None)` when the name ends in no scheduler. The longest matching
    suffix wins (A1111 takes the first in its table, which reads "X SGM Uniform" as "X SGM"
    + "Uniform"). A1111 also maps a scheduler that is the sampler's own default back to
    "Automatic"; that needs the sampler table and is left to the sampler module.
    """
    for suffix, label in _SCHEDULER_SUFFIXES.items():
        if sampler.endswith(" " + suffix) and len(sampler) > len(suffix) + 1:
            return sampler[: -len(suffix) - 1], label
    return sampler, None


_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?(?:-(?:(\d+)|([A-Za-z]\w*)))?$")


def _parse_version(text: Any) -> tuple[int, int, int, int, int] | None:
    """A1111 `Version` as (major, minor, patch, release, commits); None if unrecognised.

    A1111 keeps `v1.7.0-225` of `v1.7.0-225-g1234abc` (commits since the tag), and reads a
    suffix such as `-RC` as a pre-release (release = -1), which sorts before the release.
    """
    if not isinstance(text, str):
        return None
    match = re.match(r"([^-]+-[^-]+)-.*", text)
    if match:
        text = match.group(1)
    match = _VERSION.match(text)
    if match is None:
        return None
    major, minor, patch, commits, pre = match.groups()
    return int(major), int(minor), int(patch or 0), -1 if pre else 0, int(commits or 0)


_V160 = (1, 6, 0, 0, 0)
_V170_TSNR = (1, 7, 0, 0, 225)
_V180 = (1, 8, 0, 0, 0)


def _old_hires_first_pass_size(width: int, height: int) -> tuple[int, int]:
    """A1111's pre-1.0 automatic first-pass size: about 512x512 pixels, multiples of 64."""
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def _restore_old_hires_fix(params: dict[str, Any]) -> None:
    first_w, first_h = params.get("First pass size-1"), params.get("First pass size-2")
    if first_w is None or first_h is None:
        return
    try:
        first_w, first_h = int(first_w), int(first_h)
        width, height = int(params.get("Size-1", 512)), int(params.get("Size-2", 512))
    except (TypeError, ValueError):
        return
    if (first_w == 0 or first_h == 0) and width > 0 and height > 0:
        first_w, first_h = _old_hires_first_pass_size(width, height)
    params["Size-1"], params["Size-2"] = first_w, first_h
    params["Hires resize-1"], params["Hires resize-2"] = width, height


def _apply_a1111_defaults(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """A1111 v1.10's defaults and back-compat rules; returns the (possibly extended) prompt."""
    params.setdefault("Clip skip", "1")
    hypernet = params.get("Hypernet")
    if hypernet is not None:
        prompt += f"<hypernet:{hypernet}:{params.get('Hypernet strength', '1.0')}>"
    if "Hires resize-1" not in params:
        params["Hires resize-1"] = 0
        params["Hires resize-2"] = 0
    params.setdefault("Hires sampler", "Use same sampler")
    params.setdefault("Hires schedule type", "Use same scheduler")
    params.setdefault("Hires checkpoint", "Use same checkpoint")
    params.setdefault("Hires prompt", "")
    params.setdefault("Hires negative prompt", "")
    params.setdefault("Mask mode", "Inpaint masked")
    params.setdefault("Masked content", "original")
    params.setdefault("Inpaint area", "Whole picture")
    params.setdefault("Masked area padding", 32)
    _restore_old_hires_fix(params)
    params.setdefault("RNG", "GPU")
    if "Schedule type" not in params:
        scheduler = None
        if isinstance(params.get("Sampler"), str):
            params["Sampler"], scheduler = split_sampler_scheduler(params["Sampler"])
        params["Schedule type"] = scheduler or "Automatic"
    params.setdefault("Schedule max sigma", 0)
    params.setdefault("Schedule min sigma", 0)
    params.setdefault("Schedule rho", 0)
    params.setdefault("VAE Encoder", "Full")
    params.setdefault("VAE Decoder", "Full")
    params.setdefault("FP8 weight", "Disable")
    if "Cache FP16 weight for LoRA" not in params and params["FP8 weight"] != "Disable":
        params["Cache FP16 weight for LoRA"] = False
    if "Emphasis" not in params:
        fragments = parse_attention(prompt) + parse_attention(negative_prompt)
        if any(weight != 1.0 and text != "BREAK" for text, weight in fragments):
            params["Emphasis"] = "Original"
    params.setdefault("Refiner switch by sampling steps", False)

    version = _parse_version(params.get("Version"))
    if version is not None:
        if version < _V160 and "[" in prompt:
            params["Old prompt editing timelines"] = True
        if version < _V160 and params.get("Sampler") in ("DDIM", "PLMS"):
            params["Pad conds v0"] = True
        if version < _V170_TSNR:
            params["Downcast alphas_cumprod"] = True
        if version < _V180 and params.get("Refiner"):
            params["Refiner switch by sampling steps"] = True
    return prompt


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------

_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


def _user_comment_bytes(text: str) -> bytes:
    # EXIF UserComment: an 8-byte character-code prefix, then the text (piexif's "unicode")
    return b"UNICODE\0" + text.encode("utf-16-be")


def _decode_user_comment(raw: Any) -> str | None:
    if isinstance(raw, str):
        return raw.rstrip("\0") or None
    if not isinstance(raw, bytes) or not raw:
        return None
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\0":
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            text = body.decode("utf-16", errors="replace")
        else:
            # piexif and A1111 write big-endian; some tools follow the file's byte order.
            # ASCII-range text has its zero bytes first in big-endian, second in little.
            even_zeros = body[0::2].count(0)
            odd_zeros = body[1::2].count(0)
            encoding = "utf-16-le" if odd_zeros > even_zeros else "utf-16-be"
            text = body[: len(body) // 2 * 2].decode(encoding, errors="replace")
    elif prefix == b"ASCII\0\0\0":
        text = body.decode("latin-1")
    elif prefix == b"\0" * 8:
        text = body.decode("utf-8", errors="ignore")
    else:
        text = raw.decode("utf-8", errors="ignore")
    return text.rstrip("\0") or None


def read_infotext_from_image(
    image_or_path: Image.Image | str | os.PathLike | IO[bytes],
) -> str | None:
    """The infotext stored in an image, or None.

    Looks, like A1111's `read_info_from_image`, at the PNG `parameters` text chunk, then the
    EXIF UserComment (JPEG, WebP, ...), then a GIF comment. NovelAI's JSON metadata is not
    converted.
    """
    if isinstance(image_or_path, Image.Image):
        return _read_infotext(image_or_path)
    with Image.open(image_or_path) as image:
        return _read_infotext(image)


def _read_infotext(image: Image.Image) -> str | None:
    value = image.info.get("parameters")
    if value is None and image.format == "PNG":
        # text chunks after the image data are only read when the file is loaded
        value = getattr(image, "text", {}).get("parameters")
    if value is not None:
        return str(value)

    try:
        comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except Exception:  # a corrupt EXIF block only means there is no infotext in it
        comment = None
    text = _decode_user_comment(comment)
    if text:
        return text

    gif_comment = image.info.get("comment")
    if isinstance(gif_comment, bytes):
        return gif_comment.decode("utf-8", errors="ignore") or None
    return None


def _atomic_save(path: str | os.PathLike, write) -> None:
    """Write through `write(file)` to a temporary file beside `path`, then rename it over."""
    target = Path(path)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def _image_format(path_or_file: Any, format: str | None) -> str:
    if format:
        return format.upper()
    name = path_or_file if isinstance(path_or_file, (str, os.PathLike)) else None
    name = name or getattr(path_or_file, "name", None)
    if isinstance(name, (str, os.PathLike)):
        extension = Path(name).suffix.lower()
        fmt = Image.registered_extensions().get(extension)
        if fmt:
            return fmt
    raise ValueError(f"cannot tell the image format of {path_or_file!r}; pass format=")


def save_png_with_infotext(
    image: Image.Image,
    path_or_file: str | os.PathLike | IO[bytes],
    infotext: str | None,
    *,
    extra_text: Mapping[str, str] | None = None,
) -> None:
    """Save `image` as PNG with `infotext` in its `parameters` chunk (tEXt, or iTXt when the
    text is not Latin-1) and any `extra_text` chunks. A path is written atomically."""
    save_image_with_infotext(image, path_or_file, infotext, format="PNG", extra_text=extra_text)


def save_image_with_infotext(
    image: Image.Image,
    path_or_file: str | os.PathLike | IO[bytes],
    infotext: str | None,
    *,
    format: str | None = None,
    extra_text: Mapping[str, str] | None = None,
    **save_options: Any,
) -> None:
    """Save `image` with `infotext`: PNG text chunk, or EXIF UserComment for other formats.

    The format comes from `format` or the file name's extension. A path is written to a
    temporary file in the same folder and renamed over the target, so readers never see a
    partial file. `extra_text` (PNG only) adds more text chunks; `save_options` go to PIL.
    Other formats get a fresh EXIF block holding only the UserComment; an image with alpha is
    converted to RGB for JPEG, as A1111 does.
    """
    fmt = _image_format(path_or_file, format)
    options = dict(save_options)
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        if infotext:
            info.add_text("parameters", infotext)  # PIL switches to iTXt for non-Latin-1
        for key, value in (extra_text or {}).items():
            info.add_text(key, value)
        options["pnginfo"] = info
    elif infotext:
        exif = Image.Exif()
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _user_comment_bytes(infotext)
        options["exif"] = exif
    if fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")

    def write(file: IO[bytes]) -> None:
        image.save(file, format=fmt, **options)

    if isinstance(path_or_file, (str, os.PathLike)):
        _atomic_save(path_or_file, write)
    else:
        write(path_or_file)
