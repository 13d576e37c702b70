"""The adherence benchmark's error report: which values the judge read instead of the prompt's."""

import importlib.util
from pathlib import Path

import torch

from ldm_core.training import world

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_demo_adherence", ROOT / "bench" / "bench_demo_adherence.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_confusions_count_asked_and_drawn_per_attribute_most_frequent_first():
    names = world.LABELS["colour"]
    purple, blue, yellow, white = (names.index(c) for c in ("purple", "blue", "yellow", "white"))
    labels = {a: torch.zeros(6, dtype=torch.long) for a in world.ATTRIBUTES}
    preds = {a: torch.zeros(6, dtype=torch.long) for a in world.ATTRIBUTES}
    labels["colour"] = torch.tensor([purple, purple, yellow, purple, blue, blue])
    preds["colour"] = torch.tensor([blue, blue, white, purple, blue, blue])
    labels["shape"][0] = 1  # one square read as a circle

    errors = _bench().confusions(preds, labels)

    assert errors == {
        "colour": [("purple", "blue", 2), ("yellow", "white", 1)],
        "shape": [("square", "circle", 1)],
    }


def test_errors_by_size_split_each_attributes_misreadings_by_the_main_objects_size():
    names, sizes = world.LABELS["colour"], world.LABELS["size"]
    small, large = sizes.index("small"), sizes.index("large")
    yellow, orange = names.index("yellow"), names.index("orange")
    labels = {a: torch.zeros(5, dtype=torch.long) for a in world.ATTRIBUTES}
    preds = {a: torch.zeros(5, dtype=torch.long) for a in world.ATTRIBUTES}
    labels["size"] = torch.tensor([small, small, large, small, large])
    preds["size"] = labels["size"].clone()
    labels["colour"] = torch.full((5,), yellow)
    preds["colour"] = torch.tensor([orange, orange, orange, yellow, yellow])
    preds["shape"][4] = 1  # one large object drawn in the wrong shape
    preds["size"][0] = large  # and one small object drawn large: counted under its asked size

    assert _bench().errors_by_size(preds, labels) == {
        "colour": {"small": 2, "large": 1},
        "shape": {"small": 0, "large": 1},
        "size": {"small": 1, "large": 0},
    }
