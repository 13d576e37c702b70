from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ldm_core.training import world
from ldm_core.training.judge import (
    DEFAULT_JUDGE_PATH,
    Judge,
    evaluate,
    load_judge,
    save_judge,
    score,
)
from ldm_core.training.world import (
    ATTRIBUTES,
    COLOURS,
    HELDOUT_TEMPLATES,
    POSITIONS,
    TRAIN_TEMPLATES,
    TWO_OBJECT_TEMPLATES,
    Scene,
    SceneObject,
    SceneStream,
    benchmark_prompts,
    caption,
    object_mask,
    render,
    template_attributes,
)


def _take(stream: SceneStream, n: int):
    return list(itertools.islice(stream, n))


def test_same_seed_same_images_and_captions():
    a, b = _take(SceneStream(7), 40), _take(SceneStream(7), 40)
    for (img_a, cap_a, scene_a), (img_b, cap_b, scene_b) in zip(a, b, strict=True):
        assert np.array_equal(img_a, img_b)
        assert cap_a == cap_b
        assert scene_a == scene_b
    other = _take(SceneStream(8), 40)
    assert [c for _, c, _ in a] != [c for _, c, _ in other]


def test_batch_shapes_and_range():
    batch = SceneStream(3).batch(16)
    assert batch.images.shape == (16, 3, 64, 64) and batch.images.dtype == torch.float32
    assert batch.images.min() >= -1 and batch.images.max() <= 1
    assert len(batch.captions) == 16
    for a in ATTRIBUTES:
        assert batch.labels[a].shape == (16,) and batch.labels[a].dtype == torch.long
    assert batch.labels["colour"][0].item() == world.COLOUR_NAMES.index(batch.scenes[0].main.colour)


def test_render_is_anti_aliased_and_pure():
    scene = Scene((SceneObject("star", "red", "large", "centre", 0.3, -0.7, 5.0, 1.02),), "white")
    img = render(scene)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert np.array_equal(img, render(scene))
    colours = {tuple(p) for p in img.reshape(-1, 3)}
    assert len(colours) > 5  # edge pixels blend object and background


@pytest.mark.parametrize("seed", range(3))
def test_labels_match_pixels(seed):
    for _img, _, scene in _take(SceneStream(seed, two_object_prob=0.5), 60):
        img = render(scene).astype(int)
        bg = np.array(COLOURS[scene.background])
        masks = [object_mask(o) for o in scene.objects]
        for obj, mask in zip(scene.objects, masks, strict=True):
            cx, cy = obj.centre
            assert np.abs(img[int(cy), int(cx)] - COLOURS[obj.colour]).max() <= 1
            # The object sits nearest the anchor it is labelled with.
            ys, xs = np.nonzero(mask > 0.5)
            centroid = (xs.mean() + 0.5, ys.mean() + 0.5)
            nearest = min(POSITIONS, key=lambda p: math.dist(POSITIONS[p], centroid))
            assert nearest == obj.position
            area = mask.sum()
            assert (40 < area < 190) if obj.size == "small" else (area > 200)
        # A corner pixel no object touches is exactly the background colour.
        covered = sum(masks)
        corners = [(y, x) for y in (0, 63) for x in (0, 63) if covered[y, x] == 0]
        assert corners
        for y, x in corners:
            assert np.array_equal(img[y, x], bg)


def test_two_object_scenes_do_not_overlap():
    scenes = [s for _, _, s in _take(SceneStream(11, two_object_prob=1.0), 150)]
    pairs = [s for s in scenes if len(s.objects) == 2]
    assert len(pairs) >= 140
    for s in pairs:
        a, b = s.objects
        assert a.position != b.position and a.colour != b.colour
        assert s.background not in (a.colour, b.colour)
        assert (object_mask(a) * object_mask(b)).max() == 0


def test_captions_mention_labels():
    rng = np.random.default_rng(0)
    for _, text, scene in _take(SceneStream(5, two_object_prob=0.3), 100):
        for obj in scene.objects:
            assert obj.colour in text and obj.shape in text
        assert scene.background in text
    two = Scene(
        (
            SceneObject("circle", "red", "large", "left"),
            SceneObject("square", "blue", "small", "right"),
        ),
        "white",
    )
    assert " and " in caption(two, rng)
    with pytest.raises(ValueError):
        caption(two, rng, split="heldout")


def test_heldout_templates_are_disjoint_from_train():
    assert len(TRAIN_TEMPLATES) >= 12 and len(HELDOUT_TEMPLATES) >= 6
    assert not set(HELDOUT_TEMPLATES) & (set(TRAIN_TEMPLATES) | set(TWO_OBJECT_TEMPLATES))
    for template in TRAIN_TEMPLATES:
        assert {"colour", "shape", "position", "background"} <= template_attributes(template)
    for template in HELDOUT_TEMPLATES:
        assert template_attributes(template) == set(ATTRIBUTES)
    # No filled-in caption can come out of both splits.
    rng = np.random.default_rng(0)
    scene = Scene((SceneObject("circle", "orange", "small", "centre"),), "black")
    train = {caption(scene, rng, "train") for _ in range(500)}
    heldout = {caption(scene, rng, "heldout") for _ in range(500)}
    assert not train & heldout


def test_train_templates_put_the_object_colour_after_is():
    # Without such sentences, r119's text encoder gave the colour after "is" to the background.
    def colour_after_is(template: str) -> bool:
        rest = template.partition("{shape}")[2]
        return "{colour}" in rest and " is " in rest[: rest.index("{colour}")]

    assert sum(map(colour_after_is, TRAIN_TEMPLATES)) >= 2
    # ...and none of them is the held-out sentence's own frame.
    assert not any("is {colour} and {size}" in t for t in TRAIN_TEMPLATES)


def _matches(template: str, prompt: str, scene: Scene) -> bool:
    rng = np.random.default_rng(0)
    return any(world.fill_template(template, scene, rng) == prompt for _ in range(60))


def test_benchmark_prompts_use_heldout_templates_and_are_balanced():
    items = benchmark_prompts(112, seed=0)
    assert items == benchmark_prompts(112, seed=0)
    assert len(items) == 112
    for prompt, scene in items:
        assert len(scene.objects) == 1
        assert any(_matches(t, prompt, scene) for t in HELDOUT_TEMPLATES)
        assert not any(_matches(t, prompt, scene) for t in TRAIN_TEMPLATES)
    colours = [s.main.colour for _, s in items]
    backgrounds = [s.background for _, s in items]
    for name in COLOURS:
        assert colours.count(name) == 14 and backgrounds.count(name) == 14
    for attribute, names in (("shape", world.SHAPES), ("position", world.POSITION_NAMES)):
        counts = [sum(getattr(s.main, attribute) == n for _, s in items) for n in names]
        assert max(counts) - min(counts) <= 1


def test_shipped_judge_reads_fresh_renders():
    assert DEFAULT_JUDGE_PATH.stat().st_size < 2_000_000
    judge = load_judge()
    accuracy = evaluate(judge, 300, seed=424242)
    assert all(accuracy[a] >= 0.99 for a in ATTRIBUTES), accuracy


def test_judge_save_load_round_trip(tmp_path):
    judge = Judge().eval()
    path = tmp_path / "judge.safetensors"
    save_judge(judge, path, {"note": "untrained"})
    loaded = load_judge(path)
    x = SceneStream(1, two_object_prob=0.0).batch(8)
    with torch.no_grad():
        for a, logits in judge(x.images).items():
            assert torch.equal(logits, loaded(x.images)[a])
    predictions = loaded.predict(x.images)
    assert set(score(predictions, x.scenes)) == set(ATTRIBUTES)
    with pytest.raises(ValueError):
        loaded.predict(torch.zeros(1, 3, 32, 32))
