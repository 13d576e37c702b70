"""A procedurally drawn, captioned image world for training and judging the demo model.

Every image is 64x64 RGB: one or two flat-coloured shapes on a plain background. The labels
(shape, colour, size and position of each object, and the background colour) fully determine
the picture up to a small jitter that is stored in the scene as well, so `render(scene)` is a
pure function. Shapes are drawn anti-aliased by supersampling 4x4 points per pixel.

Captions come from two disjoint sets of templates: `TRAIN_TEMPLATES` for training and
`HELDOUT_TEMPLATES`, whose wordings are never shown in training, for the benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 64
SUPERSAMPLE = 4

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Fixed sRGB values, pairwise at least ~100 apart (Euclidean, 0-255) so that no colour can be
# mistaken for another after mild blur or colour drift.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZES: tuple[str, ...] = ("small", "large")
# Radius in pixels of each size class; other shapes are scaled to look comparably big.
SIZE_RADIUS: dict[str, float] = {"small": 7.0, "large": 12.0}
# Anchor points (x, y) of a 3x3 grid, in pixels; y grows downwards.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (16.0, 16.0),
    "top": (32.0, 16.0),
    "top right": (48.0, 16.0),
    "left": (16.0, 32.0),
    "centre": (32.0, 32.0),
    "right": (48.0, 32.0),
    "bottom left": (16.0, 48.0),
    "bottom": (32.0, 48.0),
    "bottom right": (48.0, 48.0),
}
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position", "background")
LABELS: dict[str, tuple[str, ...]] = {
    "colour": COLOUR_NAMES,
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITION_NAMES,
    "background": COLOUR_NAMES,
}

POSITION_JITTER = 2.0  # pixels, each axis, uniform
ANGLE_JITTER = 10.0  # degrees, uniform, for every shape but the circle
SCALE_JITTER = 0.06  # relative, uniform
OBJECT_GAP = 2.0  # minimum distance in pixels between the bounding circles of two objects
DEFAULT_TWO_OBJECT_PROB = 0.2


@dataclass(frozen=True)
class SceneObject:
    """One shape: its labels plus the jitter that makes each drawing a little different."""

    shape: str
    colour: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0
    angle: float = 0.0  # degrees, clockwise on screen
    scale: float = 1.0

    def __post_init__(self) -> None:
        for attribute, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, COLOUR_NAMES),
            ("size", self.size, SIZES),
            ("position", self.position, POSITION_NAMES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {attribute} {value!r}; expected one of {allowed}")

    @property
    def labels(self) -> tuple[str, str, str, str]:
        return (self.shape, self.colour, self.size, self.position)

    @property
    def centre(self) -> tuple[float, float]:
        x, y = POSITIONS[self.position]
        return (x + self.dx, y + self.dy)


@dataclass(frozen=True)
class Scene:
    """The labels of one image. `objects[0]` is the main object, the one the judge reads."""

    objects: tuple[SceneObject, ...]
    background: str

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene holds one or two objects, got {len(self.objects)}")
        if self.background not in COLOURS:
            raise ValueError(
                f"unknown background {self.background!r}; expected one of {COLOUR_NAMES}"
            )
        if any(o.colour == self.background for o in self.objects):
            raise ValueError(f"an object has the background colour {self.background!r}")
        object.__setattr__(self, "objects", tuple(self.objects))

    @property
    def main(self) -> SceneObject:
        return self.objects[0]

    def labels(self) -> dict[str, str]:
        """Label names of the main object and the background, keyed by `ATTRIBUTES`."""
        o = self.main
        return {
            "colour": o.colour,
            "shape": o.shape,
            "size": o.size,
            "position": o.position,
            "background": self.background,
        }

    def label_indices(self) -> dict[str, int]:
        return {k: LABELS[k].index(v) for k, v in self.labels().items()}


# -- geometry and rendering ----------------------------------------------------------------------


def _radius(obj: SceneObject) -> float:
    return SIZE_RADIUS[obj.size] * obj.scale


def _polygon(obj: SceneObject) -> np.ndarray:
    """Vertices [K, 2] relative to the object centre; empty for a circle."""
    r = _radius(obj)
    if obj.shape == "square":
        h = 0.88 * r
        pts = np.array([(-h, -h), (h, -h), (h, h), (-h, h)])
    elif obj.shape == "triangle":
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        pts = 1.3 * r * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    elif obj.shape == "star":
        angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.15 * r, 0.45 * 1.15 * r)
        pts = radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    else:
        return np.zeros((0, 2))
    # Centre the bounding box on the anchor so every shape sits on its grid point the same way.
    pts = pts - (pts.min(axis=0) + pts.max(axis=0)) / 2
    a = math.radians(obj.angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return pts @ rot.T


def bounding_radius(obj: SceneObject) -> float:
    """Radius of a circle around the object centre that contains the whole shape."""
    if obj.shape == "circle":
        return _radius(obj)
    return float(np.sqrt((_polygon(obj) ** 2).sum(axis=1)).max())


def _inside(obj: SceneObject, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Boolean [H, W] for sample points px [1, W], py [H, 1] relative to the object centre."""
    if obj.shape == "circle":
        return px**2 + py**2 <= _radius(obj) ** 2
    pts = _polygon(obj)
    inside = np.zeros((py.shape[0], px.shape[1]), dtype=bool)
    for (xi, yi), (xj, yj) in zip(pts, np.roll(pts, -1, axis=0), strict=True):
        if yi == yj:
            continue
        crosses = (yi > py) != (yj > py)
        x_at = xi + (xj - xi) * (py - yi) / (yj - yi)
        inside ^= crosses & (px < x_at)  # even-odd rule, so the star's concave edges work
    return inside


def _coverage(obj: SceneObject) -> tuple[int, int, np.ndarray]:
    """(y0, x0, coverage [h, w] in [0, 1]) of the object over its clipped bounding box."""
    cx, cy = obj.centre
    rb = bounding_radius(obj)
    x0, x1 = max(0, math.floor(cx - rb)), min(IMAGE_SIZE, math.ceil(cx + rb))
    y0, y1 = max(0, math.floor(cy - rb)), min(IMAGE_SIZE, math.ceil(cy + rb))
    h, w = y1 - y0, x1 - x0
    if h <= 0 or w <= 0:
        return y0, x0, np.zeros((0, 0))
    px = x0 + (np.arange(w * SUPERSAMPLE) + 0.5) / SUPERSAMPLE - cx
    py = y0 + (np.arange(h * SUPERSAMPLE) + 0.5) / SUPERSAMPLE - cy
    inside = _inside(obj, px[None, :], py[:, None])
    cov = inside.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))
    return y0, x0, cov


def object_mask(obj: SceneObject) -> np.ndarray:
    """Coverage of one object over the whole canvas, float32 [64, 64] in [0, 1]."""
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    y0, x0, cov = _coverage(obj)
    mask[y0 : y0 + cov.shape[0], x0 : x0 + cov.shape[1]] = cov
    return mask


def render(scene: Scene) -> np.ndarray:
    """Draw a scene: uint8 [64, 64, 3]."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    img[:] = COLOURS[scene.background]
    for obj in scene.objects:
        y0, x0, cov = _coverage(obj)
        region = img[y0 : y0 + cov.shape[0], x0 : x0 + cov.shape[1]]
        alpha = cov[..., None].astype(np.float32)
        region[:] = region * (1 - alpha) + np.asarray(COLOURS[obj.colour], np.float32) * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def objects_overlap(a: SceneObject, b: SceneObject, gap: float = OBJECT_GAP) -> bool:
    """Whether the bounding circles of two objects come closer than `gap` pixels."""
    (ax, ay), (bx, by) = a.centre, b.centre
    return math.hypot(ax - bx, ay - by) < bounding_radius(a) + bounding_radius(b) + gap


# -- sampling ------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, values: Sequence[str]) -> str:
    return values[int(rng.integers(len(values)))]


def make_object(
    rng: np.random.Generator, shape: str, colour: str, size: str, position: str
) -> SceneObject:
    """An object with the given labels and freshly drawn jitter."""
    dx, dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    angle = rng.uniform(-ANGLE_JITTER, ANGLE_JITTER)
    scale = rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER)
    return SceneObject(
        shape,
        colour,
        size,
        position,
        float(dx),
        float(dy),
        0.0 if shape == "circle" else float(angle),
        float(scale),
    )


def _sample_object(
    rng: np.random.Generator,
    exclude_colours: Sequence[str] = (),
    exclude_positions: Sequence[str] = (),
) -> SceneObject:
    colours = [c for c in COLOUR_NAMES if c not in exclude_colours]
    positions = [p for p in POSITION_NAMES if p not in exclude_positions]
    return make_object(
        rng, _pick(rng, SHAPES), _pick(rng, colours), _pick(rng, SIZES), _pick(rng, positions)
    )


def sample_scene(
    rng: np.random.Generator, two_object_prob: float = DEFAULT_TWO_OBJECT_PROB
) -> Scene:
    """A random scene: one object, or with probability `two_object_prob` two that don't touch."""
    objects = [_sample_object(rng)]
    if rng.random() < two_object_prob:
        first = objects[0]
        for _ in range(100):  # a free spot exists for every first object; this finds one fast
            second = _sample_object(rng, [first.colour], [first.position])
            if not objects_overlap(first, second):
                objects.append(second)
                break
    used = {o.colour for o in objects}
    background = _pick(rng, [c for c in COLOUR_NAMES if c not in used])
    return Scene(tuple(objects), background)


# -- captions ------------------------------------------------------------------------------------

# Prepositional phrases ("{where}") and bare names ("{pos}") for each position; synonyms are
# chosen at random. Train and held-out captions share this vocabulary; what is held out is the
# sentence around it.
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left", "in the top left corner", "in the upper left"),
    "top": ("at the top", "at the top of the image"),
    "top right": ("in the top right", "in the top right corner", "in the upper right"),
    "left": ("on the left", "on the left side"),
    "centre": ("in the centre", "in the center", "in the middle"),
    "right": ("on the right", "on the right side"),
    "bottom left": ("in the bottom left", "in the bottom left corner", "in the lower left"),
    "bottom": ("at the bottom", "at the bottom of the image"),
    "bottom right": ("in the bottom right", "in the bottom right corner", "in the lower right"),
}
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "top left": ("top left", "upper left"),
    "top": ("top",),
    "top right": ("top right", "upper right"),
    "left": ("left",),
    "centre": ("centre", "center", "middle"),
    "right": ("right",),
    "bottom left": ("bottom left", "lower left"),
    "bottom": ("bottom",),
    "bottom right": ("bottom right", "lower right"),
}

# Fields: {a_np} "a large red circle", {a_np_ns} "a red circle" (no size), {size}, {colour},
# {shape}, {where} "on the left", {pos} "left", {bg} "white", {a_bg} "a white".
TRAIN_TEMPLATES: tuple[str, ...] = (
    "{a_np} {where} on {a_bg} background",
    "{size} {colour} {shape}, {pos}, {bg} background",
    "a picture of {a_np} {where}, {bg} background",
    "{colour} {shape}, {pos}, {bg} background",
    "{a_np} {where}, {bg} background",
    "an image of {a_np} {where} on {a_bg} background",
    "{a_np_ns} {where} on {a_bg} background",
    "{bg} background with {a_np} {where}",
    "a drawing of {a_np} {where}, the background is {bg}",
    "{pos}: {a_np} on {bg}",
    "{size} {shape} in {colour} {where}, on {bg}",
    "{a_np_ns}, {pos}, on {a_bg} background",
    "a {shape}, {colour}, {size}, {pos}, {bg} background",
    "{a_np} on {a_bg} background, {where}",
    # The colour after the noun: without these, some seeds bind a colour that follows "is" to
    # the background (r119).
    "the {shape} {where} is {size} and {colour}; {bg} background",
    "a {size} {shape} coloured {colour}, {where}, on {bg}",
    "the {shape} is {size}, its colour is {colour}, {pos}, the background {bg}",
)
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "there is {a_np} {where}; the backdrop is {bg}",
    "{pos} placement: one {size} {colour} {shape} against {bg}",
    "you can see {a_np} {where}, set on plain {bg}",
    "{bg} canvas, {size} {colour} {shape} located {where}",
    "{a_bg} scene containing {a_np} {where}",
    "only one object, {a_np} {where}, surrounded by {bg}",
    "the {shape} is {colour} and {size}, it sits {where} over {a_bg} field",
)
# Fields for two objects add {a_np2} and {where2}.
TWO_OBJECT_TEMPLATES: tuple[str, ...] = (
    "{a_np} {where} and {a_np2} {where2} on {a_bg} background",
    "{a_np} {where}, {a_np2} {where2}, {bg} background",
    "{bg} background with {a_np} {where} and {a_np2} {where2}",
    "a picture of {a_np} {where} and {a_np2} {where2}, {bg} background",
    "two shapes: {a_np} {where} and {a_np2} {where2}, on {bg}",
)

_ATTRIBUTE_FIELDS: dict[str, tuple[str, ...]] = {
    "colour": ("{colour}", "{a_np}", "{a_np_ns}"),
    "shape": ("{shape}", "{a_np}", "{a_np_ns}"),
    "size": ("{size}", "{a_np}"),
    "position": ("{where}", "{pos}"),
    "background": ("{bg}", "{a_bg}"),
}


def template_attributes(template: str) -> frozenset[str]:
    """The attributes of the main object a template mentions (size is optional in some)."""
    return frozenset(
        a for a, fields in _ATTRIBUTE_FIELDS.items() if any(f in template for f in fields)
    )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_fields(obj: SceneObject, rng: np.random.Generator, suffix: str = "") -> dict[str, str]:
    np_ = f"{obj.size} {obj.colour} {obj.shape}"
    np_ns = f"{obj.colour} {obj.shape}"
    return {
        f"a_np{suffix}": f"{_article(np_)} {np_}",
        f"a_np_ns{suffix}": f"{_article(np_ns)} {np_ns}",
        f"size{suffix}": obj.size,
        f"colour{suffix}": obj.colour,
        f"shape{suffix}": obj.shape,
        f"where{suffix}": _pick(rng, POSITION_PHRASES[obj.position]),
        f"pos{suffix}": _pick(rng, POSITION_WORDS[obj.position]),
    }


def fill_template(template: str, scene: Scene, rng: np.random.Generator) -> str:
    """Fill one template with the scene's words; `rng` picks position synonyms."""
    fields = _object_fields(scene.main, rng)
    if len(scene.objects) == 2:
        fields.update(_object_fields(scene.objects[1], rng, suffix="2"))
    fields.update(bg=scene.background, a_bg=f"{_article(scene.background)} {scene.background}")
    return template.format(**fields)


def caption(scene: Scene, rng: np.random.Generator, split: str = "train") -> str:
    """A caption for the scene from a random template of `split` ("train" or "heldout")."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if len(scene.objects) == 2:
        if split == "heldout":
            raise ValueError("held-out templates describe single-object scenes only")
        templates = TWO_OBJECT_TEMPLATES
    else:
        templates = TRAIN_TEMPLATES if split == "train" else HELDOUT_TEMPLATES
    return fill_template(_pick(rng, templates), scene, rng)


def _balanced(rng: np.random.Generator, count: int, n: int) -> np.ndarray:
    """n indices into range(count), each used equally often (within one), in random order."""
    blocks = [rng.permutation(count) for _ in range(-(-n // count))]
    return np.concatenate(blocks)[:n] if blocks else np.zeros(0, dtype=int)


def benchmark_prompts(n: int, seed: int) -> list[tuple[str, Scene]]:
    """n single-object (prompt, scene) pairs worded only with held-out templates.

    Object colour / background pairs, shapes, sizes, positions and templates are each spread
    evenly: with n a multiple of 56 every (colour, background) pair appears equally often.
    """
    return [(prompt, scene) for prompt, scene, _ in benchmark_items(n, seed)]


def benchmark_items(n: int, seed: int) -> list[tuple[str, Scene, int]]:
    """`benchmark_prompts` with each prompt's index into `HELDOUT_TEMPLATES`."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xBE9C]))
    pairs = [(c, b) for c in COLOUR_NAMES for b in COLOUR_NAMES if c != b]
    pair_idx = _balanced(rng, len(pairs), n)
    shape_idx = _balanced(rng, len(SHAPES), n)
    size_idx = _balanced(rng, len(SIZES), n)
    pos_idx = _balanced(rng, len(POSITION_NAMES), n)
    template_idx = _balanced(rng, len(HELDOUT_TEMPLATES), n)
    out = []
    for i in range(n):
        colour, background = pairs[pair_idx[i]]
        obj = make_object(
            rng, SHAPES[shape_idx[i]], colour, SIZES[size_idx[i]], POSITION_NAMES[pos_idx[i]]
        )
        scene = Scene((obj,), background)
        t = int(template_idx[i])
        out.append((fill_template(HELDOUT_TEMPLATES[t], scene, rng), scene, t))
    return out


# -- streams and batches -------------------------------------------------------------------------


def images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images -> float32 [B, 3, H, W] in [-1, 1]."""
    arr = np.stack(images).astype(np.float32)  # [B, H, W, 3]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0


def label_tensors(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Main-object label indices, one int64 tensor [B] per attribute."""
    indices = [s.label_indices() for s in scenes]
    return {a: torch.tensor([d[a] for d in indices], dtype=torch.long) for a in ATTRIBUTES}


@dataclass
class WorldBatch:
    images: torch.Tensor  # [B, 3, 64, 64] in [-1, 1]
    captions: list[str]
    labels: dict[str, torch.Tensor]  # attribute -> [B] int64, main object
    scenes: list[Scene]


class SceneStream:
    """An endless, seeded stream of (image uint8 [64, 64, 3], caption, scene).

    The same seed and settings give the same sequence. Held-out captions need
    `two_object_prob=0`, since the held-out templates describe single objects.
    """

    def __init__(
        self, seed: int, two_object_prob: float = DEFAULT_TWO_OBJECT_PROB, split: str = "train"
    ):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if not 0.0 <= two_object_prob <= 1.0:
            raise ValueError(f"two_object_prob must be in [0, 1], got {two_object_prob}")
        if split == "heldout" and two_object_prob > 0:
            raise ValueError("held-out captions describe single objects; use two_object_prob=0")
        self.seed = seed
        self.two_object_prob = two_object_prob
        self.split = split
        self._rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5CE7E]))

    def __iter__(self) -> Iterator[tuple[np.ndarray, str, Scene]]:
        return self

    def __next__(self) -> tuple[np.ndarray, str, Scene]:
        scene = sample_scene(self._rng, self.two_object_prob)
        text = caption(scene, self._rng, self.split)
        return render(scene), text, scene

    def batch(self, batch_size: int) -> WorldBatch:
        items = [next(self) for _ in range(batch_size)]
        scenes = [s for _, _, s in items]
        return WorldBatch(
            images=images_to_tensor([img for img, _, _ in items]),
            captions=[c for _, c, _ in items],
            labels=label_tensors(scenes),
            scenes=scenes,
        )
