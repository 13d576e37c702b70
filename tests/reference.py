"""Reference implementations loaded for parity tests only (never imported at runtime)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest


def load_k_diffusion(module: str):
    """Import k_diffusion/<module>.py without k_diffusion/__init__ (which pulls torchvision)."""
    pytest.importorskip("scipy")
    pytest.importorskip("torchsde")
    pytest.importorskip("torchdiffeq")
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed")
    name = "_kdiffusion_ref"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = list(spec.submodule_search_locations)
        utils = types.ModuleType(name + ".utils")
        utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
        sys.modules[name], sys.modules[name + ".utils"] = pkg, utils
        pkg.utils = utils
    full = f"{name}.{module}"
    if full not in sys.modules:
        path = Path(spec.submodule_search_locations[0]) / f"{module}.py"
        mod_spec = importlib.util.spec_from_file_location(full, path)
        mod = importlib.util.module_from_spec(mod_spec)
        sys.modules[full] = mod
        mod_spec.loader.exec_module(mod)
        setattr(sys.modules[name], module, mod)
    return sys.modules[full]
