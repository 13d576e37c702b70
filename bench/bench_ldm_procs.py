"""Benchmark: joint-stage steps a second, one two-thread process against data parallelism.

    venv/bin/python bench/bench_ldm_procs.py [--minutes 2] [--procs 2] [--rounds 1]
        [--parallel-batch 64]

Trains the demo model's UNet (text encoder frozen, as in the 90-minute schedule; batch 64,
lr 1.6e-3) for `--minutes` with `train_ldm` in this process on 2 threads, then for as long
with `train_ldm_parallel` over `--procs` single-thread processes, on 20,000 random latents
with world captions, and prints the steps and samples a second of each. `--rounds` > 1
alternates the two again so both see the same machine. `--parallel-batch` sets the parallel
run's global batch (split over the processes); the ratio is in samples a second, so a larger
global batch can be compared. Steps are counted by the training loop's own clock (its
checkpoint), so process start-up is not charged to either.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rate(workdir: Path) -> float:
    state = torch.load(workdir / "ldm_state.pt", map_location="cpu", weights_only=True)
    return state["step"] / state["elapsed"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--parallel-batch", type=int, default=64)
    args = p.parse_args(argv)
    if args.procs < 1 or args.parallel_batch % args.procs:
        p.error("--procs must be >= 1 and divide --parallel-batch")

    from ldm_core.training import ldm as ldm_mod
    from ldm_core.training import world

    rng = np.random.default_rng(0)
    n = 20_000
    data = ldm_mod.LatentDataset(
        torch.randn(n, 4, 8, 8), [world.sample_scene(rng) for _ in range(n)], 1.0
    )
    torch.manual_seed(1)
    init = {"text_encoder": ldm_mod.build_models().text_encoder.state_dict()}
    cfg = ldm_mod.LDMTrainConfig(
        minutes=args.minutes, batch_size=64, lr=1.6e-3, text_lr_scale=0, threads=2
    )
    single, parallel = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as d:
            torch.set_num_threads(2)
            ldm_mod.train_ldm(Path(d), data, cfg, resume=False, init=init)
            single.append(_rate(Path(d)))
        with tempfile.TemporaryDirectory() as d:
            par = replace(cfg, procs=args.procs, batch_size=args.parallel_batch)
            ldm_mod.train_ldm_parallel(Path(d), data, par, Path(d) / "final.pt", init=init)
            parallel.append(_rate(Path(d)))
    one, many = float(np.mean(single)), float(np.mean(parallel))
    b1, b = cfg.batch_size, args.parallel_batch
    print(f"one process, 2 threads: {one:.3f} steps/s, {one * b1:.0f} samples/s (batch {b1})")
    print(f"{args.procs} processes: {many:.3f} steps/s, {many * b:.0f} samples/s (batch {b})")
    ratio = many * b / (one * b1)
    print(f"ratio in samples a second: {ratio:.2f}x")
    return {"single": single, "parallel": parallel, "ratio": ratio}


if __name__ == "__main__":
    main()
