"""`load_checkpoint`: a single-file SD checkpoint to ready networks, and `save_checkpoint` back."""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldm_core import detect, devices
from ldm_core.config import Family, ModelSpec, Prediction, VAEConfig
from ldm_core.nn.autoencoder import AutoencoderKL, normalize_vae_state_dict
from ldm_core.nn.text_encoders import TextEncoder
from ldm_core.nn.unet import UNetModel
from ldm_core.tokenizer import get_tokenizer
from ldm_core.weights import (
    CheckpointError,
    HashCache,
    WeightFile,
    assign_weights,
    model_hash,
    save_safetensors,
)

log = logging.getLogger(__name__)

# Keys a checkpoint may carry that inference does not use (ldm-formats.md §1.1).
IGNORED_KEY = re.compile(
    r"^(model_ema\.|betas$|alphas_cumprod|sqrt_|log_one_minus_alphas_cumprod$|posterior_|"
    r"scale_factor$|v_pred$|ztsnr$|logvar$|lvlb_weights$|.*position_ids$|first_stage_model\.loss\.)"
)


@dataclass
class Checkpoint:
    """A loaded model: the networks plus what is known about the file they came from."""

    path: Path
    spec: ModelSpec
    unet: UNetModel
    vae: AutoencoderKL
    text_encoders: list[TextEncoder]
    device: torch.device
    dtype: torch.dtype
    metadata: dict[str, str] = field(default_factory=dict)
    vae_path: Path | None = None
    hash_cache: HashCache | None = None
    load_seconds: float = 0.0
    _sha256: str | None = field(default=None, repr=False)
    _vae_sha256: str | None = field(default=None, repr=False)

    @property
    def tokenizer(self):
        """The CLIP tokenizer (built offline on first use, then shared by the process)."""
        return get_tokenizer()

    @property
    def family(self) -> Family:
        return self.spec.family

    @property
    def config(self) -> ModelSpec:
        return self.spec

    @property
    def prediction(self) -> Prediction:
        return self.spec.prediction

    @property
    def scale_factor(self) -> float:
        return self.spec.vae.scale_factor

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def sha256(self) -> str:
        """sha256 of the checkpoint file, computed on first use (hashing 2 GB takes seconds)."""
        if self._sha256 is None:
            self._sha256 = (self.hash_cache or HashCache()).sha256(self.path)
        return self._sha256

    @property
    def model_hash(self) -> str:
        return model_hash(self.sha256)

    @property
    def vae_sha256(self) -> str | None:
        if self.vae_path is None:
            return None
        if self._vae_sha256 is None:
            self._vae_sha256 = (self.hash_cache or HashCache()).sha256(self.vae_path)
        return self._vae_sha256

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model in the original single-file layout."""
        sd: dict[str, torch.Tensor] = {}
        sd.update({detect.UNET_PREFIX + k: v for k, v in self.unet.state_dict().items()})
        sd.update({detect.VAE_PREFIX + k: v for k, v in self.vae.state_dict().items()})
        for enc in self.text_encoders:
            sd.update({enc.config.prefix + k: v for k, v in enc.to_original_state_dict().items()})
        if self.spec.vae.scale_factor != detect.SD_SCALE_FACTOR:
            sd["scale_factor"] = torch.tensor(self.spec.vae.scale_factor)
        if self.spec.prediction is Prediction.V:
            sd["v_pred"] = torch.tensor([])
        return sd


def load_checkpoint(
    path: str | os.PathLike,
    *,
    vae: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    prediction: Prediction | str | None = None,
    hash_cache: HashCache | None = None,
) -> Checkpoint:
    """Load an original-format single-file SD checkpoint (`.safetensors`, or `.ckpt` safely).

    `vae` replaces the checkpoint's VAE with a separate file; `device`/`dtype` default to the
    one place that chooses them (`ldm_core.devices`); `prediction` overrides eps/v detection.
    """
    start = time.perf_counter()
    path = Path(path)
    dev, dt = devices.resolve(device, dtype)
    with WeightFile(path) as wf:
        spec = detect.detect_model(wf.shapes, source=path, read=wf.get, metadata=wf.metadata)
        if prediction is not None:
            spec = _replace(spec, prediction=Prediction(prediction))
        _check_coverage(wf.keys(), spec, path)
        unet = _load_module(UNetModel, spec.unet, wf, detect.UNET_PREFIX, dev, dt, path, "UNet")
        vae_module = None
        if vae is None:
            vae_module = _load_vae(spec.vae, wf, detect.VAE_PREFIX, dev, dt, path)
        text_encoders = []
        for cfg in spec.text_encoders:
            sd = wf.load(
                [k for k in wf if k.startswith(cfg.prefix) and not IGNORED_KEY.match(k)],
                strip_prefix=cfg.prefix,
                dtype=dt,
            )
            text_encoders.append(
                TextEncoder.from_state_dict(cfg, sd, device=dev, dtype=dt, source=str(path))
            )
        metadata = dict(wf.metadata)
    vae_path = None
    if vae is not None:
        vae_path = Path(vae)
        vae_module, vae_cfg = load_vae_file(
            vae_path, device=dev, dtype=dt, scale_factor=spec.vae.scale_factor
        )
        spec = _replace(spec, vae=vae_cfg)
    ckpt = Checkpoint(
        path=path,
        spec=spec,
        unet=unet,
        vae=vae_module,
        text_encoders=text_encoders,
        device=dev,
        dtype=dt,
        metadata=metadata,
        vae_path=vae_path,
        hash_cache=hash_cache,
    )
    ckpt.load_seconds = time.perf_counter() - start
    log.info(
        "loaded %s (%s, %s) in %.2fs",
        path.name,
        spec.family.value,
        spec.prediction.value,
        ckpt.load_seconds,
    )
    return ckpt


def load_vae_file(
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    scale_factor: float = detect.SD_SCALE_FACTOR,
) -> tuple[AutoencoderKL, VAEConfig]:
    """A separate VAE file (models/VAE): bare `encoder.*`/`decoder.*` keys or a full checkpoint's."""
    path = Path(path)
    dev, dt = devices.resolve(device, dtype)
    with WeightFile(path) as wf:
        cfg, prefix = detect.detect_standalone_vae(wf.shapes, path, scale_factor)
        return _load_vae(cfg, wf, prefix, dev, dt, path), cfg


def _load_vae(cfg: VAEConfig, wf: WeightFile, prefix: str, dev, dt, source) -> AutoencoderKL:
    keys = [k for k in wf if k.startswith(prefix) and not IGNORED_KEY.match(k)]
    if prefix == "":
        keys = [
            k
            for k in keys
            if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))
        ]
    sd = normalize_vae_state_dict(wf.load(keys, strip_prefix=prefix, dtype=dt, device=dev))
    with torch.device("meta"):
        module = AutoencoderKL(cfg)
    return assign_weights(module, sd, source=source, what="VAE").eval().requires_grad_(False)


def _load_module(cls, cfg, wf: WeightFile, prefix: str, dev, dt, source, what: str) -> nn.Module:
    keys = [k for k in wf if k.startswith(prefix) and not IGNORED_KEY.match(k)]
    sd = wf.load(keys, strip_prefix=prefix, dtype=dt, device=dev)
    with torch.device("meta"):
        module = cls(cfg)
    return assign_weights(module, sd, source=source, what=what).eval().requires_grad_(False)


def _check_coverage(keys: list[str], spec: ModelSpec, source: Path) -> None:
    prefixes = (detect.UNET_PREFIX, detect.VAE_PREFIX, *(c.prefix for c in spec.text_encoders))
    stray = [k for k in keys if not k.startswith(prefixes) and not IGNORED_KEY.match(k)]
    if stray:
        log.warning(
            "%s: ignoring %d key(s) outside the model, e.g. %s", source.name, len(stray), stray[:3]
        )


def _replace(spec: ModelSpec, **changes) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, **changes)


def save_checkpoint(
    checkpoint: Checkpoint,
    path: str | os.PathLike,
    *,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write `checkpoint` as an original-layout single-file `.safetensors` (atomically)."""
    tensors = checkpoint.state_dict()
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    meta = dict(checkpoint.metadata)
    meta.update(metadata or {})
    save_safetensors(tensors, path, meta)


def save_components(
    path: str | os.PathLike,
    *,
    unet: nn.Module,
    vae: nn.Module,
    text_encoder: TextEncoder,
    scale_factor: float = detect.SD_SCALE_FACTOR,
    prediction: Prediction = Prediction.EPS,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write freshly built networks as an original-layout single file (used by training and tests)."""
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({detect.UNET_PREFIX + k: v for k, v in unet.state_dict().items()})
    tensors.update({detect.VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    tensors.update(
        {
            text_encoder.config.prefix + k: v
            for k, v in text_encoder.to_original_state_dict().items()
        }
    )
    if scale_factor != detect.SD_SCALE_FACTOR:
        tensors["scale_factor"] = torch.tensor(scale_factor)
    if prediction is Prediction.V:
        tensors["v_pred"] = torch.tensor([])
    if dtype is not None:
        tensors = {
            k: v.to(dtype) if v.is_floating_point() and v.dim() else v for k, v in tensors.items()
        }
    save_safetensors(tensors, path, metadata)


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "load_vae_file",
    "save_checkpoint",
    "save_components",
]
