"""Training checkpoints written so that a kill mid-write never leaves a torn file."""

from __future__ import annotations

from pathlib import Path

import torch


def save_atomic(path: Path, payload: dict) -> None:
    """torch.save to a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
