"""Benchmark: load a 2 GB fp16 SD1.5-size single file into a ready fp32 model.

    venv/bin/python bench/bench_load.py [--file /tmp/sd15-fp16.safetensors] [--runs 3]

Writes the random-weight file once (original key layout, fp16), then loads it in fresh
subprocesses (page cache warm after the first write, as after any earlier start) and reports
wall time of `ldm_core.load_checkpoint` and the child's peak RSS against the fp32 model size.
For reference it also times diffusers' `from_single_file`-free path: safetensors.torch.load_file
of the same file followed by a cast to fp32 (the naive approach).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, resource, sys, time
import torch
sys.path.insert(0, {root!r})
mode = {mode!r}
import ldm_core  # imports are not part of loading
from safetensors.torch import load_file
t0 = time.perf_counter()
if mode == "ours":
    ckpt = ldm_core.load_checkpoint({path!r}, device="cpu", dtype=torch.float32)
    n = sum(p.numel() for m in (ckpt.unet, ckpt.vae, *ckpt.text_encoders) for p in m.parameters())
else:
    sd = load_file({path!r})
    sd = {{k: v.float() for k, v in sd.items()}}
    n = sum(v.numel() for v in sd.values())
dt = time.perf_counter() - t0
print(json.dumps({{"seconds": dt, "params": n, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def write_file(path: Path) -> None:
    import torch

    from ldm_core import detect
    from ldm_core.config import CLIP_L, SD1_UNET, SD_VAE
    from ldm_core.nn.autoencoder import AutoencoderKL
    from ldm_core.nn.text_encoders import TextEncoder
    from ldm_core.nn.unet import UNetModel
    from ldm_core.weights import save_safetensors

    with torch.device("meta"):
        parts = [
            (detect.UNET_PREFIX, UNetModel(SD1_UNET).state_dict()),
            (detect.VAE_PREFIX, AutoencoderKL(SD_VAE).state_dict()),
            (CLIP_L.prefix, TextEncoder(CLIP_L).to_original_state_dict()),
        ]
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for prefix, sd in parts:
        for k, v in sd.items():
            tensors[prefix + k] = (torch.randn(v.shape, generator=g) * 0.02).half()
    save_safetensors(tensors, path, {"bench": "random SD1.5-size fp16"})


def run(mode: str, path: Path) -> dict:
    code = CHILD.format(root=str(ROOT), mode=mode, path=str(path))
    out = subprocess.check_output([sys.executable, "-c", code], text=True)
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", type=Path, default=Path("/tmp/sd15-fp16.safetensors"))
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if not args.file.exists():
        write_file(args.file)
    size = args.file.stat().st_size
    print(f"file: {args.file} ({size / 1e9:.2f} GB)")
    for mode in ("ours", "naive"):
        results = [run(mode, args.file) for _ in range(args.runs)]
        best = min(r["seconds"] for r in results)
        rss = max(r["peak_rss"] for r in results)
        fp32 = results[0]["params"] * 4
        print(
            f"{mode:6s} load: best {best:.2f}s of {args.runs}  peak RSS {rss / 1e9:.2f} GB"
            f" = {rss / fp32:.2f}x the fp32 model ({fp32 / 1e9:.2f} GB)"
        )


if __name__ == "__main__":
    main()
