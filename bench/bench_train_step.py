"""Benchmark: one training step (forward + backward) of the demo model's UNet, ours vs diffusers.

    venv/bin/python bench/bench_train_step.py [--batch 64] [--repeats 15] [--threads 2]

The UNet of `ldm_core.training.ldm.build_models` (the shipped demo model's configuration) and a
diffusers `UNet2DConditionModel` holding the same tensors (converted by diffusers' own
single-file code, as in tests/test_unet.py) run the forward and the backward of an MSE loss
on the same batch of 8x8x4 latents and 77-token contexts, interleaved so that both see the same
machine load. Prints the median and fastest step of each and the ratio ours/diffusers, after checking
that both compute the same output.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ldm_core.training.ldm import build_models
    from tests.test_unet import diffusers_twin

    torch.manual_seed(0)
    ours = build_models().unet.train()
    twin = diffusers_twin(ours).train()
    b = args.batch
    x = torch.randn(b, 4, 8, 8)
    t = torch.randint(0, 1000, (b,))
    context = torch.randn(b, 77, ours.config.context_dim)
    target = torch.randn(b, 4, 8, 8)
    with torch.no_grad():
        err = (ours(x, t, context) - twin(x, t, context).sample).abs().max().item()
    print(f"max |ours - diffusers| on the batch: {err:.2e}")
    if err > 1e-4:
        raise SystemExit("the two UNets disagree: the timing would compare different networks")

    steps = {
        "ours": lambda: ours(x, t, context),
        "diffusers": lambda: twin(x, t, context).sample,
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.repeats + 3):
        for name, forward in steps.items():
            ours.zero_grad(set_to_none=True)
            twin.zero_grad(set_to_none=True)
            start = time.perf_counter()
            torch.nn.functional.mse_loss(forward(), target).backward()
            if i >= 3:  # warm-up
                times[name].append(time.perf_counter() - start)
    result = {name: (statistics.median(v), min(v)) for name, v in times.items()}
    for name, (med, best) in result.items():
        print(f"{name:10s} median {med * 1000:7.1f} ms  fastest {best * 1000:7.1f} ms  (batch {b})")
    ratio = result["ours"][0] / result["diffusers"][0]
    print(f"ratio ours/diffusers (medians): {ratio:.2f}")
    return {"ratio": ratio, **{k: v[0] for k, v in result.items()}}


if __name__ == "__main__":
    main()
