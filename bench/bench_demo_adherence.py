"""Benchmark: prompt adherence of the demo model, scored by the world's judge.

    venv/bin/python bench/bench_demo_adherence.py \\
        [--model models/Stable-diffusion/demo-shapes.safetensors] [--prompts 224] [--engine pipeline] \\
        [--grid docs/demo-samples.png]

Prompts come from `world.benchmark_prompts` (held-out caption templates, never used in
training), one image each: 20 steps, DPM++ 2M, CFG 5, 64x64, empty negative prompt. The judge
reads colour, shape, size, position and background of the main object; the script prints the
accuracy of each against the bars of issue 5, the misreadings (asked -> drawn, and how many of
them by the main object's size) and times one 20-step 64x64 txt2img.

`--engine pipeline` generates through `ldm_core.pipeline.txt2img` one prompt at a time (what the
app does); `--engine local` uses the batched sampling loop of `ldm_core.training.ldm` (faster,
same sampler and guidance), which is also what training's periodic evaluation uses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ldm_core.loader import load_checkpoint  # noqa: E402
from ldm_core.training import world  # noqa: E402

BARS = {"colour": 0.95, "shape": 0.90, "position": 0.85, "background": 0.95}


def _pipeline_images(ckpt, prompts: list[str], args) -> torch.Tensor:
    from ldm_core.pipeline import GenerationParams, pil_to_tensor, txt2img

    out = []
    for i, prompt in enumerate(prompts):
        params = GenerationParams(
            prompt=prompt,
            negative_prompt="",
            steps=args.steps,
            sampler_name=args.sampler,
            cfg_scale=args.cfg,
            seed=args.seed + i,
            width=64,
            height=64,
        )
        out.append(pil_to_tensor(txt2img(ckpt, params).images[0]).reshape(1, 3, 64, 64))
    return torch.cat(out)


def _local_images(ckpt, prompts: list[str], args) -> torch.Tensor:
    from ldm_core.training.ldm import generate_latents

    out = []
    for i in range(0, len(prompts), 56):
        lat = generate_latents(
            ckpt.unet,
            ckpt.text_encoders[0],
            prompts[i : i + 56],
            steps=args.steps,
            guidance_scale=args.cfg,
            sampler=args.sampler,
            seed=args.seed + i,
            prediction=ckpt.prediction.value,
            zero_terminal_snr=ckpt.spec.zero_terminal_snr,
        )
        out.append(ckpt.vae.decode(lat / ckpt.scale_factor).clamp(-1, 1))
    return torch.cat(out)


def save_grid(images: torch.Tensor, prompts: list[str], path: str, cols: int = 6) -> None:
    """The first images (in [-1, 1]) at 2x, each above its prompt, as one PNG."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    cell_w, img, text_h = 168, 128, 64
    n = len(images)
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell_w, rows * (img + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i in range(n):
        x, y = (i % cols) * cell_w, (i // cols) * (img + text_h)
        arr = ((images[i].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        tile = Image.fromarray(arr).resize((img, img), Image.Resampling.NEAREST)
        grid.paste(tile, (x + (cell_w - img) // 2, y + 2))
        lines = textwrap.wrap(prompts[i], 27)[:4]
        draw.multiline_text((x + 4, y + img + 4), "\n".join(lines), fill="black", font=font)
    grid.save(path)


def time_one_txt2img(ckpt, args, runs: int = 3) -> float:
    from ldm_core.pipeline import GenerationParams, txt2img

    params = GenerationParams(
        prompt="a large red circle on the left on a white background",
        steps=20,
        sampler_name="DPM++ 2M",
        cfg_scale=args.cfg,
        seed=1,
        width=64,
        height=64,
    )
    txt2img(ckpt, params)  # warm-up
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        txt2img(ckpt, params)
        best = min(best, time.perf_counter() - t0)
    return best


def confusions(
    preds: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]
) -> dict[str, list[tuple[str, str, int]]]:
    """The judge's misreadings per attribute: (asked, drawn, count), most frequent first."""
    out = {}
    for a in world.ATTRIBUTES:
        names = world.LABELS[a]
        wrong = Counter(
            (names[int(t)], names[int(p)])
            for t, p in zip(labels[a], preds[a], strict=True)
            if int(t) != int(p)
        )
        if wrong:
            out[a] = [(asked, drawn, n) for (asked, drawn), n in wrong.most_common()]
    return out


def errors_by_size(
    preds: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]
) -> dict[str, dict[str, int]]:
    """Misreadings per attribute split by the main object's size: {attribute: {size: count}},
    every size listed, attributes without errors left out."""
    sizes = world.LABELS["size"]
    out = {}
    for a in world.ATTRIBUTES:
        wrong = preds[a] != labels[a]
        if bool(wrong.any()):
            out[a] = {s: int((wrong & (labels["size"] == i)).sum()) for i, s in enumerate(sizes)}
    return out


def errors_by_template(
    preds: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], templates: list[int]
) -> list[dict]:
    """Per held-out template, in `world.HELDOUT_TEMPLATES` order: its prompts, how many have any
    attribute wrong, and the misreadings per attribute (attributes without errors left out)."""
    index = torch.tensor(templates)
    wrong = {a: preds[a] != labels[a] for a in world.ATTRIBUTES}
    any_wrong = torch.stack(list(wrong.values())).any(dim=0)
    out = []
    for t, template in enumerate(world.HELDOUT_TEMPLATES):
        mine = index == t
        counts = {a: int((w & mine).sum()) for a, w in wrong.items()}
        out.append(
            {
                "template": template,
                "prompts": int(mine.sum()),
                "wrong": int((any_wrong & mine).sum()),
                "errors": {a: n for a, n in counts.items() if n},
            }
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models/Stable-diffusion/demo-shapes.safetensors"))
    p.add_argument("--prompts", type=int, default=224)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="DPM++ 2M")
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--prompt-seed", type=int, default=5)
    p.add_argument("--engine", choices=("pipeline", "local"), default="pipeline")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--grid", help="save the first --grid-size images with their prompts here")
    p.add_argument("--grid-size", type=int, default=24)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from ldm_core.training.autoencoder import judge_classifier

    judge = judge_classifier()
    ckpt = load_checkpoint(args.model, device="cpu", dtype=torch.float32)
    items = world.benchmark_items(args.prompts, args.prompt_seed)
    prompts = [prompt for prompt, _, _ in items]
    labels = world.label_tensors([scene for _, scene, _ in items])

    t0 = time.perf_counter()
    with torch.no_grad():
        make = _pipeline_images if args.engine == "pipeline" else _local_images
        images = make(ckpt, prompts, args)
        preds = judge(images)
    seconds = time.perf_counter() - t0
    acc = {a: float((preds[a] == labels[a]).float().mean()) for a in world.ATTRIBUTES}
    all_right = torch.stack([preds[a] == labels[a] for a in world.ATTRIBUTES]).all(dim=0)

    print(f"model {args.model}")
    print(
        f"{len(prompts)} held-out prompts, {args.steps} steps {args.sampler}, CFG {args.cfg}, "
        f"engine {args.engine}: {seconds:.1f} s"
    )
    for a in world.ATTRIBUTES:
        bar = BARS.get(a)
        verdict = (
            "" if bar is None else ("  PASS" if acc[a] >= bar else "  FAIL") + f" (bar {bar:.0%})"
        )
        print(f"  {a:<10} {acc[a]:7.1%}{verdict}")
    print(f"  all five   {float(all_right.float().mean()):7.1%}")
    errors = confusions(preds, labels)
    for a, pairs_ in errors.items():
        shown = ", ".join(f"{asked}->{drawn} x{n}" for asked, drawn, n in pairs_[:5])
        print(f"  {a} errors (asked->drawn): {shown}")
    by_size = errors_by_size(preds, labels)
    for a, counts in by_size.items():
        shown = ", ".join(f"{size} {n}" for size, n in counts.items())
        print(f"  {a} errors by the object's size: {shown}")
    by_template = errors_by_template(preds, labels, [t for _, _, t in items])
    for row in by_template:
        shown = ", ".join(f"{a} {n}" for a, n in row["errors"].items())
        print(
            f"  template {row['wrong']:>2}/{row['prompts']} wrong"
            + (f" ({shown})" if shown else "")
            + f": {row['template']}"
        )
    result = {
        "accuracy": acc,
        "all_attributes": float(all_right.float().mean()),
        "prompts": len(prompts),
        "errors": {a: [list(e) for e in pairs_] for a, pairs_ in errors.items()},
        "errors_by_size": by_size,
        "errors_by_template": by_template,
    }
    if not args.no_timing:
        t = time_one_txt2img(ckpt, args)
        result["txt2img_20_steps_seconds"] = t
        print(f"one 20-step 64x64 txt2img (pipeline, best of 3): {t:.3f} s (goal <= 1 s)")
    if args.grid:
        save_grid(images[: args.grid_size], prompts[: args.grid_size], args.grid)
        print(f"grid of the first {min(args.grid_size, len(prompts))} images: {args.grid}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
