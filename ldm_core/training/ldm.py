"""Stage 2 of the demo recipe: text encoder + UNet trained jointly in the frozen latent space.

Follows the LDM paper's conditional model (Rombach et al. 2022, arXiv:2112.10752) as Stable
Diffusion 1.x does it: a CLIP-style text transformer (here trained from scratch, real CLIP BPE
tokenizer, BOS/EOS and EOS padding to 77 tokens) feeds cross-attention in a UNet on SD's
scaled-linear beta schedule; the UNet predicts the velocity v, as SD 2's 768-v models do (the
file says so in `modelspec.prediction_type`, which the loader reads). 10% of captions are replaced by
the empty prompt, which the same text encoder encodes, for classifier-free guidance (Ho &
Salimans 2022). Loss weights follow Min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556), which
converges faster for short budgets. AdamW with warm-up and time-based cosine decay, gradient
clipping, an EMA of the weights (used for export), checkpoints every few minutes and resume.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ldm_core.config import TextEncoderConfig, UNetConfig
from ldm_core.nn.autoencoder import AutoencoderKL
from ldm_core.nn.text_encoders import TextEncoder
from ldm_core.nn.unet import UNetModel
from ldm_core.schedules import ModelSampling
from ldm_core.tokenizer import get_tokenizer
from ldm_core.training import world
from ldm_core.training.autoencoder import (
    StopFlag,
    ThreadTuner,
    cpu_has_fast_bf16,
    encode_means,
    time_cosine_lr,
)
from ldm_core.training.captions import training_caption
from ldm_core.training.checkpoints import save_atomic
from ldm_core.training.optim import adamw

log = logging.getLogger(__name__)

# Text heads are hidden // 64 (detection's rule), so 96 wide -> 1 head. Its token embedding
# (49408 x 96) is most of its parameters; 96 keeps the whole file under 30 MB.
DEMO_TEXT_CONFIG = TextEncoderConfig(
    hidden_size=96, intermediate_size=384, num_layers=3, num_heads=1
)
# SD1 layout (conv proj_in, 8 heads per attention layer): 64-128-128 channels at 8/4/2 latent cells.
DEMO_UNET_CONFIG = UNetConfig(
    model_channels=64,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    transformer_depth=(1, 1, 0),
    transformer_depth_middle=1,
    context_dim=96,
    num_heads=8,
)


@dataclass
class LDMTrainConfig:
    minutes: float = 55.0
    batch_size: int = 128
    lr: float = 8e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    x0_weight_floor: float = 1.0
    timestep_exponent: float = 1.0  # < 1: draw high-noise timesteps more often (diffusion_loss)
    lowres_noise: float = 0.0  # > 0: multi-resolution noise on top of the white (diffusion_loss)
    lowfreq_weight: float = 0.0  # > 0: extra weight on the error's 2x2-cell means (diffusion_loss)
    overshoot: float = 0.0  # > 0: inputs pushed away from the batch mean, as guidance does (same)
    object_weight: float = 0.0  # > 0: extra loss weight on latent cells the objects cover (same)
    prediction: str = "v"
    zero_terminal_snr: bool = False
    ema_decay: float = 0.997
    procs: int = 1  # > 1: data parallel over this many single-thread processes (train_ldm_parallel)
    text_lr_scale: float = 1.0  # the text encoder's learning rate relative to the UNet's; 0: frozen
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_minutes: float = 3.0
    eval_minutes: float = 20.0
    eval_prompts: int = 112
    log_every: int = 25
    bf16: bool = False
    threads: int = 2
    max_steps: int | None = None  # tests: stop after this many steps whatever the time


# -- data -----------------------------------------------------------------------------------------


def scene_to_dict(scene: world.Scene) -> dict:
    return {"background": scene.background, "objects": [asdict(o) for o in scene.objects]}


def scene_from_dict(d: dict) -> world.Scene:
    return world.Scene(tuple(world.SceneObject(**o) for o in d["objects"]), d["background"])


@dataclass
class LatentDataset:
    latents: torch.Tensor  # [N, 4, h, w] scaled latents (posterior mean x scale factor)
    scenes: list[world.Scene]
    scale_factor: float


@torch.no_grad()
def precompute_latents(
    ae: AutoencoderKL,
    scale_factor: float,
    num: int,
    seed: int,
    chunk: int = 512,
    bf16: bool | None = None,
) -> LatentDataset:
    """Render `num` fresh scenes and encode them (posterior means x scale factor).

    `bf16`: encode under bf16 autocast; None uses it where the CPU has native bf16 kernels.
    """
    if bf16 is None:
        bf16 = cpu_has_fast_bf16()
    stream = world.SceneStream(seed)
    latents, scenes = [], []
    t0 = time.monotonic()
    for start in range(0, num, chunk):
        batch = stream.batch(min(chunk, num - start))
        latents.append(encode_means(ae, batch.images, bf16=bf16) * scale_factor)
        scenes.extend(batch.scenes)
        if (start // chunk) % 10 == 0:
            log.info(
                "latents: %d/%d (%.0f s)", start + len(batch.scenes), num, time.monotonic() - t0
            )
    data = torch.cat(latents)
    log.info(
        "latents: %s, std %.3f, %.0f s", tuple(data.shape), float(data.std()), time.monotonic() - t0
    )
    return LatentDataset(data, scenes, scale_factor)


def save_dataset(data: LatentDataset, workdir: Path) -> None:
    torch.save({"latents": data.latents, "scale_factor": data.scale_factor}, workdir / "latents.pt")
    (workdir / "scenes.json").write_text(json.dumps([scene_to_dict(s) for s in data.scenes]))


def load_dataset(workdir: Path) -> LatentDataset:
    state = torch.load(workdir / "latents.pt", map_location="cpu", weights_only=True)
    scenes = [scene_from_dict(d) for d in json.loads((workdir / "scenes.json").read_text())]
    return LatentDataset(state["latents"], scenes, float(state["scale_factor"]))


def tokenize(prompts: list[str]) -> torch.Tensor:
    """SD1 / A1111 token ids [B, 77]: BOS, tokens, EOS, then EOS padding (truncated to 77)."""
    return get_tokenizer()(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


# -- models ---------------------------------------------------------------------------------------


@dataclass
class DemoModels:
    unet: UNetModel
    text_encoder: TextEncoder
    prediction: str = "eps"  # what the UNet outputs: "eps" (noise) or "v" (velocity)
    zero_terminal_snr: bool = False  # trained on the rescaled schedule whose last SNR is ~0


def build_models(
    unet_config: UNetConfig = DEMO_UNET_CONFIG, text_config: TextEncoderConfig = DEMO_TEXT_CONFIG
) -> DemoModels:
    if unet_config.context_dim != text_config.hidden_size:
        raise ValueError(
            f"UNet context_dim {unet_config.context_dim} != text hidden size {text_config.hidden_size}"
        )
    return DemoModels(UNetModel(unet_config), TextEncoder(text_config))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class EMA:
    """Exponential moving average of a module's float tensors, warmed up as (1+n)/(10+n)."""

    def __init__(self, module: nn.Module, decay: float):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema = [t for t in self.module.state_dict().values() if t.is_floating_point()]
        cur = [t for t in module.state_dict().values() if t.is_floating_point()]
        torch._foreach_lerp_(ema, cur, 1.0 - d)


def training_alphas_cumprod(zero_terminal_snr: bool = False) -> torch.Tensor:
    """alpha_bar_t [1000] of SD's scaled-linear schedule, or of its zero-terminal-SNR rescale
    (Lin et al. 2023, as the loader samples a file marked `modelspec.ztsnr`)."""
    sigmas = ModelSampling.discrete(zero_terminal_snr=zero_terminal_snr).sigmas
    return (1.0 / (sigmas**2 + 1.0)).float()


def sample_timesteps(
    n: int, steps: int, exponent: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """n training timesteps in [0, steps): uniform for exponent 1, else floor(steps u^exponent)
    with u uniform, so an exponent a < 1 draws high noise more often (density ~ t^(1/a - 1))."""
    if not 0 < exponent <= 1:
        raise ValueError(f"timestep exponent must be in (0, 1], not {exponent}")
    if exponent == 1:
        return torch.randint(0, steps, (n,), generator=generator)
    u = torch.rand((n,), generator=generator) ** exponent
    return (u * steps).long().clamp(max=steps - 1)


def diffusion_loss(
    models: DemoModels,
    latents: torch.Tensor,
    input_ids: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    min_snr_gamma: float,
    generator: torch.Generator | None = None,
    bf16: bool = False,
    x0_weight_floor: float = 0.0,
    prediction: str = "eps",
    timestep_exponent: float = 1.0,
    lowres_noise: float = 0.0,
    rows: slice | None = None,
    lowfreq_weight: float = 0.0,
    overshoot: float = 0.0,
    cell_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted eps- or v-prediction MSE. latents [B, 4, h, w] (scaled), input_ids [B, 77].

    Weights are set on the implied x0 error: eps MSE is SNR x the x0 MSE, v MSE is (SNR + 1) x
    the x0 MSE. Min-SNR-gamma caps the x0 weight at gamma; `x0_weight_floor` also raises it to at
    least the floor (a floor of 1 is the "truncated SNR" weighting max(SNR, 1) of progressive
    distillation, capped). Without the floor the x0 error at high noise, where the text alone
    must decide the layout (the SNR at t = 999 is 0.005), hardly counts, and the first demo run
    learnt colours but not positions.

    v rather than eps: at t = 999 an eps model's x0 estimate is (x_t - 0.998 eps) / 0.068, so
    its errors reach the image 15x amplified; measured on an eps run with the floor, the x0
    estimates at high noise were the same blobs whatever the prompt said about position, while
    a v model predicts x0 there almost directly (SD 2's 768-v models use it for the same reason).

    `timestep_exponent`: see `sample_timesteps`. `lowres_noise`: see `multires_noise`.
    `lowfreq_weight`: adds this weight times the MSE of the error averaged over 2x2 latent
    cells (16x16 pixels, about one object), so an error that is the same over an object (its
    colour) counts 1 + `lowfreq_weight` times, while one that changes from cell to cell (an
    edge) counts as before. The x0 error is a per-sample multiple of the eps or v error, so
    the pooled term carries the same x0 weighting as the plain one. Aimed at colour: the world's
    neighbouring hues (yellow and orange, purple and blue) differ little in the plain MSE.
    `overshoot`: half the samples at noise levels with SNR <= 1 (sigma >= 1) are noised from
    m + k (x0 - m) instead of x0, k = 1 + `overshoot` u with u uniform in [0, 1) and m the
    batch's mean latent per channel, while the target still asks for the clean x0 (the v or eps
    target is built from the noise the input implies given x0). That is what guidance does to a
    sample: at high noise the unconditional branch predicts about m, so the guided x0 is about
    m + w (x0 - m), and a short schedule's conditional branch follows the overshot sample instead
    of the prompt (docs/demo-model.md, "Where colour goes wrong"). Trained this way it must
    pull an overshot sample back to the colour the prompt asks for.
    `cell_weights` [B, 1, h, w] (`object_cell_weights`): each latent cell's squared error counts
    this many times; each sample's map has mean 1, so the loss keeps its scale.
    `rows`: the timesteps and noise are drawn for the whole batch, then only these rows are
    computed (a data-parallel process's share: the processes together compute exactly the loss
    of the whole batch, which one process computes with `rows=None`).
    """
    if prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")
    b = latents.shape[0]
    t = sample_timesteps(b, len(alphas_cumprod), timestep_exponent, generator)
    noise = torch.randn(latents.shape, generator=generator)
    if lowres_noise > 0:
        noise = noise + lowres_noise * multires_noise(latents.shape, generator)
    push = None
    if overshoot > 0:  # drawn for the whole batch, so data-parallel shares add up to it
        k = 1 + overshoot * torch.rand((b,), generator=generator)
        k = torch.where(torch.rand((b,), generator=generator) < 0.5, k, torch.ones(()))
        push = (k - 1).view(b, 1, 1, 1) * (latents - latents.mean(dim=(0, 2, 3), keepdim=True))
    if rows is not None:
        latents, input_ids, t, noise = latents[rows], input_ids[rows], t[rows], noise[rows]
        push = None if push is None else push[rows]
        cell_weights = None if cell_weights is None else cell_weights[rows]
        b = latents.shape[0]
    ac = alphas_cumprod[t].float().view(b, 1, 1, 1)
    if push is not None:  # only where sigma >= 1, so the implied noise stays bounded
        push = push * (ac <= 0.5)
        noise = noise + (ac / (1 - ac)).sqrt() * push
    noisy = ac.sqrt() * latents + (1 - ac).sqrt() * noise
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        context = models.text_encoder(input_ids)
        out = models.unet(noisy, t, context)
    snr = (ac / (1 - ac)).view(b)
    x0_weight = snr.clamp(max=min_snr_gamma) if min_snr_gamma > 0 else snr
    x0_weight = x0_weight.clamp(min=x0_weight_floor)
    if prediction == "v":
        target = ac.sqrt() * noise - (1 - ac).sqrt() * latents
        weight = x0_weight / (snr + 1)
    else:
        target, weight = noise, x0_weight / snr
    err = out.float() - target
    sq = err.pow(2) if cell_weights is None else err.pow(2) * cell_weights
    per_sample = sq.mean(dim=(1, 2, 3))
    if lowfreq_weight > 0:
        coarse = F.avg_pool2d(err, 2, ceil_mode=True).pow(2).mean(dim=(1, 2, 3))
        per_sample = per_sample + lowfreq_weight * coarse
    return (weight * per_sample).mean()


def object_cell_weights(
    scenes: list[world.Scene], size: int, object_weight: float, chunk: int = 4096
) -> torch.Tensor:
    """Per-sample loss weights over a size x size latent grid, float32 [N, 1, size, size]: 1 on
    cells no object touches, 1 + `object_weight` on cells any object covers any part of (a
    cell's max of the objects' pixel coverage), then scaled so that each map has mean 1.

    Aimed at small objects' colour: a small object (radius 7 of 64 pixels) covers 4% of the
    image, so in the plain MSE its colour counts for little next to the background, and the
    benchmark's colour errors are mostly small objects drawn in a neighbouring hue (orange for
    yellow, red for orange: docs/demo-model.md). The demo's latents are 8x8, where a small
    object touches 4 to 6 cells: with `object_weight` 6 those cells carry a third to two fifths
    of its sample's loss instead of 6 to 9%.
    """
    if world.IMAGE_SIZE % size:
        raise ValueError(f"latent size {size} does not divide the image size {world.IMAGE_SIZE}")
    out = torch.empty(len(scenes), 1, size, size)
    for start in range(0, len(scenes), chunk):
        part = scenes[start : start + chunk]
        cover = np.zeros((len(part), world.IMAGE_SIZE, world.IMAGE_SIZE), np.float32)
        for i, scene in enumerate(part):
            for obj in scene.objects:
                np.maximum(cover[i], world.object_mask(obj), out=cover[i])
        cells = F.max_pool2d(torch.from_numpy(cover)[:, None], world.IMAGE_SIZE // size)
        w = 1.0 + object_weight * (cells > 0).float()
        out[start : start + len(part)] = w / w.mean(dim=(1, 2, 3), keepdim=True)
    return out


def multires_noise(
    shape: tuple[int, ...], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Unit-variance noise drawn at 1x1, 2x2 and 4x4 cells, upsampled bilinearly to `shape`
    [B, C, h, w] and summed (resolutions below h only): "offset" noise (one value per channel)
    plus coarse blobs the size of the world's objects.

    Trained with it on top of white noise (and the v target built from the sum, so the x0 the
    model is asked for is still the clean latent), the model cannot take a sample's large-scale
    colour at face value at any noise level and must read it from the prompt: aimed at the short
    schedule's failure, where the conditional branch follows a sample that guidance bleached
    instead of holding the prompt's colour (docs/demo-model.md, "Where colour goes wrong").
    """
    b, c, h, w = shape
    out = torch.zeros(shape)
    for r in (1, 2, 4):
        if r >= h:
            break
        coarse = torch.randn((b, c, r, r), generator=generator)
        out += F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return out


def _captions(scenes: list[world.Scene], rng: np.random.Generator, dropout: float) -> list[str]:
    return ["" if rng.random() < dropout else training_caption(s, rng) for s in scenes]


def _try_judge():
    """The judge if its weights exist yet (it may be trained while this runs), else None."""
    from ldm_core.training.autoencoder import judge_classifier

    try:
        return judge_classifier()
    except (ImportError, OSError, ValueError) as exc:
        log.info("ldm eval skipped: judge unavailable (%s)", exc)
        return None


def train_ldm(
    workdir: str | Path,
    data: LatentDataset,
    cfg: LDMTrainConfig,
    *,
    resume: bool = True,
    judge=None,
    vae: AutoencoderKL | None = None,
    unet_config: UNetConfig = DEMO_UNET_CONFIG,
    text_config: TextEncoderConfig = DEMO_TEXT_CONFIG,
    init: dict | None = None,
    state_file: str = "ldm_state.pt",
    rank: int = 0,
    world_size: int = 1,
) -> DemoModels:
    """Train (or resume) UNet + text encoder; returns the EMA models.

    `init` (a checkpoint of an earlier run, as saved in its state file) starts from its weights
    and EMA with a fresh optimiser and learning-rate cycle (a warm restart); an `init` holding
    only "text_encoder" (the text pre-training stage's) starts the text encoder from it and the
    UNet from random weights, both averages from there; `state_file` names
    the checkpoint of such a run so it resumes on its own. With a `judge` and the `vae`,
    held-out prompt adherence of the EMA weights is logged every `cfg.eval_minutes`.

    `rank` / `world_size` > 1: one of `train_ldm_parallel`'s processes (a torch.distributed
    group is initialised): each computes its share of every batch, gradients are averaged, so
    every process takes the same optimiser step; rank 0 keeps the clock, checkpoints, evaluates
    and logs.
    """
    workdir = Path(workdir)
    parallel = world_size > 1
    rows = None
    if parallel:
        if cfg.batch_size % world_size:
            raise ValueError(f"batch {cfg.batch_size} does not split over {world_size} processes")
        share = cfg.batch_size // world_size
        rows = slice(rank * share, (rank + 1) * share)
    lead = rank == 0
    state_path = workdir / state_file
    torch.manual_seed(cfg.seed)
    models = build_models(unet_config, text_config)
    if init is not None:
        if "unet" in init:
            models.unet.load_state_dict(init["unet"])
        models.text_encoder.load_state_dict(init["text_encoder"])
    # a frozen text encoder computes no gradients and does not count in the clipping norm
    models.text_encoder.requires_grad_(cfg.text_lr_scale > 0)
    params = [
        p for m in (models.unet, models.text_encoder) for p in m.parameters() if p.requires_grad
    ]
    groups = [
        {"params": list(models.unet.parameters()), "lr_scale": 1.0},
        {"params": list(models.text_encoder.parameters()), "lr_scale": cfg.text_lr_scale},
    ]
    opt = adamw(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema_unet, ema_text = EMA(models.unet, cfg.ema_decay), EMA(models.text_encoder, cfg.ema_decay)
    warm = init is not None and "ema_unet" in init
    if warm:
        ema_unet.module.load_state_dict(init["ema_unet"])
        ema_text.module.load_state_dict(init["ema_text_encoder"])
        # the averages are already warm: no (1 + n) / (10 + n) ramp
        ema_unet.updates = ema_text.updates = 10_000
    step, elapsed = 0, 0.0
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        models.unet.load_state_dict(state["unet"])
        models.text_encoder.load_state_dict(state["text_encoder"])
        ema_unet.module.load_state_dict(state["ema_unet"])
        ema_text.module.load_state_dict(state["ema_text_encoder"])
        ema_unet.updates = ema_text.updates = int(state["step"]) + (10_000 if warm else 0)
        opt.load_state_dict(state["opt"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        log.info("ldm: resumed at step %d (%.1f min done)", step, elapsed / 60)
    if cfg.text_lr_scale == 0:  # the encoder the UNet trains against is the one exported
        ema_text.module.load_state_dict(models.text_encoder.state_dict())
    log.info(
        "ldm: unet %.2fM, text encoder %.2fM parameters, %d latents, config %s",
        count_parameters(models.unet) / 1e6,
        count_parameters(models.text_encoder) / 1e6,
        len(data.scenes),
        asdict(cfg),
    )
    alphas_cumprod = training_alphas_cumprod(cfg.zero_terminal_snr)
    n = len(data.scenes)
    cell_weights = None
    if cfg.object_weight > 0:
        cell_weights = object_cell_weights(data.scenes, data.latents.shape[-1], cfg.object_weight)
    budget = cfg.minutes * 60.0
    start = time.monotonic() - elapsed
    last_ckpt = last_eval = time.monotonic()
    window_t, window_steps, loss_sum = time.monotonic(), 0, 0.0
    models.unet.train()
    models.text_encoder.train()
    tuner = ThreadTuner(1 if parallel else cfg.threads)
    stop = StopFlag()

    def checkpoint() -> None:
        payload = {
            "unet": models.unet.state_dict(),
            "text_encoder": models.text_encoder.state_dict(),
            "ema_unet": ema_unet.module.state_dict(),
            "ema_text_encoder": ema_text.module.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "elapsed": time.monotonic() - start,
        }
        save_atomic(state_path, payload)

    while True:
        elapsed = time.monotonic() - start
        done = elapsed >= budget or (cfg.max_steps is not None and step >= cfg.max_steps)
        code = 2 if stop.stop else int(done)
        if parallel:  # rank 0's clock (the learning rate follows it) and signals rule them all
            shared = torch.tensor([code, elapsed], dtype=torch.float64)
            dist.broadcast(shared, 0)
            code, elapsed = int(shared[0]), float(shared[1])
        if code == 1:
            break
        if code == 2:
            if lead:
                checkpoint()
            raise SystemExit("ldm: interrupted, checkpoint saved")
        t_step = time.monotonic()
        # Everything random in a step is a function of (seed, step), so resuming is exact.
        rng = np.random.default_rng([cfg.seed, step])
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = rng.integers(0, n, cfg.batch_size)
        input_ids = tokenize(_captions([data.scenes[i] for i in idx], rng, cfg.caption_dropout))
        lr = time_cosine_lr(cfg.lr, step, elapsed / budget, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        loss = diffusion_loss(
            models,
            data.latents[torch.from_numpy(idx)],
            input_ids,
            alphas_cumprod,
            cfg.min_snr_gamma,
            generator,
            cfg.bf16,
            cfg.x0_weight_floor,
            cfg.prediction,
            cfg.timestep_exponent,
            cfg.lowres_noise,
            rows,
            cfg.lowfreq_weight,
            cfg.overshoot,
            None if cell_weights is None else cell_weights[torch.from_numpy(idx)],
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if parallel:
            _average_gradients(params, world_size)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema_unet.update(models.unet)
        if cfg.text_lr_scale > 0:  # a frozen encoder's average is its weights (set above)
            ema_text.update(models.text_encoder)
        tuner.record(time.monotonic() - t_step)
        step += 1
        window_steps += 1
        loss_sum += loss.item()
        if step % cfg.log_every == 0 and lead:
            rate = window_steps / max(1e-9, time.monotonic() - window_t)
            log.info(
                "ldm step %d  loss=%.4f  lr=%.2e  %.2f steps/s  %.1f/%.0f min",
                step,
                loss_sum / window_steps,
                lr,
                rate,
                (time.monotonic() - start) / 60,
                cfg.minutes,
            )
            window_t, window_steps, loss_sum = time.monotonic(), 0, 0.0
        if lead and time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = time.monotonic()
        if lead and vae is not None and time.monotonic() - last_eval > cfg.eval_minutes * 60:
            judge = judge if judge is not None else _try_judge()
            if judge is not None:
                ema = DemoModels(
                    ema_unet.module, ema_text.module, cfg.prediction, cfg.zero_terminal_snr
                )
                acc = evaluate_adherence(
                    ema, vae, data.scale_factor, judge, num_prompts=cfg.eval_prompts
                )
                summary = " ".join(f"{k}={v:.3f}" for k, v in acc.items())
                log.info("ldm eval at step %d (EMA): %s", step, summary)
            last_eval = time.monotonic()
    if lead:
        checkpoint()
        log.info("ldm: done, %d steps in %.1f min", step, (time.monotonic() - start) / 60)
    return DemoModels(
        ema_unet.module.eval(), ema_text.module.eval(), cfg.prediction, cfg.zero_terminal_snr
    )


def _average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """All-reduce every gradient as one flat buffer (one collective a step) and average it."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()


def _parallel_worker(
    rank: int, world_size: int, store: str, workdir, data, cfg, final, kwargs: dict
) -> None:
    torch.set_num_threads(1)
    if rank == 0:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(name)s: %(message)s",
            stream=sys.stdout,
            force=True,
        )
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        models = train_ldm(workdir, data, cfg, rank=rank, world_size=world_size, **kwargs)
        if rank == 0:
            _save_final(models, cfg, final)
    finally:
        dist.destroy_process_group()


def train_ldm_parallel(
    workdir: str | Path,
    data: LatentDataset,
    cfg: LDMTrainConfig,
    final: str | Path,
    *,
    unet_config: UNetConfig = DEMO_UNET_CONFIG,
    text_config: TextEncoderConfig = DEMO_TEXT_CONFIG,
    **kwargs,
) -> DemoModels:
    """`train_ldm` as data parallelism over `cfg.procs` single-thread processes (gloo).

    Measured on the 2-core machine (2026-12-04, the demo models, batch 64, text encoder frozen,
    1.5- to 2-minute runs, `bench/bench_ldm_procs.py` and the like): 1.03 to 1.20 times the
    joint steps a second of one process with two threads in four pairs, 1.13 on average; the
    bare UNet step gains more (1.32x), the rest of a step (captions, tokenising, the
    all-reduce, the EMA) less, and the machine's speed varies from minute to minute; in a whole
    45-minute joint stage of a 90-minute run, 1.02 times (another sitting's one-process run). At
    these tensor sizes intra-op threads wait on each other more than two processes do. The training
    is the same: each process computes its rows of the same batch (`diffusion_loss`'s `rows`)
    and the averaged gradients are the whole batch's. The EMA models are saved to `final` by rank 0
    and returned from there. `kwargs` are `train_ldm`'s (`init`, `resume`, `vae`,
    `state_file`); rank 0 loads the judge itself for its evaluations.
    """
    import torch.multiprocessing as mp

    store = Path(tempfile.mkdtemp(prefix="ldm-ddp-")) / "store"
    kwargs = {**kwargs, "unet_config": unet_config, "text_config": text_config}
    try:
        mp.spawn(
            _parallel_worker,
            args=(cfg.procs, str(store), workdir, data, cfg, Path(final), kwargs),
            nprocs=cfg.procs,
        )
    except mp.ProcessRaisedException as exc:
        raise SystemExit(f"ldm: a training process failed:\n{exc}") from None
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)
    return _load_final(Path(final), unet_config, text_config)


# -- sampling and evaluation ------------------------------------------------------------------------


@torch.no_grad()
def generate_latents(
    unet: UNetModel,
    text_encoder: TextEncoder,
    prompts: list[str],
    *,
    steps: int = 20,
    guidance_scale: float = 5.0,
    sampler: str = "DPM++ 2M",
    seed: int = 0,
    negative_prompt: str = "",
    latent_size: int = 8,
    prediction: str = "eps",
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """A minimal txt2img loop (k-diffusion style, CFG in one batch) -> scaled latents [B, 4, h, w]."""
    from ldm_core.samplers import SAMPLERS, sampling_sigmas

    ms = ModelSampling.discrete(zero_terminal_snr=zero_terminal_snr)
    sigmas = sampling_sigmas(sampler, "Automatic", steps, ms).float()
    n = len(prompts)
    context = text_encoder(tokenize(list(prompts) + [negative_prompt] * n))  # [2B, 77, D]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((n, unet.config.in_channels, latent_size, latent_size), generator=generator)
    # as the pipeline starts a zero-terminal-SNR v model: unit-variance x_T in x0 scale
    x = x * ((sigmas[0] ** 2 + 1).sqrt() if zero_terminal_snr else sigmas[0])

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.reshape(-1).expand(n)
        c_in = (1.0 / (sigma**2 + 1).sqrt()).view(-1, 1, 1, 1)
        t = ms.sigma_to_t(sigma).float()
        out = unet(torch.cat([x * c_in] * 2), torch.cat([t, t]), context).float()
        cond, uncond = out.chunk(2)
        out = uncond + guidance_scale * (cond - uncond)
        s = sigma.view(-1, 1, 1, 1)
        if prediction == "v":  # x0 = x / (s^2 + 1) - v s / sqrt(s^2 + 1)
            return x / (s**2 + 1) - out * s / (s**2 + 1).sqrt()
        return x - s * out

    return SAMPLERS[sampler](denoise, x, sigmas)


@torch.no_grad()
def evaluate_adherence(
    models: DemoModels,
    vae: AutoencoderKL,
    scale_factor: float,
    judge,
    *,
    num_prompts: int = 112,
    seed: int = 4242,
    steps: int = 20,
    guidance_scale: float = 5.0,
    batch_size: int = 56,
) -> dict[str, float]:
    """Judge accuracy per attribute on images generated from held-out benchmark prompts."""
    pairs = world.benchmark_prompts(num_prompts, seed)
    prompts = [p for p, _ in pairs]
    labels = world.label_tensors([s for _, s in pairs])
    images = []
    for i in range(0, num_prompts, batch_size):
        lat = generate_latents(
            models.unet,
            models.text_encoder,
            prompts[i : i + batch_size],
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed + i,
            prediction=models.prediction,
            zero_terminal_snr=models.zero_terminal_snr,
        )
        images.append(vae.decode(lat / scale_factor).clamp(-1, 1))
    preds = judge(torch.cat(images))
    return {a: float((preds[a] == labels[a]).float().mean()) for a in labels if a in preds}


# -- stages of train_demo -----------------------------------------------------------------------------


def stage_latents(args, workdir: Path, ae: AutoencoderKL, scale_factor: float) -> LatentDataset:
    if (
        (workdir / "latents.pt").exists()
        and (workdir / "scenes.json").exists()
        and not args.no_resume
    ):
        data = load_dataset(workdir)
        if abs(data.scale_factor - scale_factor) < 1e-6 and len(data.scenes) == args.num_latents:
            log.info("latents: loaded %d from %s", len(data.scenes), workdir)
            return data
    data = precompute_latents(
        ae, scale_factor, args.num_latents, seed=args.seed * 1_000_003 + 99_991
    )
    save_dataset(data, workdir)
    return data


def ldm_seed(args) -> int:
    """The joint stage's seed: `--ldm-seed`, or `--seed` when it is not given."""
    seed = getattr(args, "ldm_seed", None)
    return args.seed if seed is None else seed


def ldm_config(args) -> LDMTrainConfig:
    """The joint stage's settings from train_demo's command line."""
    return LDMTrainConfig(
        minutes=args.ldm_minutes,
        seed=ldm_seed(args),
        threads=args.threads,
        batch_size=getattr(args, "ldm_batch", LDMTrainConfig.batch_size),
        lr=getattr(args, "ldm_lr", LDMTrainConfig.lr),
        zero_terminal_snr=getattr(args, "ztsnr", False),
        text_lr_scale=getattr(args, "text_lr_scale", LDMTrainConfig.text_lr_scale),
        caption_dropout=getattr(args, "caption_dropout", LDMTrainConfig.caption_dropout),
        timestep_exponent=getattr(args, "timestep_exponent", LDMTrainConfig.timestep_exponent),
        lowres_noise=getattr(args, "lowres_noise", LDMTrainConfig.lowres_noise),
        lowfreq_weight=getattr(args, "lowfreq_weight", LDMTrainConfig.lowfreq_weight),
        overshoot=getattr(args, "overshoot", LDMTrainConfig.overshoot),
        object_weight=getattr(args, "object_weight", LDMTrainConfig.object_weight),
        procs=getattr(args, "ldm_procs", LDMTrainConfig.procs),
    )


def ldm_restart_config(args) -> LDMTrainConfig:
    """The second cycle's settings: a fresh, lower learning-rate cycle of stage 7's models.

    A text encoder frozen in stage 7 (`--text-lr-scale 0`) stays frozen here. Measured
    (2026-12-03): unfreezing it for a 15-minute cycle at full rate after the 45-minute frozen
    joint stage lost colour (75.9% to 67.4% on the benchmark), shape (60.7% to 57.6%) and
    background (96.0% to 91.5%), position unchanged.
    """
    return replace(
        ldm_config(args),
        minutes=getattr(args, "ldm_restart_minutes", 0.0),
        seed=ldm_seed(args) + 1,
        lr=5e-4,
        warmup_steps=100,
    )


def stage_ldm(
    args, workdir: Path, data: LatentDataset, judge=None, vae=None, init: dict | None = None
) -> DemoModels:
    """The joint stage; `init` (the text stage's encoder, if it ran) starts the text encoder."""
    final = workdir / "ldm_final.pt"
    if final.exists() and not args.no_resume:
        return _load_final(final)
    cfg = ldm_config(args)
    if cfg.procs > 1:
        return train_ldm_parallel(
            workdir, data, cfg, final, resume=not args.no_resume, vae=vae, init=init
        )
    models = train_ldm(
        workdir, data, cfg, resume=not args.no_resume, judge=judge, vae=vae, init=init
    )
    _save_final(models, cfg, final)
    return models


def _save_final(models: DemoModels, cfg: LDMTrainConfig, path: Path) -> None:
    state = {"unet": models.unet.state_dict(), "text_encoder": models.text_encoder.state_dict()}
    torch.save({**state, "config": asdict(cfg)}, path)


def _load_final(
    path: Path,
    unet_config: UNetConfig = DEMO_UNET_CONFIG,
    text_config: TextEncoderConfig = DEMO_TEXT_CONFIG,
) -> DemoModels:
    models = build_models(unet_config, text_config)
    state = torch.load(path, map_location="cpu", weights_only=True)
    models.unet.load_state_dict(state["unet"])
    models.text_encoder.load_state_dict(state["text_encoder"])
    models.unet.eval()
    models.text_encoder.eval()
    models.prediction = state.get("config", {}).get("prediction", "eps")
    models.zero_terminal_snr = bool(state.get("config", {}).get("zero_terminal_snr", False))
    log.info("ldm: loaded EMA weights from %s", path)
    return models


def stage_ldm_restart(
    args,
    workdir: Path,
    data: LatentDataset,
    models: DemoModels | None,
    judge=None,
    vae=None,
    init: dict | None = None,
) -> DemoModels:
    """A second cycle from the first one's weights and EMA, fresh optimiser, lower peak lr.

    Measured on the v run of 2026-11-22: after the first 40-min cycle (3,660 steps) the model
    placed shapes at random (position 9% on the benchmark, chance is 11%); continued at a low
    learning rate, position rose to 26% after 500 more steps and 29% after 1,000, while
    sampling high noise levels more often (t drawn as 1000 u^0.5) did not speed it up (25%).
    Positions are simply learnt late here, so the second cycle buys steps.

    `init` (weights and EMA, as in a state file) overrides the first cycle's `ldm_state.pt`;
    `models` (the first cycle's EMA models) is what comes back when the stage is switched off.
    """
    minutes = getattr(args, "ldm_restart_minutes", 0.0)
    if minutes <= 0:
        return models
    final = workdir / "ldm_restart_final.pt"
    if final.exists() and not args.no_resume:
        return _load_final(final)
    cfg = ldm_restart_config(args)
    first = init
    if first is None:
        first = torch.load(workdir / "ldm_state.pt", map_location="cpu", weights_only=True)
    if cfg.procs > 1:
        return train_ldm_parallel(
            workdir,
            data,
            cfg,
            final,
            resume=not args.no_resume,
            vae=vae,
            init=first,
            state_file="ldm_restart_state.pt",
        )
    models = train_ldm(
        workdir,
        data,
        cfg,
        resume=not args.no_resume,
        judge=judge,
        vae=vae,
        init=first,
        state_file="ldm_restart_state.pt",
    )
    _save_final(models, cfg, final)
    return models


def init_from_checkpoint(ckpt) -> dict:
    """Weights of a shipped demo file as a warm-restart `init` (its EMA weights start both)."""
    unet = {k: v.float() for k, v in ckpt.unet.state_dict().items()}
    text = {k: v.float() for k, v in ckpt.text_encoders[0].state_dict().items()}
    return {"unet": unet, "text_encoder": text, "ema_unet": unet, "ema_text_encoder": text}


def demo_metadata(
    scale_factor: float,
    gate: dict | None,
    models: DemoModels,
    vae: AutoencoderKL,
    extra: dict | None = None,
    ldm_schedule: str = "one cosine cycle",
) -> dict[str, str]:
    """`__metadata__` of the shipped file: what it is, what it draws and how it was made.

    `ldm_schedule` says how the text encoder and UNet were trained ("one cosine cycle", ...).
    """
    meta = {
        "modelspec.title": "demo-shapes",
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.description": (
            "A tiny latent diffusion model trained from scratch in this repository on a synthetic "
            "world: one or two flat-coloured shapes on a plain background, 64x64."
        ),
        "modelspec.prediction_type": "v" if models.prediction == "v" else "epsilon",
        **({"modelspec.ztsnr": "true"} if models.zero_terminal_snr else {}),
        "ldm.name": "demo-shapes",
        "ldm.default_size": "64",
        "ldm.resolution": "64",
        "ldm.scale_factor": f"{scale_factor:.6f}",
        "ldm.vocabulary.colours": ", ".join(world.COLOUR_NAMES),
        "ldm.vocabulary.shapes": ", ".join(world.SHAPES),
        "ldm.vocabulary.sizes": ", ".join(world.SIZES),
        "ldm.vocabulary.positions": ", ".join(world.POSITION_NAMES),
        "ldm.example_prompt": "a large red circle on the left on a white background",
        "ldm.recommended": "20 steps, DPM++ 2M, CFG 5, 64x64",
        "ldm.training": (
            "python -m ldm_core.training.train_demo (ldm_core/training): KL autoencoder f=8 "
            "(L1+L2+low-res L1+edge terms, shapes weighted over background, KL 1e-6) on fresh "
            "renders in two cosine cycles, its decoder then fine-tuned with the encoder frozen; "
            "then CLIP text encoder and UNet trained jointly on posterior-mean latents x scale "
            f"factor in {ldm_schedule}, {models.prediction} objective, SD scaled-linear "
            "betas (0.00085-0.012, 1000 steps"
            f"{', rescaled to zero terminal SNR' if models.zero_terminal_snr else ''}), "
            "x0-error weight min(max(SNR, 1), 5), captions "
            "from train templates and a phrase grammar with word noise, some leaving out the "
            "position or background, 10% caption dropout, "
            "AdamW, EMA weights exported in fp16"
        ),
        "ldm.params.unet": str(count_parameters(models.unet)),
        "ldm.params.text_encoder": str(count_parameters(models.text_encoder)),
        "ldm.params.vae": str(count_parameters(vae)),
    }
    if gate is not None:
        meta["ldm.ae_gate"] = json.dumps(
            {k: gate[k] for k in ("renders", "reconstructions", "passed")}
        )
    meta.update(extra or {})
    return meta


@torch.no_grad()
def export_demo(
    path: str | Path,
    models: DemoModels,
    vae: AutoencoderKL,
    scale_factor: float,
    metadata: dict[str, str],
) -> dict[str, float]:
    """Write the SD1 single file in fp16 and check that `load_checkpoint` reproduces the networks.

    Returns the max abs differences between the loaded networks and in-memory copies whose
    weights went through the same fp16 rounding.
    """
    from ldm_core.loader import load_checkpoint, save_components

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_components(
        path,
        unet=models.unet,
        vae=vae,
        text_encoder=models.text_encoder,
        scale_factor=scale_factor,
        metadata=metadata,
        dtype=torch.float16,
    )
    ckpt = load_checkpoint(path, device="cpu", dtype=torch.float32)
    if abs(ckpt.scale_factor - scale_factor) > 1e-3 * scale_factor:
        raise RuntimeError(
            f"{path}: scale factor {ckpt.scale_factor} after loading, expected {scale_factor}"
        )
    if ckpt.prediction.value != models.prediction:
        raise RuntimeError(
            f"{path}: detected {ckpt.prediction.value}-prediction, trained {models.prediction}"
        )
    if ckpt.spec.zero_terminal_snr != models.zero_terminal_snr:
        raise RuntimeError(
            f"{path}: detected zero-terminal-SNR {ckpt.spec.zero_terminal_snr}, "
            f"trained with {models.zero_terminal_snr}"
        )

    def rounded(module: nn.Module) -> nn.Module:
        return copy.deepcopy(module).half().float().eval()

    unet, text, ae = rounded(models.unet), rounded(models.text_encoder), rounded(vae)
    ids = tokenize(["a large red circle on the left on a white background", ""])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999.0, 10.0])
    ctx = text(ids)
    diffs = {
        "text_encoder": float((ckpt.text_encoders[0](ids) - ctx).abs().max()),
        "unet": float((ckpt.unet(x, t, ctx) - unet(x, t, ctx)).abs().max()),
        "vae": float((ckpt.vae.decode(x) - ae.decode(x)).abs().max()),
    }
    log.info("export: %s (%.1f MB), load-back max diffs %s", path, path.stat().st_size / 1e6, diffs)
    if max(diffs.values()) > 1e-3:
        raise RuntimeError(f"{path}: loaded networks differ from the trained ones: {diffs}")
    return diffs


def stage_export(
    args,
    models: DemoModels,
    vae: AutoencoderKL,
    scale_factor: float,
    gate: dict | None,
    extra: dict[str, str] | None = None,
):
    """Write `args.out` with `vae` as given (the autoencoder the LDM learnt from: fine-tuned
    decoder, balanced channels); `extra` metadata overrides what the recipe's arguments say."""
    # the arguments that shaped the weights, so a file says which recipe made it
    recipe = {
        k: v
        for k, v in sorted(vars(args).items())
        if k.startswith(
            (
                "ae_",
                "ldm_",
                "text_",
                "decoder_",
                "perceptual_",
                "restart_perceptual_",
                "num_",
                "latent_",
                "seed",
                "continue_from",
                "ztsnr",
            )
        )
    }
    if recipe.get("continue_from"):  # the file's name, not a path on the trainer's machine
        recipe["continue_from"] = Path(recipe["continue_from"]).name
        schedule = f"a further cosine cycle on {recipe['continue_from']}"
    elif getattr(args, "ldm_restart_minutes", 0) > 0:
        schedule = "two cosine cycles"
    else:
        schedule = "one cosine cycle"
    if getattr(args, "text_minutes", 0) > 0 and not recipe.get("continue_from"):
        schedule += (
            " (the text encoder first trained alone to classify training captions into their "
            "scenes' labels)"
        )
    meta = demo_metadata(
        scale_factor,
        gate,
        models,
        vae,
        extra={"ldm.recipe": json.dumps(recipe), **(extra or {})},
        ldm_schedule=schedule,
    )
    return export_demo(args.out, models, vae, scale_factor, meta)
