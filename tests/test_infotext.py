"""A1111 infotext: writing, parsing, PNG/EXIF storage."""

from __future__ import annotations

import io
import json
import os
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from ldm_core.infotext import (
    build_infotext,
    parse_infotext,
    quote,
    read_infotext_from_image,
    save_image_with_infotext,
    save_png_with_infotext,
    split_sampler_scheduler,
    unquote,
)

FULL_PARAMS = {
    "Steps": 30,
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": 6.5,
    "Seed": 3141592653,
    "Size": "512x768",
    "Model hash": "6ce0161689",
    "Model": "v1-5-pruned-emaonly",
    "VAE hash": "735e4c3a44",
    "VAE": "vae-ft-mse-840000-ema-pruned.safetensors",
    "Variation seed": 42,
    "Variation seed strength": 0.3,
    "Seed resize from": "640x640",
    "Denoising strength": 0.45,
    "Clip skip": 2,
    "RNG": "CPU",
    "Hires upscale": 2,
    "Hires steps": 15,
    "Hires upscaler": "R-ESRGAN 4x+ Anime6B",
    "Mask blur": 4,
    "Inpaint area": "Only masked",
    "Masked area padding": 32,
    "Lora hashes": "add_detail: 7c6bad76eb54, film grain: 0123456789ab",
    "TI hashes": "EasyNegative: c74b4e810b03",
    "Version": "v1.10.1",
}

FULL_TEXT = (
    "masterpiece, (best quality:1.2), a castle on a hill <lora:add_detail:0.6>\n"
    "second line of the prompt\n"
    "Negative prompt: lowres, bad anatomy, EasyNegative\n"
    "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, "
    "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, "
    "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Variation seed: 42, "
    "Variation seed strength: 0.3, Seed resize from: 640x640, Denoising strength: 0.45, "
    "Clip skip: 2, RNG: CPU, Hires upscale: 2, Hires steps: 15, "
    "Hires upscaler: R-ESRGAN 4x+ Anime6B, Mask blur: 4, Inpaint area: Only masked, "
    "Masked area padding: 32, "
    'Lora hashes: "add_detail: 7c6bad76eb54, film grain: 0123456789ab", '
    'TI hashes: "EasyNegative: c74b4e810b03", Version: v1.10.1'
)
PROMPT = "masterpiece, (best quality:1.2), a castle on a hill <lora:add_detail:0.6>\nsecond line of the prompt"
NEGATIVE = "lowres, bad anatomy, EasyNegative"


def a1111_read(line: str) -> dict[str, str]:
    """A1111's own reading of a parameters line (its regex, `unquote` and size split)."""
    result = {}
    for key, value in re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', line):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        size = re.match(r"^(\d+)x(\d+)$", value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.groups()
        else:
            result[key] = value
    return result


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------


def test_build_full_a1111_layout():
    assert build_infotext(PROMPT, NEGATIVE, FULL_PARAMS) == FULL_TEXT


def test_build_orders_known_keys_like_a1111():
    shuffled = {
        "Version": "v1.10.1",
        "My extension": "on",
        "Seed": 1,
        "Hires upscale": 2,
        "Steps": 20,
        "Model": "m",
        "Sampler": "Euler a",
        "Size": "512x512",
        "CFG scale": 7,
        "Schedule type": "Automatic",
        "Model hash": "abc",
    }
    text = build_infotext("p", "", shuffled)
    assert text == (
        "p\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, "
        "Size: 512x512, Model hash: abc, Model: m, My extension: on, Hires upscale: 2, "
        "Version: v1.10.1"
    )


def test_build_omits_none_and_negative_line_when_empty():
    text = build_infotext(
        "a cat", "", {"Steps": 20, "Seed": None, "Sampler": "Euler", "CFG scale": 7}
    )
    assert text == "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7"
    assert build_infotext("", "", {}) == ""
    assert build_infotext("a", "b", {}) == "a\nNegative prompt: b"


def test_build_value_forms():
    text = build_infotext(
        "p",
        "",
        {
            "Steps": 20,
            "Size": (640, 448),
            "Tiling": "Tiling",  # key == value: written bare, like A1111
            "Hashes": {"model": "6ce0161689", "lora:add_detail": "7c6bad76eb"},
            "Hires resize-1": 1024,
            "Hires resize-2": 768,
        },
    )
    assert text == (
        "p\nSteps: 20, Size: 640x448, Tiling, "
        'Hashes: {"model": "6ce0161689", "lora:add_detail": "7c6bad76eb"}, '
        "Hires resize: 1024x768"
    )


def test_build_rejects_keys_that_break_the_line():
    for key in ["", "a,b", "a: b", "a\nb"]:
        with pytest.raises(ValueError, match="infotext key"):
            build_infotext("p", "", {key: 1})


def test_quote_matches_a1111_and_is_read_back_by_it():
    assert quote("Euler a") == "Euler a"
    assert quote("a, b") == '"a, b"'
    assert quote("a: b") == '"a: b"'
    assert quote("a\nb") == '"a\\nb"'
    assert quote("日本") == "日本"
    assert quote("日本, 語") == '"日本, 語"'
    # beyond A1111, still readable by A1111's unquote
    for value in ['say "hi"', "", " padded ", "{not json}", "[x]"]:
        assert quote(value) == json.dumps(value)
        assert unquote(quote(value)) == value
    assert unquote('"broken') == '"broken'
    assert unquote("plain") == "plain"


# ------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------


def test_write_parse_write_is_identical():
    prompt, negative, params = parse_infotext(FULL_TEXT, defaults=False)
    assert (prompt, negative) == (PROMPT, NEGATIVE)
    assert params["Size-1"] == "512" and params["Size-2"] == "768"
    assert params["Seed resize from-1"] == "640" and params["Seed resize from-2"] == "640"
    assert params["Lora hashes"] == FULL_PARAMS["Lora hashes"]
    assert params["CFG scale"] == "6.5"
    assert build_infotext(prompt, negative, params) == FULL_TEXT


def test_awkward_values_survive():
    params = {
        "Steps": 20,
        "Sampler": "Euler",
        "CFG scale": 7,
        "Hires prompt": 'a "quoted", [edited:prompt:0.5]\nsecond line',
        "Note": "back\\slash \\n not a newline",
        "Empty": "",
        "Spaces": "  around  ",
        "Unicode": "猫, ねこ: 🐱",
        "Looks like JSON": '{"a": 1}',
        "Hashes": {"model": "abc", "lora:x": "def"},
    }
    text = build_infotext("p", "", params)
    assert "\n" not in text.split("\n", 1)[1]  # everything stays on the parameters line
    _, _, parsed = parse_infotext(text, defaults=False)
    assert parsed == {k: v if isinstance(v, (str, dict)) else str(v) for k, v in params.items()}
    assert build_infotext("p", "", parsed) == text
    # A1111's reader sees the same strings (the JSON object is our extension)
    a1111 = a1111_read(text.split("\n")[1])
    for key in ["Hires prompt", "Note", "Empty", "Spaces", "Unicode", "Looks like JSON"]:
        assert a1111[key] == params[key]


def test_multi_line_prompt_and_negative_survive():
    prompt = "line one, (a:1.1)\nline two\n\nline four"
    negative = "bad\nworse: yes"
    text = build_infotext(prompt, negative, {"Steps": 20, "Sampler": "Euler", "Seed": 5})
    assert parse_infotext(text, defaults=False) == (
        prompt,
        negative,
        {"Steps": "20", "Sampler": "Euler", "Seed": "5"},
    )


def test_last_line_with_fewer_than_three_params_is_prompt():
    prompt, negative, params = parse_infotext("a cat\nstyle: oil, mood: calm", defaults=False)
    assert (prompt, negative, params) == ("a cat\nstyle: oil, mood: calm", "", {})
    assert parse_infotext("just a prompt", defaults=False) == ("just a prompt", "", {})
    assert parse_infotext("", defaults=False) == ("", "", {})


def test_parameters_only_and_windows_newlines():
    assert parse_infotext("Steps: 20, Sampler: Euler, Seed: 1", defaults=False) == (
        "",
        "",
        {"Steps": "20", "Sampler": "Euler", "Seed": "1"},
    )
    text = "a\r\nNegative prompt: b\r\nSteps: 20, Sampler: Euler, Seed: 1"
    assert parse_infotext(text, defaults=False)[:2] == ("a", "b")


REAL_WORLD = """\
masterpiece, best quality, 1girl, solo, (blue eyes:1.2), silver hair, <lora:add_detail:0.6>
Negative prompt: (worst quality, low quality:1.4), EasyNegative, bad-hands-5
Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, \
Model hash: 7f96a1a9ca, Model: anything-v5-PrtRE, Denoising strength: 0.5, Clip skip: 2, \
ENSD: 31337, Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+ Anime6B, \
Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "EasyNegative: c74b4e810b03, \
bad-hands-5: aa7651be154c", Version: v1.6.0"""


def test_real_world_a1111_infotext():
    prompt, negative, params = parse_infotext(REAL_WORLD)
    assert prompt.startswith("masterpiece, best quality") and prompt.endswith(
        "<lora:add_detail:0.6>"
    )
    assert negative == "(worst quality, low quality:1.4), EasyNegative, bad-hands-5"
    assert params["Steps"] == "28"
    # pre-1.9 combined sampler name split into sampler + schedule type
    assert params["Sampler"] == "DPM++ 2M"
    assert params["Schedule type"] == "Karras"
    assert params["CFG scale"] == "7"
    assert params["Seed"] == "1234567890"
    assert (params["Size-1"], params["Size-2"]) == ("512", "768")
    assert params["Model hash"] == "7f96a1a9ca"
    assert params["Model"] == "anything-v5-PrtRE"
    assert params["Denoising strength"] == "0.5"
    assert params["Clip skip"] == "2"
    assert params["ENSD"] == "31337"
    assert params["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B"
    assert params["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert params["TI hashes"] == "EasyNegative: c74b4e810b03, bad-hands-5: aa7651be154c"
    assert params["Version"] == "v1.6.0"
    # A1111 defaults and back-compat
    assert params["RNG"] == "GPU"
    assert params["Emphasis"] == "Original"
    assert params["Hires resize-1"] == 0 and params["Hires sampler"] == "Use same sampler"
    assert params["Masked area padding"] == 32
    assert params["Downcast alphas_cumprod"] is True  # older than v1.7.0-225
    assert "Old prompt editing timelines" not in params  # 1.6.0 is not older than 1.6.0


def test_defaults_for_a_minimal_infotext():
    _, _, params = parse_infotext("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1")
    assert params["Clip skip"] == "1"
    assert params["RNG"] == "GPU"
    assert params["Schedule type"] == "Automatic"
    assert params["Sampler"] == "Euler a"
    assert "Emphasis" not in params  # no brackets in the prompt
    assert "Downcast alphas_cumprod" not in params  # no Version: nothing to compare
    # keys present in the text are never overwritten by defaults
    _, _, params = parse_infotext(
        "a\nSteps: 20, Sampler: Euler, Schedule type: Exponential, Clip skip: 3, RNG: CPU"
    )
    assert (params["Schedule type"], params["Clip skip"], params["RNG"]) == (
        "Exponential",
        "3",
        "CPU",
    )


def test_old_version_backcompat_flags():
    text = "a [b:c:5]\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, Version: v1.5.1"
    _, _, params = parse_infotext(text)
    assert params["Old prompt editing timelines"] is True
    assert params["Pad conds v0"] is True
    assert params["Downcast alphas_cumprod"] is True
    _, _, params = parse_infotext(text.replace("v1.5.1", "v1.7.0-225-g1234abc"))
    assert "Downcast alphas_cumprod" not in params and "Pad conds v0" not in params
    _, _, params = parse_infotext(text.replace("v1.5.1", "v1.7.0-224-g1234abc"))
    assert params["Downcast alphas_cumprod"] is True
    _, _, params = parse_infotext(text.replace("v1.5.1", "f2.0.1v1.10.1-previous-669-gdfdcbab6"))
    assert "Downcast alphas_cumprod" not in params  # Forge versions are not compared


def test_old_hires_fix_and_hypernet_backcompat():
    text = (
        "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 1024x1024, "
        "First pass size: 0x0, Hypernet: anime, Hypernet strength: 0.5"
    )
    prompt, _, params = parse_infotext(text)
    assert prompt == "a cat<hypernet:anime:0.5>"
    assert (params["Size-1"], params["Size-2"]) == (512, 512)
    assert (params["Hires resize-1"], params["Hires resize-2"]) == (1024, 1024)
    _, _, params = parse_infotext(text.replace("First pass size: 0x0", "First pass size: 640x448"))
    assert (params["Size-1"], params["Size-2"]) == (640, 448)


def test_split_sampler_scheduler():
    assert split_sampler_scheduler("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert split_sampler_scheduler("DPM++ 2M SDE Exponential") == ("DPM++ 2M SDE", "Exponential")
    assert split_sampler_scheduler("DPM++ 2M SGM Uniform") == ("DPM++ 2M", "SGM Uniform")
    assert split_sampler_scheduler("Euler SGMUniform") == ("Euler", "SGM Uniform")
    assert split_sampler_scheduler("LMS karras") == ("LMS", "Karras")
    for plain in ["Euler a", "DPM fast", "DPM adaptive", "DDIM", "UniPC", "Karras"]:
        assert split_sampler_scheduler(plain) == (plain, None)


def test_bare_keys_and_json_values_read_back():
    line = 'Steps: 20, Tiling, Hashes: {"model": "x, y", "lora:a": "b"}, Seed: 3, Sampler: Euler'
    _, _, params = parse_infotext(line, defaults=False)
    assert params == {
        "Steps": "20",
        "Tiling": "Tiling",
        "Hashes": {"model": "x, y", "lora:a": "b"},
        "Seed": "3",
        "Sampler": "Euler",
    }
    # malformed JSON falls back to A1111's reading
    _, _, params = parse_infotext("Steps: 20, Bad: {oops, Seed: 3, Sampler: Euler", defaults=False)
    assert params == {"Steps": "20", "Bad": "{oops", "Seed": "3", "Sampler": "Euler"}


infotext_values = st.one_of(
    st.text(max_size=30),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
)
infotext_keys = st.from_regex(r"[A-Za-z][A-Za-z0-9 ]{0,12}[A-Za-z0-9]", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(params=st.dictionaries(infotext_keys, infotext_values, min_size=3, max_size=8))
def test_any_values_round_trip(params):
    params = {k: v for k, v in params.items() if not re.search(r"-[12]$", k)}
    # A1111 only reads a last line holding 3+ `key: value` items as parameters
    assume(sum(v != k for k, v in params.items()) >= 3)
    text = build_infotext("prompt", "negative", params)
    prompt, negative, parsed = parse_infotext(text, defaults=False)
    assert (prompt, negative) == ("prompt", "negative")
    assert build_infotext(prompt, negative, parsed) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_parse_never_raises(text):
    prompt, negative, params = parse_infotext(text)
    assert isinstance(prompt, str) and isinstance(negative, str) and isinstance(params, dict)


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------


def _image() -> Image.Image:
    return Image.new("RGB", (16, 12), (200, 30, 60))


def test_png_round_trip_through_a_file(tmp_path):
    path = tmp_path / "00001-123.png"
    save_png_with_infotext(_image(), path, FULL_TEXT)
    assert read_infotext_from_image(path) == FULL_TEXT
    assert read_infotext_from_image(str(path)) == FULL_TEXT
    with Image.open(path) as image:
        assert read_infotext_from_image(image) == FULL_TEXT
        assert image.size == (16, 12)
    assert os.listdir(tmp_path) == ["00001-123.png"]  # no temporary file left behind


def test_png_non_latin1_uses_itxt(tmp_path):
    text = "猫が座っている, (masterpiece:1.2)\nSteps: 20, Sampler: Euler, Seed: 1"
    path = tmp_path / "cat.png"
    save_png_with_infotext(_image(), path, text, extra_text={"Software": "ours"})
    with Image.open(path) as image:
        assert isinstance(image.text["parameters"], PngImagePlugin.iTXt)
        assert image.text["Software"] == "ours"
    assert read_infotext_from_image(path) == text
    latin = tmp_path / "latin.png"
    save_png_with_infotext(_image(), latin, "café\nSteps: 1, Seed: 2, Sampler: E")
    with open(latin, "rb") as file:
        assert b"tEXtparameters\0caf\xe9" in file.read()


def test_png_to_a_file_object():
    buffer = io.BytesIO()
    save_png_with_infotext(_image(), buffer, FULL_TEXT)
    buffer.seek(0)
    assert read_infotext_from_image(buffer) == FULL_TEXT


def test_png_overwrite_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "image.png"
    save_png_with_infotext(_image(), path, "first")
    before = path.read_bytes()

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_png_with_infotext(_image(), path, "second")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["image.png"]


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_exif_user_comment_round_trip(tmp_path, suffix):
    path = tmp_path / f"image{suffix}"
    text = "日本語の猫, (cat:1.2)\nNegative prompt: dog\nSteps: 20, Sampler: Euler, Seed: 1"
    image = Image.new("RGBA", (16, 16), (1, 2, 3, 128))
    save_image_with_infotext(image, path, text)
    assert read_infotext_from_image(path) == text


def test_exif_user_comment_encodings():
    text = "a cat\nSteps: 20, Sampler: Euler, Seed: 1"
    for payload in [
        b"UNICODE\0" + text.encode("utf-16-be"),
        b"UNICODE\0" + text.encode("utf-16-le"),
        b"UNICODE\0" + text.encode("utf-16"),  # with a byte-order mark
        b"ASCII\0\0\0" + text.encode("ascii"),
    ]:
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = payload
        buffer = io.BytesIO()
        _image().save(buffer, format="JPEG", exif=exif)
        buffer.seek(0)
        assert read_infotext_from_image(buffer) == text


def test_images_without_infotext(tmp_path):
    path = tmp_path / "plain.png"
    _image().save(path)
    assert read_infotext_from_image(path) is None
    buffer = io.BytesIO()
    _image().save(buffer, format="JPEG")
    buffer.seek(0)
    assert read_infotext_from_image(buffer) is None


def test_unknown_format_needs_an_explicit_one():
    with pytest.raises(ValueError, match="format"):
        save_image_with_infotext(_image(), io.BytesIO(), "x")
