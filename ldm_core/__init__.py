"""In-process latent diffusion core: networks, loading, sampling. Imports no UI code."""

from __future__ import annotations

from ldm_core.loader import Checkpoint, load_checkpoint

__all__ = ["Checkpoint", "load_checkpoint"]
