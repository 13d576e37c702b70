"""Diagnostic: how far apart a demo file's scaled latents put neighbouring colours.

    venv/bin/python bench/latent_colours.py FILE [FILE ...]

For each pair of colours the demo model confuses most (orange and yellow, orange and red, ...;
`ldm_core.training.autoencoder.latent_colour_distances`, which the recipe logs after its gate),
renders 24 scenes (`--scenes`) twice, identical but for the main object's colour (four shapes, nine
positions, three backgrounds other than the pair), encodes both with the file's autoencoder
(posterior mean times the file's scale factor, the latents its UNet was trained on) and prints
the mean L2 distance between the two, for small and for large objects. The latents have about
unit spread per element, so a smaller distance means the UNet has to place a sample more
precisely to draw the right hue (see docs/demo-model.md, "The autoencoder's plateau").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCENES = 24


def colour_distances(path: str, scenes: int = SCENES) -> tuple[float, dict[str, dict[str, float]]]:
    """(scale factor, {size: {"a-b": mean scaled-latent distance over `scenes`}}) of one file."""
    from ldm_core.loader import load_checkpoint
    from ldm_core.training.autoencoder import latent_colour_distances

    ckpt = load_checkpoint(path, device="cpu", dtype=torch.float32)
    return ckpt.scale_factor, latent_colour_distances(ckpt.vae.eval(), ckpt.scale_factor, scenes)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--scenes", type=int, default=SCENES, help="scenes a colour pair")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {}
    try:
        for path in args.files:
            scale, rows = colour_distances(path, args.scenes)
            results[path] = {"scale_factor": scale, **rows}
            print(f"{path} (scale factor {scale:.3f})")
            for size, row in rows.items():
                print(f"  {size:6s} " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    finally:
        torch.set_num_threads(threads)
    return results


if __name__ == "__main__":
    main()
