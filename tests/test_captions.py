"""Training-caption augmentation: labels survive, held-out wording never leaks into training."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ldm_core.training import captions, world


def _scenes(n: int, seed: int, two_object_prob: float = 0.2) -> list[world.Scene]:
    rng = np.random.default_rng(seed)
    return [world.sample_scene(rng, two_object_prob) for _ in range(n)]


def test_heldout_only_words_are_the_benchmark_wording():
    assert {"backdrop", "canvas", "surrounded", "against"} <= captions.HELDOUT_ONLY_WORDS
    assert not captions.HELDOUT_ONLY_WORDS & captions.PROTECTED_WORDS
    assert not captions.HELDOUT_ONLY_WORDS & set(captions.filler_vocabulary())


def test_training_captions_never_use_heldout_words():
    rng = np.random.default_rng(1)
    text = " ".join(captions.training_caption(s, rng) for s in _scenes(3000, 0))
    assert not set(re.findall(r"[a-z]+", text)) & captions.HELDOUT_ONLY_WORDS


@pytest.mark.parametrize("seed", range(3))
def test_grammar_captions_name_every_label(seed):
    rng = np.random.default_rng(seed)
    for scene in _scenes(300, seed, two_object_prob=0.0):
        text = captions.grammar_caption(scene, rng)
        obj = scene.main
        for word in (obj.colour, obj.shape, scene.background):
            assert re.search(rf"\b{word}\b", text), (word, text)
        assert any(p in text for p in world.POSITION_WORDS[obj.position]), text
        # The object colour is the one attached to the shape phrase; exactly two colours appear.
        colours = [c for c in world.COLOUR_NAMES if re.search(rf"\b{c}\b", text)]
        assert sorted(colours) == sorted({obj.colour, scene.background}), text


@pytest.mark.parametrize("parts", captions.PARTIAL_PARTS)
def test_partial_captions_name_only_their_parts(parts):
    rng = np.random.default_rng(5)
    for scene in _scenes(300, 5, two_object_prob=0.0):
        if scene.background == scene.main.colour:
            continue
        text = captions.grammar_caption(scene, rng, parts)
        obj = scene.main
        assert re.search(rf"\b{obj.colour}\b", text) and obj.shape in text, text
        assert bool(re.search(rf"\b{scene.background}\b", text)) == ("bg" in parts), text
        if "where" not in parts:
            words = {w for v in world.POSITION_WORDS.values() for p in v for w in p.split()}
            assert not set(re.findall(r"[a-z]+", text)) & words, text


def test_some_training_captions_leave_out_position_and_background():
    rng = np.random.default_rng(2)
    scenes = [s for s in _scenes(2000, 2, two_object_prob=0.0) if s.background != s.main.colour]
    texts = [captions.training_caption(s, rng, noise=0.0) for s in scenes]
    no_bg = sum(
        not re.search(rf"\b{s.background}\b", t) for s, t in zip(scenes, texts, strict=True)
    )
    assert 0.08 < no_bg / len(scenes) < 0.2, no_bg / len(scenes)  # 2/3 of the 20% partial share


def test_perturb_keeps_label_words_and_changes_fillers():
    rng = np.random.default_rng(0)
    text = "a picture of a large red circle on the left, white background"
    outs = [captions.perturb(text, rng) for _ in range(200)]
    for out in outs:
        for word in ("large", "red", "circle", "left", "white", "background"):
            assert re.search(rf"\b{word}\b", out), out
    assert len(set(outs)) > 100  # it really varies


def test_captions_are_deterministic_given_the_rng():
    scenes = _scenes(50, 3)
    a = [captions.training_caption(s, np.random.default_rng(7)) for s in scenes]
    b = [captions.training_caption(s, np.random.default_rng(7)) for s in scenes]
    assert a == b
