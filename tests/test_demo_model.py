"""End-to-end checks of the shipped demo model, scored by the world's judge (issue 5).

These go through the same `load_checkpoint` and `pipeline` calls as the app. They skip when the
demo file is absent (a checkout without the model), never otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_core import pipeline
from ldm_core.loader import load_checkpoint
from ldm_core.training import world
from ldm_core.training.judge import DEFAULT_JUDGE_PATH, load_judge

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "Stable-diffusion" / "demo-shapes.safetensors"

pytestmark = pytest.mark.skipif(not DEMO.is_file(), reason="demo model not in this checkout")

WHITE = world.COLOURS["white"]


@pytest.fixture(scope="module")
def demo():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield load_checkpoint(DEMO, device="cpu", dtype=torch.float32), load_judge(DEFAULT_JUDGE_PATH)
    torch.set_num_threads(threads)


def _params(**kw) -> pipeline.GenerationParams:
    base = dict(steps=20, sampler_name="DPM++ 2M", cfg_scale=5.0, width=64, height=64)
    return pipeline.GenerationParams(**{**base, **kw})


def _judge(judge, images: list[Image.Image]) -> list[dict[str, str]]:
    return judge.predict(torch.cat([pipeline.pil_to_tensor(im.convert("RGB")) for im in images]))


def _share(labels: list[dict[str, str]], **expected) -> dict[str, float]:
    return {k: sum(lab[k] == v for lab in labels) / len(labels) for k, v in expected.items()}


def test_file_is_small_and_describes_itself(demo):
    ckpt, _ = demo
    assert DEMO.stat().st_size <= 30_000_000
    assert ckpt.family.name == "SD1"
    assert ckpt.metadata["ldm.name"] == "demo-shapes"
    assert ckpt.metadata["ldm.default_size"] == "64"


def test_red_circle(demo):
    ckpt, judge = demo
    result = pipeline.txt2img(ckpt, _params(prompt="a red circle", seed=1, batch_size=8))
    share = _share(_judge(judge, result.images), colour="red", shape="circle")
    # the model's bars are 95% colour and 90% shape; 6 of 8 leaves room for sampling luck
    assert share["colour"] >= 6 / 8 and share["shape"] >= 6 / 8, share


def test_prompt_words_steer_every_attribute(demo):
    ckpt, judge = demo
    cases = [
        ("a large green square in the top left corner on a white background",
         dict(colour="green", shape="square", size="large", position="top left", background="white")),
        ("small red star at the bottom, black background",
         dict(colour="red", shape="star", size="small", position="bottom", background="black")),
        ("a large purple triangle on the right on an orange background",
         dict(colour="purple", shape="triangle", size="large", position="right", background="orange")),
    ]  # fmt: skip
    for prompt, expected in cases:
        result = pipeline.txt2img(ckpt, _params(prompt=prompt, seed=3, batch_size=4))
        share = _share(_judge(judge, result.images), **expected)
        assert min(share.values()) >= 3 / 4, (prompt, share)


def test_small_yellow_star_on_black_keeps_its_colour(demo):
    # The previous shipped file (until 2026-12-06) drew this star white every time (8 of 8 at
    # seed 1, 4 of 4 here): a small yellow object is the hardest colour to keep apart in the
    # latents (docs/demo-model.md, "Keeping neighbouring colours apart in the latents").
    ckpt, judge = demo
    prompt = "small yellow star at the bottom, black background"
    result = pipeline.txt2img(ckpt, _params(prompt=prompt, seed=3, batch_size=4))
    assert _share(_judge(judge, result.images), colour="yellow")["colour"] >= 3 / 4


def test_img2img_keeps_the_layout_and_follows_the_prompt(demo):
    ckpt, judge = demo
    scene = world.Scene((world.SceneObject("circle", "red", "large", "left"),), "white")
    src = Image.fromarray(world.render(scene))
    result = pipeline.img2img(
        ckpt,
        _params(
            prompt="a large blue circle on the left on a white background",
            init_image=src,
            denoising_strength=0.6,
            seed=2,
            batch_size=4,
        ),
    )
    share = _share(_judge(judge, result.images), colour="blue", shape="circle", position="left")
    assert min(share.values()) >= 3 / 4, share
    # a weak strength changes the picture little: no more than the autoencoder's own round trip
    weak = pipeline.img2img(
        ckpt, _params(prompt="a red circle", init_image=src, denoising_strength=0.05, seed=2)
    )
    diff = np.abs(np.asarray(weak.images[0], np.int16) - np.asarray(src, np.int16)).mean()
    with torch.no_grad():
        x = pipeline.pil_to_tensor(src)
        round_trip = ckpt.vae.decode(ckpt.vae.encode(x)).clamp(-1, 1)[0]
    floor = float((round_trip - x[0]).abs().mean()) * 127.5  # in 0-255 levels, as `diff`
    assert floor < 8 and diff < floor + 1, (diff, floor)  # measured: 4.4 against 4.1 (r121)


def test_inpaint_draws_in_the_masked_region_and_keeps_the_rest(demo):
    ckpt, judge = demo
    src = Image.new("RGB", (64, 64), WHITE)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 32))  # the top-left quarter
    result = pipeline.inpaint(
        ckpt,
        _params(
            prompt="a blue square in the top left corner on a white background",
            init_image=src,
            mask=mask,
            mask_blur=0,
            denoising_strength=1.0,
            inpainting_fill=2,  # latent noise
            seed=4,
            batch_size=4,
        ),
    )
    labels = _judge(judge, result.images)
    share = _share(labels, colour="blue", shape="square", position="top left")
    assert min(share.values()) >= 3 / 4, (share, labels)
    for image in result.images:
        out = np.asarray(image, np.int16)
        outside = np.ones((64, 64), bool)
        outside[:32, :32] = False
        assert (out[outside] == np.array(WHITE)).all(), "unmasked pixels must not change"


def test_latent_colours_measures_each_pairs_distance_in_the_files_scaled_latents(demo, capsys):
    """bench/latent_colours.py: the distance of one scene pair is its two latents' L2 distance."""
    from bench import latent_colours

    ckpt, _ = demo
    result = latent_colours.main([str(DEMO), "--scenes", "1"])[str(DEMO)]
    assert result["scale_factor"] == pytest.approx(ckpt.scale_factor)
    # scene 0 of every pair: a circle at the first position on the first background left over
    position = world.POSITION_NAMES[0]
    images = [
        world.render(world.Scene((world.SceneObject("circle", c, "small", position),), "black"))
        for c in ("orange", "yellow")
    ]
    with torch.no_grad():
        z = ckpt.vae.encode(world.images_to_tensor(images)) * ckpt.scale_factor
    assert result["small"]["orange-yellow"] == pytest.approx(float((z[0] - z[1]).norm()), rel=1e-4)
    # a large object covers more latent cells than a small one, so its colour moves them further
    for pair, small in result["small"].items():
        assert 0 < small < result["large"][pair], pair
    assert "orange-yellow" in capsys.readouterr().out
