"""Training-caption augmentation for the demo model.

The world's training templates alone teach the text encoder the templates, not the language:
the first demo run read object and background colours right on training wordings and barely
above chance on held-out ones. Two augmentations make it read the words that matter, whatever
sentence is around them:

* `grammar_caption` composes a caption from interchangeable parts (object phrase, position
  phrase, background phrase) in a random order, so the object colour is known by being attached
  to the shape noun and the background colour by not being attached to it.
* `perturb` replaces, drops or inserts filler words. Inserted and replacing words are drawn from
  the CLIP vocabulary, so their embeddings are essentially untrained, like the words of a
  sentence the model has never seen.

Nothing here uses the held-out templates' wording: `HELDOUT_ONLY_WORDS` lists the words that
appear only in `world.HELDOUT_TEMPLATES`, and they are never produced (a test checks).
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from ldm_core.training import world

_FIELD = re.compile(r"\{[a-z_0-9]+\}")


def _words(texts) -> set[str]:
    return set(re.findall(r"[a-z]+", " ".join(_FIELD.sub(" ", t) for t in texts)))


def _training_words() -> set[str]:
    phrases = [p for v in world.POSITION_PHRASES.values() for p in v]
    phrases += [p for v in world.POSITION_WORDS.values() for p in v]
    return _words(world.TRAIN_TEMPLATES + world.TWO_OBJECT_TEMPLATES + tuple(phrases))


# Words of the benchmark's sentences that training captions never contain.
HELDOUT_ONLY_WORDS: frozenset[str] = frozenset(_words(world.HELDOUT_TEMPLATES) - _training_words())

# Words that carry a label: never dropped or replaced by `perturb`.
PROTECTED_WORDS: frozenset[str] = frozenset(
    set(world.COLOUR_NAMES)
    | set(world.SHAPES)
    | set(world.SIZES)
    | {w for v in world.POSITION_WORDS.values() for p in v for w in p.split()}
    | {"background"}
)

# {a} is the article for the phrase that follows it; fixed by `_fill`.
OBJECT_PHRASES: tuple[str, ...] = (
    "{a} {size} {colour} {shape}",
    "{a} {colour} {shape}",
    "{size} {colour} {shape}",
    "{colour} {shape}",
    "{a} {size} {shape} in {colour}",
    "{a} {shape} in {colour}",
    "{a} {colour} {shape}, {size}",
    "{a} {shape}, {colour}, {size}",
    "{a} {size} {shape}, {colour}",
    "{a} {size} {shape} coloured {colour}",
    "{a} {shape}, colour {colour}, size {size}",
    "{colour} {size} {shape}",
)
WHERE_PHRASES: tuple[str, ...] = ("{where}", "{where}", "{pos}", "positioned {where}")
BACKGROUND_PHRASES: tuple[str, ...] = (
    "on {a_bg} background",
    "{bg} background",
    "background {bg}",
    "the background is {bg}",
    "on {bg}",
    "with {a_bg} background",
    "{bg} coloured background",
    "{bg}",
)
# Orders of (object, where, background); the separators between parts are drawn at random.
ORDERS: tuple[tuple[str, ...], ...] = (
    ("obj", "where", "bg"),
    ("bg", "obj", "where"),
    ("where", "obj", "bg"),
    ("obj", "bg", "where"),
    ("bg", "where", "obj"),
)
SEPARATORS: tuple[str, ...] = (" ", ", ", ", ", "; ", " - ", ": ")
PREFIXES: tuple[str, ...] = ("", "", "", "a picture of ", "an image of ", "a drawing of ")


def _article(text: str) -> str:
    return "an" if text[:1] in "aeiou" else "a"


def _fill(template: str, fields: dict[str, str]) -> str:
    text = template.format(**{**fields, "a": "{a}"})
    # Resolve each article against the word that follows it.
    return re.sub(r"\{a\} (\w)", lambda m: f"{_article(m.group(1))} {m.group(1)}", text)


def _pick(rng: np.random.Generator, values):
    return values[int(rng.integers(len(values)))]


def grammar_caption(
    scene: world.Scene, rng: np.random.Generator, parts: tuple[str, ...] = ("obj", "where", "bg")
) -> str:
    """A single-object caption composed from random parts in a random order.

    `parts` leaves out the position ("where") or the background ("bg") phrase: a prompt that
    does not say them ("a red circle") leaves them to chance, as in the captions users write.
    """
    obj = scene.main
    fields = {
        "size": obj.size,
        "colour": obj.colour,
        "shape": obj.shape,
        "where": _pick(rng, world.POSITION_PHRASES[obj.position]),
        "pos": _pick(rng, world.POSITION_WORDS[obj.position]),
        "bg": scene.background,
        "a_bg": f"{_article(scene.background)} {scene.background}",
    }
    phrases = {
        "obj": _fill(_pick(rng, OBJECT_PHRASES), fields),
        "where": _fill(_pick(rng, WHERE_PHRASES), fields),
        "bg": _fill(_pick(rng, BACKGROUND_PHRASES), fields),
    }
    order = [name for name in _pick(rng, ORDERS) if name in parts]
    text = phrases[order[0]]
    for prev, name in zip(order, order[1:], strict=False):
        sep = " " if name == "where" and prev == "obj" else None
        text += (sep or _pick(rng, SEPARATORS)) + phrases[name]
    return _pick(rng, PREFIXES) + text


@lru_cache(maxsize=1)
def filler_vocabulary() -> tuple[str, ...]:
    """Whole-word CLIP tokens usable as unseen filler: alphabetic, 3-10 letters, no label word,
    no word of any template (training or held-out)."""
    from ldm_core.tokenizer import bpe_vocab_and_merges

    vocab, _ = bpe_vocab_and_merges()
    banned = _training_words() | _words(world.HELDOUT_TEMPLATES) | PROTECTED_WORDS
    banned |= {"colour", "color", "coloured", "colored", "size", "positioned", "picture"}
    out = []
    for token in vocab:
        if not token.endswith("</w>"):
            continue
        word = token[:-4]
        if word.isascii() and word.isalpha() and 3 <= len(word) <= 10 and word not in banned:
            out.append(word)
    return tuple(sorted(out))


def perturb(
    text: str,
    rng: np.random.Generator,
    *,
    replace: float = 0.15,
    drop: float = 0.1,
    insert: float = 0.5,
) -> str:
    """Replace / drop unprotected words and insert up to two unseen filler words."""
    fillers = filler_vocabulary()
    words = text.split(" ")
    out = []
    for word in words:
        core = word.strip(",;:-")
        if core and core not in PROTECTED_WORDS:
            r = rng.random()
            if r < drop:
                continue
            if r < drop + replace:
                word = word.replace(core, _pick(rng, fillers))
        out.append(word)
    if rng.random() < insert:
        for _ in range(int(rng.integers(1, 3))):
            out.insert(int(rng.integers(0, len(out) + 1)), _pick(rng, fillers))
    return " ".join(w for w in out if w)


# Part sets of partial captions: the object alone, without the background, without the position.
PARTIAL_PARTS: tuple[tuple[str, ...], ...] = (("obj",), ("obj", "where"), ("obj", "bg"))


def training_caption(
    scene: world.Scene,
    rng: np.random.Generator,
    *,
    grammar: float = 0.5,
    noise: float = 0.5,
    partial: float = 0.2,
) -> str:
    """The caption of one training example: a world template or a grammar caption, then noise.

    A `partial` share of single-object captions leaves out the position, the background or both.
    Measured on the first shipped model, trained on complete captions only: "a red circle"
    gave orange shapes on a red background 8 times out of 8, because every caption it had seen
    named a background colour, and a lone colour word was read as one.
    """
    single = len(scene.objects) == 1
    if single and rng.random() < partial:
        text = grammar_caption(scene, rng, _pick(rng, PARTIAL_PARTS))
    elif single and rng.random() < grammar:
        text = grammar_caption(scene, rng)
    else:
        text = world.caption(scene, rng, "train")
    return perturb(text, rng) if rng.random() < noise else text
