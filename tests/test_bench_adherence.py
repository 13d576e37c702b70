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


def test_errors_by_template_count_each_held_out_wordings_misreadings():
    labels = {a: torch.zeros(5, dtype=torch.long) for a in world.ATTRIBUTES}
    preds = {a: torch.zeros(5, dtype=torch.long) for a in world.ATTRIBUTES}
    templates = [6, 6, 6, 0, 0]
    preds["colour"][:2] = 4  # two prompts of template 6 with the colours swapped
    preds["background"][:2] = 1
    preds["shape"][3] = 2  # and one shape error on template 0

    rows = _bench().errors_by_template(preds, labels, templates)

    assert [r["template"] for r in rows] == list(world.HELDOUT_TEMPLATES)
    assert rows[6] == {
        "template": world.HELDOUT_TEMPLATES[6],
        "prompts": 3,
        "wrong": 2,
        "errors": {"colour": 2, "background": 2},
    }
    assert rows[0]["prompts"] == 2 and rows[0]["wrong"] == 1 and rows[0]["errors"] == {"shape": 1}
    assert all(r["prompts"] == 0 and r["wrong"] == 0 for r in rows[1:6])


def test_benchmark_items_name_the_held_out_template_each_prompt_was_worded_with():
    items = world.benchmark_items(56, 5)
    assert [(p, s) for p, s, _ in items] == world.benchmark_prompts(56, 5)
    counts = [sum(t == i for _, _, t in items) for i in range(len(world.HELDOUT_TEMPLATES))]
    assert counts == [8] * 7
    for prompt, _, t in items:  # the template's fixed words are in its prompts
        words = [w for w in world.HELDOUT_TEMPLATES[t].split() if "{" not in w]
        assert all(w.strip(",;:") in prompt for w in words), (prompt, t)
