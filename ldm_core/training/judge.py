"""A small CNN that reads the labels of the main object back from a world image.

It scores generated images: given the scene a prompt described, `score` says how often the
model drew the asked-for colour, shape, size, position and background. It is trained on fresh
single-object renders with mild blur, noise and colour drift so that it also reads the slightly
soft images a diffusion model produces.

Train the shipped judge (about three and a half minutes on one busy CPU core):

    /work/venv/bin/python -m ldm_core.training.judge --out ldm_core/training/assets/judge.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm_core.training.world import ATTRIBUTES, IMAGE_SIZE, LABELS, Scene, SceneStream
from ldm_core.weights import (
    CheckpointError,
    WeightFile,
    check_keys,
    module_shapes,
    save_safetensors,
)

log = logging.getLogger(__name__)

JUDGE_FORMAT = "ldm_core.training.judge/1"
DEFAULT_JUDGE_PATH = Path(__file__).parent / "assets" / "judge.safetensors"


@dataclass(frozen=True)
class JudgeConfig:
    widths: tuple[int, ...] = (24, 32, 48, 64)  # each conv halves the side: 64 -> 4
    hidden: int = 128
    groups: int = 8


class Judge(nn.Module):
    """Conv stack -> flattened 4x4 map (keeps where things are) -> one linear head per attribute."""

    def __init__(self, config: JudgeConfig = JudgeConfig()):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        channels = 3
        for width in config.widths:
            layers += [
                nn.Conv2d(channels, width, 3, stride=2, padding=1),
                nn.GroupNorm(config.groups, width),
                nn.SiLU(),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        side = IMAGE_SIZE // 2 ** len(config.widths)
        self.hidden = nn.Linear(channels * side * side, config.hidden)
        self.heads = nn.ModuleDict(
            {a: nn.Linear(config.hidden, len(LABELS[a])) for a in ATTRIBUTES}
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images [B, 3, 64, 64] in [-1, 1] -> logits per attribute, each [B, num_labels]."""
        h = self.features(images).flatten(1)
        h = F.silu(self.hidden(h))
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> list[dict[str, str]]:
        """Label names of the main object and background for each image [B, 3, 64, 64] in [-1, 1]."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"expected images [B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}], got {list(images.shape)}"
            )
        was_training = self.training
        self.eval()
        try:
            param = next(self.parameters())
            out: list[dict[str, str]] = []
            for chunk in images.split(batch_size):
                logits = self(chunk.to(param.device, param.dtype))
                idx = {a: logits[a].argmax(dim=1).tolist() for a in ATTRIBUTES}
                out += [
                    {a: LABELS[a][idx[a][i]] for a in ATTRIBUTES} for i in range(chunk.shape[0])
                ]
            return out
        finally:
            self.train(was_training)


def score(
    predictions: Sequence[dict[str, str]],
    scenes: Sequence[Scene],
    attributes: Sequence[str] = ATTRIBUTES,
) -> dict[str, float]:
    """Fraction of images whose predicted label matches the scene's main object, per attribute."""
    if len(predictions) != len(scenes):
        raise ValueError(f"{len(predictions)} predictions for {len(scenes)} scenes")
    if not scenes:
        raise ValueError("nothing to score")
    truth = [s.labels() for s in scenes]
    return {
        a: sum(p[a] == t[a] for p, t in zip(predictions, truth, strict=True)) / len(scenes)
        for a in attributes
    }


# -- augmentation ------------------------------------------------------------------------------


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image [B, C, H, W] with its own sigma [B] (pixels); sigma 0 leaves it as is."""
    b, c, h, w = images.shape
    radius = 3
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    s = sigma.clamp_min(1e-3)[:, None]
    k = torch.exp(-(x[None, :] ** 2) / (2 * s**2))
    k = k / k.sum(dim=1, keepdim=True)  # [B, 2r+1]
    k = k.repeat_interleave(c, dim=0)  # [B*C, 2r+1]
    flat = F.pad(images.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    flat = F.conv2d(flat, k[:, None, None, :], groups=b * c)
    flat = F.conv2d(flat, k[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild blur, colour drift and noise on images [B, 3, H, W] in [-1, 1]."""
    b = images.shape[0]

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    x = images.clone()
    blurred = torch.nonzero(u(b) < 0.5).flatten()
    x[blurred] = _gaussian_blur(images[blurred], 0.3 + 0.9 * u(len(blurred)))
    gain = 1 + 0.06 * (2 * u(b, 3, 1, 1) - 1)
    offset = 0.08 * (2 * u(b, 3, 1, 1) - 1)
    x = x * gain + offset
    noise_std = torch.where(u(b) < 0.5, 0.06 * u(b), torch.zeros(b))
    x = x + noise_std[:, None, None, None] * torch.randn(x.shape, generator=generator)
    return x.clamp(-1, 1)


# -- training, evaluation, files ----------------------------------------------------------------


def evaluate(
    judge: Judge, num_samples: int, seed: int, *, augmented: bool = False
) -> dict[str, float]:
    """Per-attribute accuracy on `num_samples` fresh single-object renders from `seed`."""
    batch = SceneStream(seed, two_object_prob=0.0).batch(num_samples)
    images = batch.images
    if augmented:
        images = augment(images, torch.Generator().manual_seed(seed))
    return score(judge.predict(images), batch.scenes)


def train_judge(
    steps: int = 1500,
    seed: int = 0,
    out_path: str | os.PathLike | None = None,
    *,
    batch_size: int = 64,
    lr: float = 2e-3,
    config: JudgeConfig = JudgeConfig(),
    eval_samples: int = 0,
    eval_seed: int = 1_000_003,
) -> Judge:
    """Train a judge on fresh renders and optionally save it (with its eval accuracy) to `out_path`.

    Uses torch's current thread count (the CLI sets one).
    """
    torch.manual_seed(seed)
    judge = Judge(config)
    stream = SceneStream(seed, two_object_prob=0.0)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    start = time.monotonic()
    judge.train()
    for step in range(steps):
        batch = stream.batch(batch_size)
        logits = judge(augment(batch.images, generator))
        loss = sum(F.cross_entropy(logits[a], batch.labels[a]) for a in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.info(
                "step %d/%d loss %.4f (%.0fs)",
                step + 1,
                steps,
                loss.item(),
                time.monotonic() - start,
            )
    judge.eval()
    train_seconds = time.monotonic() - start
    metadata = {
        "train_steps": steps,
        "train_seed": seed,
        "batch_size": batch_size,
        "train_seconds": round(train_seconds, 1),
    }
    if eval_samples:
        clean = evaluate(judge, eval_samples, eval_seed)
        noisy = evaluate(judge, eval_samples, eval_seed, augmented=True)
        log.info("accuracy on %d fresh renders: %s", eval_samples, clean)
        log.info("accuracy on the same, augmented: %s", noisy)
        metadata.update(
            eval_samples=eval_samples, eval_seed=eval_seed, accuracy=clean, accuracy_augmented=noisy
        )
    if out_path is not None:
        save_judge(judge, out_path, metadata)
    return judge


def save_judge(judge: Judge, path: str | os.PathLike, info: dict | None = None) -> None:
    """Write the judge as safetensors; `__metadata__` holds its config, labels and `info`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": JUDGE_FORMAT,
        "description": "CNN judge for the ldm_core synthetic world: reads colour, shape, size, "
        "position of the main object and the background colour from a 64x64 image in [-1, 1]",
        "config": json.dumps(asdict(judge.config)),
        "labels": json.dumps({a: list(LABELS[a]) for a in ATTRIBUTES}),
        "info": json.dumps(info or {}),
    }
    save_safetensors(judge.state_dict(), path, metadata)


def load_judge(path: str | os.PathLike = DEFAULT_JUDGE_PATH) -> Judge:
    """Load a judge saved by `save_judge`, in eval mode."""
    with WeightFile(path) as f:
        meta = f.metadata
        if meta.get("format") != JUDGE_FORMAT:
            raise CheckpointError(
                path, f"not a judge file (format {meta.get('format')!r}, expected {JUDGE_FORMAT!r})"
            )
        labels = json.loads(meta["labels"])
        expected = {a: list(LABELS[a]) for a in ATTRIBUTES}
        if labels != expected:
            raise CheckpointError(path, f"judge labels {labels} differ from the world's {expected}")
        raw = json.loads(meta["config"])
        config = JudgeConfig(**{**raw, "widths": tuple(raw["widths"])})
        judge = Judge(config)
        check_keys(module_shapes(judge), f.shapes, source=path, what="judge")
        judge.load_state_dict(f.load(dtype=torch.float32), strict=True)
    return judge.eval()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the world judge CNN.")
    parser.add_argument("--out", type=Path, default=DEFAULT_JUDGE_PATH)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="at most 2; one is faster on a busy machine"
    )
    parser.add_argument("--eval-samples", type=int, default=2000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    train_judge(args.steps, args.seed, args.out, eval_samples=args.eval_samples)


if __name__ == "__main__":
    main()
