"""Benchmark: one optimiser step of the demo recipe, fused AdamW against the per-tensor loop.

    venv/bin/python bench/bench_optimizer.py [--repeats 20] [--threads 1 2]

For each network the recipe trains (the autoencoder, the UNet and the text encoder of
`ldm_core.training`), `ldm_core.training.optim.adamw` (what every stage uses: fused where torch
has the kernel) and `torch.optim.AdamW` with its per-tensor loop (`foreach=False`, what the
stages used before) take steps on two copies of the same parameters with the same gradients,
interleaved so that both see the same machine load. After the timed steps the two copies must
still agree (the same update), else the timing compares different work. Prints the median step
of each and the ratio loop/fused per network and thread count.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    from ldm_core.training import autoencoder as ae_mod
    from ldm_core.training.ldm import build_models
    from ldm_core.training.optim import adamw

    torch.manual_seed(0)
    models = build_models()
    networks = {
        "autoencoder": ae_mod.AutoencoderKL(ae_mod.DEMO_VAE_CONFIG),
        "unet": models.unet,
        "text encoder": models.text_encoder,
    }
    results = {}
    threads_before = torch.get_num_threads()
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name, net in networks.items():
                twin = copy.deepcopy(net)
                ours, theirs = list(net.parameters()), list(twin.parameters())
                for a, b in zip(ours, theirs, strict=True):
                    a.grad = torch.randn_like(a)
                    b.grad = a.grad.clone()
                opts = {
                    "fused": adamw(ours, lr=1e-4, weight_decay=0.01),
                    "loop": torch.optim.AdamW(
                        theirs, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01, foreach=False
                    ),
                }
                times: dict[str, list[float]] = {k: [] for k in opts}
                for i in range(args.repeats + 3):
                    for key, opt in opts.items():
                        start = time.perf_counter()
                        opt.step()
                        if i >= 3:  # warm-up
                            times[key].append(time.perf_counter() - start)
                diff = max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))
                if diff > 1e-5:
                    raise SystemExit(f"{name}: the two optimisers disagree by {diff:.1e}")
                fused, loop = (statistics.median(times[k]) for k in ("fused", "loop"))
                results[(name, threads)] = {"fused": fused, "loop": loop, "ratio": loop / fused}
                print(
                    f"{name:13s} {len(ours):4d} tensors, {threads} thread(s): loop "
                    f"{loop * 1000:6.1f} ms  fused {fused * 1000:6.1f} ms  "
                    f"ratio loop/fused {loop / fused:.2f}"
                )
    finally:
        torch.set_num_threads(threads_before)
    return results


if __name__ == "__main__":
    main()
