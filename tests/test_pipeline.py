"""Pipelines on a tiny random-weight checkpoint: reproducibility, seeds, img2img, inpainting,
hires fix, interrupt, guidance and the per-step hook points."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import ldm_core
from ldm_core import infotext, pipeline
from ldm_core.denoiser import classifier_free_guidance
from ldm_core.patcher import ModelHandle
from ldm_core.pipeline import CancelToken, GenerationError, GenerationParams
from ldm_core.schedules import ModelSampling
from tests.tiny import TINY_UNET, write_tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    write_tiny(path)
    return ldm_core.load_checkpoint(path, device="cpu")


@pytest.fixture(scope="module")
def inpaint_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny9") / "tiny-inpainting.safetensors"
    write_tiny(path, unet_cfg=replace(TINY_UNET, in_channels=9))
    return ldm_core.load_checkpoint(path, device="cpu")


BASE = GenerationParams(
    prompt="a red circle",
    negative_prompt="blurry",
    steps=6,
    width=64,
    height=64,
    seed=1234,
    cfg_scale=5.0,
)


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_same_parameters_give_identical_images(ckpt):
    a = pipeline.txt2img(ckpt, BASE)
    b = pipeline.txt2img(ckpt, BASE)
    assert a.seeds == [1234]
    assert np.array_equal(_arr(a.images[0]), _arr(b.images[0]))
    c = pipeline.txt2img(ckpt, replace(BASE, seed=1235))
    assert not np.array_equal(_arr(a.images[0]), _arr(c.images[0]))


def test_batch_seeds_and_infotext(ckpt):
    res = pipeline.txt2img(ckpt, replace(BASE, batch_size=2, n_iter=2))
    assert res.seeds == [1234, 1235, 1236, 1237]
    assert len(res.images) == 4
    # image 1 of the batch equals a single run with seed + 1 (per-image noise, batch-independent)
    single = pipeline.txt2img(ckpt, replace(BASE, seed=1235))
    assert np.abs(_arr(res.images[1]) - _arr(single.images[0])).max() <= 1
    prompt, negative, params = infotext.parse_infotext(res.infotexts[2], defaults=False)
    assert (prompt, negative) == ("a red circle", "blurry")
    assert params["Seed"] == "1236" and params["Steps"] == "6" and params["Sampler"] == "DPM++ 2M"
    assert params["Schedule type"] == "Karras" and params["Model hash"] == ckpt.model_hash
    assert (params["Size-1"], params["Size-2"]) == ("64", "64")
    assert res.images[2].info["parameters"] == res.infotexts[2]


def test_random_seed_is_reported(ckpt):
    res = pipeline.txt2img(ckpt, replace(BASE, seed=-1))
    assert res.seeds[0] >= 0
    again = pipeline.txt2img(ckpt, replace(BASE, seed=res.seeds[0]))
    assert np.array_equal(_arr(res.images[0]), _arr(again.images[0]))


def test_variation_strength_endpoints(ckpt):
    base = pipeline.txt2img(ckpt, BASE)
    v0 = pipeline.txt2img(ckpt, replace(BASE, subseed=99, subseed_strength=0.0))
    v1 = pipeline.txt2img(ckpt, replace(BASE, subseed=99, subseed_strength=1.0))
    other = pipeline.txt2img(ckpt, replace(BASE, seed=99))
    mid = pipeline.txt2img(ckpt, replace(BASE, subseed=99, subseed_strength=0.5))
    assert np.array_equal(_arr(v0.images[0]), _arr(base.images[0]))
    assert np.abs(_arr(v1.images[0]) - _arr(other.images[0])).max() <= 1
    assert not np.array_equal(_arr(mid.images[0]), _arr(base.images[0]))
    assert "Variation seed: 99" in mid.infotexts[0]


@pytest.mark.parametrize(
    "sampler", ["Euler a", "DPM++ 2M SDE", "Heun", "DDIM", "UniPC", "LCM", "DPM2 a", "LMS"]
)
def test_every_kind_of_sampler_runs_reproducibly(ckpt, sampler):
    p = replace(BASE, sampler_name=sampler, steps=4)
    a, b = pipeline.txt2img(ckpt, p), pipeline.txt2img(ckpt, p)
    assert np.array_equal(_arr(a.images[0]), _arr(b.images[0]))


def test_old_combined_sampler_name_is_split(ckpt):
    res = pipeline.txt2img(
        ckpt, replace(BASE, sampler_name="DPM++ 2M Karras", scheduler="Automatic")
    )
    _, _, params = infotext.parse_infotext(res.infotexts[0], defaults=False)
    assert params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras"


def test_img2img_strength_zero_is_vae_round_trip(ckpt):
    src = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    res = pipeline.img2img(ckpt, replace(BASE, init_image=src, denoising_strength=0.0))
    with torch.no_grad():
        rt = pipeline.tensor_to_pil(ckpt.vae.decode(ckpt.vae.encode(pipeline.pil_to_tensor(src))))[
            0
        ]
    assert np.abs(_arr(res.images[0]) - _arr(rt)).max() <= 1
    changed = pipeline.img2img(ckpt, replace(BASE, init_image=src, denoising_strength=0.8))
    assert np.abs(_arr(changed.images[0]) - _arr(rt)).mean() > 1


def test_img2img_resize_modes():
    src = Image.new("RGB", (100, 50), (255, 0, 0))
    src.paste((0, 0, 255), (0, 0, 10, 50))
    assert pipeline.resize_image(0, src, 64, 64).size == (64, 64)
    crop = pipeline.resize_image(1, src, 64, 64)
    assert crop.getpixel((0, 32)) == (255, 0, 0)  # the blue left edge was cropped away
    fill = pipeline.resize_image(2, src, 64, 64)
    assert fill.getpixel((32, 0))[0] > 200 and fill.getpixel((2, 32))[2] > 200


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
@pytest.mark.parametrize("full_res", [False, True])
def test_inpaint_keeps_unmasked_pixels_exactly(ckpt, fill, full_res):
    rng = np.random.default_rng(1)
    src = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 40, 40))
    p = replace(
        BASE,
        init_image=src,
        mask=mask,
        denoising_strength=1.0,
        inpainting_fill=fill,
        mask_blur=3,
        inpaint_full_res=full_res,
        inpaint_full_res_padding=8,
    )
    res = pipeline.inpaint(ckpt, p)
    out, inp, m = _arr(res.images[0]), _arr(src), np.asarray(mask) > 0
    assert np.array_equal(out[~m], inp[~m])
    assert np.abs(out[m] - inp[m]).mean() > 5  # the masked area was repainted
    assert "Masked content" in res.infotexts[0]


def test_inpainting_model_with_nine_channels(inpaint_ckpt):
    src = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    res = pipeline.inpaint(inpaint_ckpt, replace(BASE, init_image=src, mask=mask, mask_blur=0))
    out, m = _arr(res.images[0]), np.asarray(mask) > 0
    assert np.array_equal(out[~m], _arr(src)[~m])
    assert pipeline.txt2img(inpaint_ckpt, BASE).images[0].size == (64, 64)


def test_outpaint_pad_and_inpaint(ckpt):
    src = Image.new("RGB", (48, 64), (10, 200, 10))
    padded, mask = pipeline.outpaint_pad(src, right=16)
    assert (
        padded.size == (64, 64) and mask.getpixel((60, 10)) == 255 and mask.getpixel((10, 10)) == 0
    )
    res = pipeline.inpaint(
        ckpt, replace(BASE, init_image=padded, mask=mask, inpainting_fill=0, mask_blur=0)
    )
    assert np.array_equal(_arr(res.images[0])[:, :48], _arr(src))


def test_hires_fix_latent_and_pixel(ckpt):
    for upscaler in ("Latent", "Lanczos"):
        res = pipeline.txt2img(
            ckpt,
            replace(
                BASE, enable_hr=True, hr_scale=1.5, hr_upscaler=upscaler, hr_second_pass_steps=3
            ),
        )
        assert res.images[0].size == (96, 96)
        assert f"Hires upscaler: {upscaler}" in res.infotexts[0]


def test_interrupt_stops_within_a_step_and_keeps_finished_images(ckpt):
    token = CancelToken()
    steps_seen = []

    def on_step(ev):
        steps_seen.append((ev.batch_index, ev.step))
        if ev.batch_index == 1 and ev.step == 2:
            token.interrupt()

    res = pipeline.txt2img(ckpt, replace(BASE, n_iter=3), on_step=on_step, cancel=token)
    assert res.interrupted and len(res.images) == 1 and res.seeds == [1234]
    assert steps_seen[-1] == (1, 2)  # nothing ran after the step that interrupted


def test_skip_moves_to_next_batch(ckpt):
    token = CancelToken()

    def on_step(ev):
        if ev.batch_index == 0 and ev.step == 1:
            token.skip()

    res = pipeline.txt2img(ckpt, replace(BASE, n_iter=2), on_step=on_step, cancel=token)
    assert not res.interrupted and res.seeds == [1235]


def test_progress_events_and_previews(ckpt):
    events = []
    pipeline.txt2img(ckpt, replace(BASE, preview_every=2), on_step=events.append)
    assert [e.step for e in events] == list(range(1, 7)) and all(e.total_steps == 6 for e in events)
    previews = [e.preview for e in events if e.preview is not None]
    assert len(previews) == 2 and previews[0].size == (64, 64)
    cheap = pipeline.latent_preview(ckpt, torch.randn(1, 4, 8, 8), "cheap")
    assert cheap.size == (8, 8)


def test_uncond_pass_skipped_at_scale_one(ckpt):
    calls = []
    handle = ModelHandle(ckpt, ModelSampling.from_spec(ckpt.spec))

    def count(apply, call):
        calls.append(list(call.cond_or_uncond))
        return apply(call)

    handle.add_unet_wrapper(count)
    pipeline.txt2img(handle, replace(BASE, cfg_scale=1.0, sampler_name="Euler", steps=3))
    assert calls == [[0]] * 3
    calls.clear()
    pipeline.txt2img(handle, replace(BASE, cfg_scale=5.0, sampler_name="Euler", steps=3))
    assert calls == [[0, 1]] * 3


def test_cfg_rescale_through_post_cfg_hook(ckpt):
    plain = pipeline.txt2img(ckpt, replace(BASE, cfg_scale=12))
    zero = pipeline.txt2img(ckpt, replace(BASE, cfg_scale=12, cfg_rescale=0.0))
    full = pipeline.txt2img(ckpt, replace(BASE, cfg_scale=12, cfg_rescale=1.0))
    assert np.array_equal(_arr(plain.images[0]), _arr(zero.images[0]))
    assert not np.array_equal(_arr(plain.images[0]), _arr(full.images[0]))
    assert "CFG rescale phi: 1.0" in full.infotexts[0]


def test_custom_cfg_function_and_post_cfg_order(ckpt):
    handle = ModelHandle(ckpt, ModelSampling.from_spec(ckpt.spec))
    order = []

    def cfg(args):
        order.append("cfg")
        return classifier_free_guidance(args)

    handle.set_cfg_function(cfg)
    handle.add_post_cfg_function(lambda a: order.append("post1") or a.denoised)
    handle.add_post_cfg_function(lambda a: order.append("post2") or a.denoised)
    res = pipeline.txt2img(handle, replace(BASE, sampler_name="Euler", steps=2))
    assert order == ["cfg", "post1", "post2"] * 2
    assert np.array_equal(
        _arr(res.images[0]),
        _arr(pipeline.txt2img(ckpt, replace(BASE, sampler_name="Euler", steps=2)).images[0]),
    )


def test_prompt_edit_switches_conditioning_at_the_right_step(ckpt):
    handle = ModelHandle(ckpt, ModelSampling.from_spec(ckpt.spec))
    contexts = {}

    def grab(apply, call):
        step = call.hooks.options["step"]
        contexts[step] = call.context[0].clone()
        return apply(call)

    handle.add_unet_wrapper(grab)
    pipeline.txt2img(
        handle,
        replace(BASE, prompt="a [red:blue:3] circle", sampler_name="Euler", steps=8, cfg_scale=1.0),
    )
    red = (
        pipeline.conditioning.encode_prompts(ckpt, ["a red circle"], [""], 8).cond[0].parts[0].at(0)
    )
    blue = (
        pipeline.conditioning.encode_prompts(ckpt, ["a blue circle"], [""], 8)
        .cond[0]
        .parts[0]
        .at(0)
    )
    for step in range(8):
        want = red if step <= 3 else blue  # A1111: "red" while step <= 3
        assert torch.allclose(contexts[step], want.to(contexts[step])), step


def test_control_residuals_from_patcher_reach_the_unet(ckpt):
    from ldm_core.nn.hooks import ControlResiduals

    class Zero:
        def residuals(self, call):
            return ControlResiduals(middle=[torch.zeros(1)])

    class Push:
        def residuals(self, call):
            return ControlResiduals(middle=[torch.full((1,), 0.5)])

    handle = ModelHandle(ckpt, ModelSampling.from_spec(ckpt.spec))
    plain = pipeline.txt2img(ckpt, BASE)
    zero = handle.clone()
    zero.add_control(Zero())
    assert np.array_equal(_arr(pipeline.txt2img(zero, BASE).images[0]), _arr(plain.images[0]))
    push = handle.clone()
    push.add_control(Push())
    assert not np.array_equal(_arr(pipeline.txt2img(push, BASE).images[0]), _arr(plain.images[0]))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 0}, "width must be at least 8"),
        ({"width": 100000, "height": 100000}, "too large"),
        ({"steps": 0}, "steps must be between"),
        ({"cfg_scale": float("nan")}, "CFG scale"),
        ({"sampler_name": "Nope"}, "unknown sampler"),
        ({"denoising_strength": 2.0}, "denoising strength"),
    ],
)
def test_bad_parameters_are_clear_errors(ckpt, change, message):
    with pytest.raises(GenerationError, match=message):
        pipeline.txt2img(ckpt, replace(BASE, **change))


def test_img2img_and_inpaint_need_inputs(ckpt):
    with pytest.raises(GenerationError, match="input image"):
        pipeline.img2img(ckpt, BASE)
    src = Image.new("RGB", (64, 64))
    with pytest.raises(GenerationError, match="mask"):
        pipeline.inpaint(ckpt, replace(BASE, init_image=src))
    with pytest.raises(GenerationError, match="mask is empty"):
        pipeline.inpaint(ckpt, replace(BASE, init_image=src, mask=Image.new("L", (64, 64), 0)))
