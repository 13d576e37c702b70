"""Stage 1 of the demo recipe: the KL-regularised autoencoder (LDM paper, Rombach et al. 2022).

The autoencoder is our `AutoencoderKL` with a small config (f = 8: 64x64x3 -> 8x8x4), trained
on fresh renders of the synthetic world with an L1 + L2 reconstruction loss, an L1 loss on 4x
average-pooled images (flat colours must survive exactly: the judge reads them), and a tiny KL
weight. Training is bounded by wall-clock time, checkpoints every few minutes and resumes.

Afterwards `latent_scale_factor` gives 1 / std of the posterior means, and `gate_autoencoder`
checks that the judge reads reconstructions as well as the renders themselves.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm_core.config import VAEConfig
from ldm_core.nn.autoencoder import AutoencoderKL
from ldm_core.training import world
from ldm_core.training.checkpoints import save_atomic
from ldm_core.training.optim import adamw

log = logging.getLogger(__name__)

# 32-64-128-128 channels: the first run's 32-64 one drew small shapes too vaguely for the judge
# (87% shape on reconstructions); 128 channels at the 16x16 and 8x8 levels cost 1.4x the time.
DEMO_VAE_CONFIG = VAEConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1, scale_factor=1.0)


def vae_config_for_channels(channels: Sequence[int]) -> VAEConfig:
    """The demo autoencoder with `channels` channels at its four levels (64, 32, 16 and 8 pixels).

    Each count must be a multiple of the 32 GroupNorm groups every SD VAE has (the groups are
    not stored in a checkpoint, so a file with other groups would load wrongly elsewhere) and of
    the first count (SD's layout gives the levels as multiples of `ch`). At 32 channels each
    group holds one channel, so the norm erases a flat region's level: a flat background's
    colour has to reach the output through spatial patterns instead.
    """
    channels = tuple(int(c) for c in channels)
    if len(channels) != 4:
        raise ValueError(f"the demo autoencoder has 4 levels (f = 8), got {len(channels)} counts")
    groups = DEMO_VAE_CONFIG.norm_groups
    if any(c <= 0 or c % groups for c in channels):
        raise ValueError(f"channel counts must be positive multiples of {groups}: {channels}")
    if any(c % channels[0] for c in channels):
        raise ValueError(f"channel counts must be multiples of the first: {channels}")
    ch = channels[0]
    return replace(DEMO_VAE_CONFIG, ch=ch, ch_mult=tuple(c // ch for c in channels))


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX).

    Without them, bf16 autocast on the CPU falls back to reference convolutions: measured on an
    AMD EPYC with AVX2 only, one autoencoder training step (batch 16) took 30 s in bf16 against
    1.1 s in fp32, while on a Xeon with AMX bf16 was the faster of the two.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class AETrainConfig:
    minutes: float = 25.0
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    kl_weight: float = 1e-6
    l2_weight: float = 1.0
    lowres_weight: float = 1.0
    foreground_weight: float = 5.0
    edge_weight: float = 1.0
    decoder_only: bool = False  # fine-tune post_quant_conv + decoder only (encoder frozen)
    # weight of the feature-matching term (`feature_distance`): the conv features of the
    # perceptual network in `perceptual_net` (a file of `train_perceptual_net`) of the
    # reconstruction against the image's, LPIPS-style; 0 leaves it out
    perceptual_weight: float = 0.0
    perceptual_net: str = ""
    seed: int = 0
    checkpoint_minutes: float = 3.0
    log_every: int = 25
    bf16: bool = field(default_factory=lambda: cpu_has_fast_bf16())
    threads: int = 2
    max_steps: int | None = None  # tests: stop after this many steps whatever the time
    # the first this many steps train on renders downscaled 2x (`training_batch`): the loss's
    # plateau ends after about 550 of them at 32x32 pixels against about 1,000 at 64x64
    lowres_steps: int = 0
    # weight of the colour-separation term (`colour_separation`): the first half of each batch is
    # rendered again with the main object in a neighbouring colour (`colour_twins`), and twins
    # whose posterior means lie closer than `colour_margin` (in units of the batch's latent spread,
    # as the scale factor will measure them) are pushed apart; 0 leaves it out. Measured
    # (docs/demo-model.md): on r99's 64x64 chain (r114, margin 2) it bought no colour and cost the
    # gate; with the 32x32 start (r115, margin 1.2, `train_demo --recipe 90min`) it acts only in
    # the 32x32 steps, undoing what they do to colour, and the run met every bar
    colour_weight: float = 0.0
    colour_margin: float = 2.0


def time_cosine_lr(
    base_lr: float, step: int, progress: float, warmup_steps: int, min_ratio: float
) -> float:
    """Linear warm-up over steps, then cosine decay over the fraction of the time budget used."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return base_lr * warm * (min_ratio + (1 - min_ratio) * cos)


class ThreadTuner:
    """Chooses 1 or `max_threads` torch threads by measured step time.

    The machine is shared: when other processes hold a core, two OpenMP threads can be far slower
    than one (they wait for each other at every barrier). Every `period` steps (or `period_seconds`)
    the other thread count is tried for `probe` steps and kept if its median step time is lower.
    A probe costs time when it loses (on the idle 2-core machine one thread is about 1.6x slower:
    probing every 40 steps cost some 7% of each stage), so each probe that keeps the count doubles
    the wait before the next, up to `max_backoff` times; a switch resets it, and so does the step
    time drifting `slowdown` times above the one measured at the last decision (another process
    took a core), which probes at once.
    """

    def __init__(
        self,
        max_threads: int,
        period: int = 40,
        probe: int = 6,
        period_seconds: float = 90.0,
        max_backoff: int = 16,
        slowdown: float = 1.3,
        clock=time.monotonic,
    ):
        self.max_threads, self.period, self.probe = max_threads, period, probe
        self.period_seconds, self.max_backoff, self.slowdown = period_seconds, max_backoff, slowdown
        self.clock = clock
        self.current = max_threads
        torch.set_num_threads(self.current)
        self.history: list[float] = []
        self.trial: list[float] | None = None
        self.since = 0
        self.backoff = 1
        self.reference: float | None = None  # median step time of the count chosen last
        self.last_switch = clock()

    def record(self, seconds: float) -> None:
        if self.max_threads <= 1:
            return
        if self.trial is not None:
            self.trial.append(seconds)
            if len(self.trial) > self.probe:  # the first step at a new count warms the pool up
                self._decide()
            return
        self.history.append(seconds)
        self.since += 1
        if len(self.history) < self.probe:
            return
        due = (
            self.since >= self.period * self.backoff
            or self.clock() - self.last_switch > self.period_seconds * self.backoff
        )
        recent = _median(self.history[-self.probe :])
        if self.reference is not None and recent > self.slowdown * self.reference:
            due, self.backoff = True, 1
        if due:
            self.last_switch = self.clock()
            self.current = self._other(self.current)
            torch.set_num_threads(self.current)
            self.trial = []

    def _other(self, count: int) -> int:
        return 1 if count == self.max_threads else self.max_threads

    def _decide(self) -> None:
        tried, kept = self.current, self._other(self.current)
        base, alt = _median(self.history[-self.probe :]), _median(self.trial[1:])
        if alt >= base:
            self.current = kept
            self.backoff = min(self.backoff * 2, self.max_backoff)
        else:
            self.backoff = 1
        self.reference = min(base, alt)
        torch.set_num_threads(self.current)
        log.info(
            "threads: %d -> %.2f s/step, %d -> %.2f s/step; using %d (next probe in %d steps)",
            kept,
            base,
            tried,
            alt,
            self.current,
            self.period * self.backoff,
        )
        self.trial, self.since, self.history = None, 0, []


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


class StopFlag:
    """Set by SIGTERM / SIGINT so a training loop can checkpoint and return cleanly."""

    def __init__(self) -> None:
        self.stop = False
        try:
            signal.signal(signal.SIGTERM, self._set)
            signal.signal(signal.SIGINT, self._set)
        except ValueError:  # not the main thread (e.g. some test runners): no handler
            pass

    def _set(self, signum, frame) -> None:
        self.stop = True


Twins = tuple[list[int], torch.Tensor]  # (indices into the batch, renders [N, 3, H, W])


def training_batch(cfg: AETrainConfig, step: int) -> tuple[torch.Tensor, Twins | None]:
    """Step `step`'s renders [B, 3, H, W] and, with `cfg.colour_weight`, the `colour_twins` of
    its first half (else None); all downscaled 2x while `step < cfg.lowres_steps`.

    The autoencoder is convolutional, so it trains on 32x32 renders (4x4 latents) as on 64x64
    ones, at about a third of the time a step. Measured (seed 0, batch 16, lr 2e-3): at 64x64
    the weighted L1 sits at 0.45-0.54 for about 1,000 steps (8 minutes) before it falls, 0.196
    at 10.2 minutes; with the first 1,000 steps at 32x32 (2.7 minutes; its plateau ended after
    about 550) it was 0.163 at 64x64 by 3.9 minutes. A flat region's colour reaching the output
    through norms of one channel a group (`vae_config_for_channels`) is what the plateau waits for.
    """
    batch = world_batch(cfg.seed, step, cfg.batch_size)
    images, twins = batch.images, None
    if cfg.colour_weight > 0:
        twins = colour_twins(batch.scenes[: max(1, cfg.batch_size // 2)], step)
    if step < cfg.lowres_steps:
        images = F.avg_pool2d(images, 2)
        if twins is not None and len(twins[0]):
            twins = (twins[0], F.avg_pool2d(twins[1], 2))
    return images, twins


# The colour pairs the 90-minute runs' UNets confuse most (docs/demo-model.md).
NEIGHBOUR_COLOURS = (
    ("orange", "yellow"),
    ("orange", "red"),
    ("yellow", "white"),
    ("blue", "purple"),
    ("green", "blue"),
    ("red", "purple"),
)
# each colour's neighbours in those pairs, in their order
COLOUR_PARTNERS: dict[str, tuple[str, ...]] = {
    c: tuple(b if a == c else a for a, b in NEIGHBOUR_COLOURS if c in (a, b))
    for c in dict.fromkeys(c for pair in NEIGHBOUR_COLOURS for c in pair)
}


def colour_twins(scenes: Sequence[world.Scene], step: int) -> Twins:
    """For each scene whose main object has a neighbour in `NEIGHBOUR_COLOURS` other than the
    background: its index and a render of it with the main object in that colour (the partner,
    when a colour has several, chosen by `step` and the index). Returns (indices, images
    [N, 3, 64, 64])."""
    indices, images = [], []
    for i, scene in enumerate(scenes):
        options = [c for c in COLOUR_PARTNERS.get(scene.main.colour, ()) if c != scene.background]
        if not options:
            continue
        twin = replace(scene.main, colour=options[(step + i) % len(options)])
        indices.append(i)
        images.append(world.render(world.Scene((twin, *scene.objects[1:]), scene.background)))
    if not images:
        return [], torch.zeros(0, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    return indices, world.images_to_tensor(images)


def colour_separation(
    mean: torch.Tensor, twin_mean: torch.Tensor, indices: Sequence[int], margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hinge loss mean(relu(margin - d)) and the distances d [N]: d is the L2 distance between
    the posterior means of each scene `mean[indices]` and its colour twin `twin_mean`, divided by
    the batch's spread of posterior means (held fixed, as the scale factor 1 / std will be), so
    the encoder cannot meet it by scaling every latent up: only by giving colour more of the
    spread."""
    spread = mean.detach().std().clamp_min(1e-6)
    d = (mean[list(indices)] - twin_mean).flatten(1).norm(dim=1) / spread
    return F.relu(margin - d).mean(), d


def world_batch(seed: int, step: int, batch_size: int) -> world.WorldBatch:
    """The batch for one training step: a function of (seed, step) only, so resuming is exact."""
    return world.SceneStream(seed * 1_000_003 + step).batch(batch_size)


# The perceptual network: a classifier of the world's labels like the judge, but trained by the
# recipe itself, wider and from another seed, so the judge that gates the autoencoder and scores
# the model is never what the autoencoder was trained against (as LPIPS's VGG is not FID's
# Inception).
PERCEPTUAL_WIDTHS = (32, 48, 64, 96)


def train_perceptual_net(path: str | Path, steps: int, seed: int) -> nn.Module:
    """Train the perceptual network on fresh renders, save it to `path` (the judge's file format)
    and return its frozen conv stack. Uses torch's current thread count.

    Measured 2026-12-03: 800 steps in 74 s on 2 threads, then 99.8% of fresh renders' shapes and
    every other attribute read right."""
    from ldm_core.training import judge as judge_mod

    config = judge_mod.JudgeConfig(widths=PERCEPTUAL_WIDTHS)
    net = judge_mod.train_judge(steps, seed, path, config=config, eval_samples=1000)
    return net.features.eval().requires_grad_(False)


def perceptual_features(path: str | Path) -> nn.Module:
    """The frozen conv stack of a world classifier in the judge's file format (the perceptual
    network of `train_perceptual_net`): features for this world, as LPIPS uses VGG's for
    photographs."""
    from ldm_core.training import judge as judge_mod

    return judge_mod.load_judge(path).features.eval().requires_grad_(False)


def feature_distance(features: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS-style distance without learnt weights: after each activation of `features`, the
    squared difference of the channel-normalised feature vectors, averaged over positions and
    summed over layers. a, b [B, 3, H, W] -> scalar."""
    total = a.new_zeros(())
    x, y = a, b
    for layer in features:
        x, y = layer(x), layer(y)
        if isinstance(layer, nn.SiLU):
            nx = x / (x.norm(dim=1, keepdim=True) + 1e-6)
            ny = y / (y.norm(dim=1, keepdim=True) + 1e-6)
            total = total + (nx - ny).pow(2).sum(dim=1).mean()
    return total


def autoencoder_loss(
    ae: AutoencoderKL,
    images: torch.Tensor,
    cfg: AETrainConfig,
    generator: torch.Generator | None = None,
    features: nn.Module | None = None,
    twins: Twins | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction (L1 + L2 + low-res L1) + KL of a posterior draw. images [B, 3, H, W].

    Pixels that differ from the background (the top-left pixel: no object reaches a corner)
    weigh `foreground_weight` times more, so the few object pixels the judge reads are not
    drowned by the background. With `features` (and `cfg.perceptual_weight`), the distance of
    their activations (`feature_distance`) is added. With `twins` (`training_batch`) and
    `cfg.colour_weight`, the colour-separation hinge (`colour_separation`).
    """
    use_twins = twins is not None and len(twins[0]) > 0 and cfg.colour_weight > 0
    use_twins = use_twins and not cfg.decoder_only
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        if cfg.decoder_only:  # frozen encoder: decode the posterior mean, as the LDM's samples are
            with torch.no_grad():
                mean, logvar = ae.encode_moments(images)
            z = mean
        else:
            mean, logvar = ae.encode_moments(images)
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        recon = ae.decode(z)
        twin_mean = ae.encode_moments(twins[1])[0] if use_twins else None
    recon = recon.float()
    mean, logvar = mean.float(), logvar.float()
    background = images[:, :, :1, :1]  # [B, 3, 1, 1]
    foreground = ((images - background).abs().amax(dim=1, keepdim=True) > 0.05).float()
    weight = 1.0 + (cfg.foreground_weight - 1.0) * foreground  # [B, 1, H, W]
    l1 = ((recon - images).abs() * weight).mean()
    l2 = ((recon - images).pow(2) * weight).mean()
    low = (F.avg_pool2d(recon, 4) - F.avg_pool2d(images, 4)).abs().mean()
    # Shapes are told apart by their edges: match horizontal and vertical differences too.
    edge = (_dx(recon) - _dx(images)).abs().mean() + (_dy(recon) - _dy(images)).abs().mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
    loss = l1 + cfg.l2_weight * l2 + cfg.lowres_weight * low + cfg.edge_weight * edge
    loss = loss + cfg.kl_weight * kl
    parts = {
        "l1": l1.item(),
        "l2": l2.item(),
        "low": low.item(),
        "edge": edge.item(),
        "kl": kl.item(),
    }
    if features is not None and cfg.perceptual_weight > 0:
        perceptual = feature_distance(features, recon, images)
        loss = loss + cfg.perceptual_weight * perceptual
        parts["perc"] = perceptual.item()
    if use_twins:
        sep, d = colour_separation(mean, twin_mean.float(), twins[0], cfg.colour_margin)
        loss = loss + cfg.colour_weight * sep
        parts["sep"] = sep.item()
        parts["cdist"] = d.detach().mean().item()
    return loss, parts


def _dx(x: torch.Tensor) -> torch.Tensor:
    return x[..., :, 1:] - x[..., :, :-1]


def _dy(x: torch.Tensor) -> torch.Tensor:
    return x[..., 1:, :] - x[..., :-1, :]


def train_autoencoder(
    workdir: str | Path,
    cfg: AETrainConfig,
    vae_config: VAEConfig = DEMO_VAE_CONFIG,
    *,
    resume: bool = True,
    init: dict[str, torch.Tensor] | None = None,
    state_file: str | None = None,
) -> AutoencoderKL:
    """Train (or resume) the autoencoder in `workdir/ae_state.pt` until the time budget is spent.

    `init` starts from given weights (with a fresh optimiser and learning-rate schedule: a warm
    restart); `state_file` names the checkpoint of such a run so it resumes on its own.

    With `cfg.decoder_only` it fine-tunes the decoder of the autoencoder `init` (a state dict)
    with the encoder frozen, in `workdir/ae_decoder_state.pt`: the latents, and so a UNet trained
    on them, stay valid (Stable Diffusion's ft-MSE VAE was made the same way).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    default_file = "ae_decoder_state.pt" if cfg.decoder_only else "ae_state.pt"
    state_path = workdir / (state_file or default_file)
    torch.manual_seed(cfg.seed)
    ae = AutoencoderKL(vae_config)
    if init is not None:
        ae.load_state_dict(init)
    trained = (
        [*ae.post_quant_conv.parameters(), *ae.decoder.parameters()]
        if cfg.decoder_only
        else list(ae.parameters())
    )
    if cfg.decoder_only:
        ae.encoder.requires_grad_(False)
        ae.quant_conv.requires_grad_(False)
    opt = adamw(trained, lr=cfg.lr, weight_decay=0.0)
    step, elapsed = 0, 0.0
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        ae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        log.info("autoencoder: resumed at step %d (%.1f min done)", step, elapsed / 60)
    params = sum(p.numel() for p in ae.parameters())
    log.info("autoencoder: %s, %.2fM parameters, config %s", vae_config, params / 1e6, asdict(cfg))

    budget = cfg.minutes * 60.0
    generator = torch.Generator().manual_seed(cfg.seed + step)
    ae.train()
    start = time.monotonic() - elapsed
    last_ckpt = time.monotonic()
    window_t, window_steps, sums = time.monotonic(), 0, {}
    tuner = ThreadTuner(cfg.threads)
    stop = StopFlag()
    features = None
    if cfg.perceptual_weight > 0:
        if not cfg.perceptual_net:
            raise ValueError("perceptual_weight > 0 needs perceptual_net (a network file)")
        features = perceptual_features(cfg.perceptual_net)

    def checkpoint() -> None:
        save_atomic(
            state_path,
            {
                "model": ae.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "elapsed": time.monotonic() - start,
            },
        )

    while True:
        elapsed = time.monotonic() - start
        if elapsed >= budget or (cfg.max_steps is not None and step >= cfg.max_steps):
            break
        if stop.stop:
            checkpoint()
            raise SystemExit("autoencoder: interrupted, checkpoint saved")
        t_step = time.monotonic()
        lr = time_cosine_lr(cfg.lr, step, elapsed / budget, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        images, twins = training_batch(cfg, step)
        loss, parts = autoencoder_loss(ae, images, cfg, generator, features, twins)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        tuner.record(time.monotonic() - t_step)
        step += 1
        window_steps += 1
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        if step % cfg.log_every == 0:
            rate = window_steps / max(1e-9, time.monotonic() - window_t)
            means = " ".join(f"{k}={v / window_steps:.4f}" for k, v in sums.items())
            log.info(
                "ae step %d  %s  lr=%.2e  %.2f steps/s  %.1f/%.0f min",
                step,
                means,
                lr,
                rate,
                (time.monotonic() - start) / 60,
                cfg.minutes,
            )
            window_t, window_steps, sums = time.monotonic(), 0, {}
        if time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = time.monotonic()
    checkpoint()
    log.info("autoencoder: done, %d steps in %.1f min", step, (time.monotonic() - start) / 60)
    ae.eval()
    return ae


@torch.no_grad()
def encode_means(
    ae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256, bf16: bool = False
) -> torch.Tensor:
    """Posterior means [B, 4, h, w] (unscaled), in batches."""
    out = []
    for i in range(0, len(images), batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out.append(ae.encode(images[i : i + batch_size]).float())
    return torch.cat(out)


@torch.no_grad()
def reconstruct(ae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Decode(posterior mean) of images, clamped to [-1, 1]."""
    out = []
    for i in range(0, len(images), batch_size):
        out.append(ae.decode(ae.encode(images[i : i + batch_size])).clamp(-1, 1))
    return torch.cat(out)


@torch.no_grad()
def latent_scale_factor(ae: AutoencoderKL, num_images: int = 4096, seed: int = 12345) -> float:
    """1 / std of the posterior means over fresh renders (the LDM paper's rescaling)."""
    images = world.SceneStream(seed).batch(num_images).images
    means = encode_means(ae, images)
    return float(1.0 / means.float().std())


@torch.no_grad()
def balance_latent_channels(
    ae: AutoencoderKL, max_gain: float, num_images: int = 4096, seed: int = 12345
) -> tuple[list[float], float]:
    """Rescale `ae`'s latent channels in place so each one's posterior means spread as widely as
    the widest channel's, by a gain of at most `max_gain` (a channel the decoder hardly reads
    stays small). Returns the gains and the balanced latents' scale factor (as
    `latent_scale_factor`, from the same renders).

    The autoencoder's function is unchanged and its file keeps SD's layout: quant_conv's mean
    rows are multiplied by the gain and its log-variance biases raised by 2 log(gain) (the
    posterior is the same distribution, scaled), post_quant_conv's input columns divided by it.
    What changes is the LDM's view: one global scale factor leaves a channel with half the others'
    spread learnt to half their relative precision (the diffusion loss weighs channels alike).
    """
    if max_gain < 1:
        raise ValueError(f"max_gain must be >= 1, not {max_gain}")
    means = encode_means(ae, world.SceneStream(seed).batch(num_images).images)
    std = means.std(dim=(0, 2, 3))
    gains = (std.max() / std.clamp_min(1e-12)).clamp(max=max_gain)
    d = ae.config.embed_dim
    quant, post = ae.quant_conv, ae.post_quant_conv
    quant.weight[:d] *= gains.view(-1, 1, 1, 1).to(quant.weight)
    quant.bias[:d] *= gains.to(quant.bias)
    quant.bias[d:] += 2 * gains.log().to(quant.bias)
    post.weight /= gains.view(1, -1, 1, 1).to(post.weight)
    return gains.tolist(), float(1.0 / (means * gains.view(1, -1, 1, 1)).std())


Judge = Callable[
    [torch.Tensor], dict[str, torch.Tensor]
]  # images [B,3,H,W] -> attr -> class ids [B]


def judge_classifier(path: str | Path | None = None) -> Judge:
    """The world's trained judge (`judge.load_judge`) as `images -> {attribute: class ids [B]}`."""
    from ldm_core.training import judge as judge_mod

    net = judge_mod.load_judge(path or judge_mod.DEFAULT_JUDGE_PATH)

    @torch.no_grad()
    def classify(images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = [net(chunk.float()) for chunk in images.split(256)]
        return {a: torch.cat([lg[a] for lg in logits]).argmax(dim=1) for a in logits[0]}

    return classify


@torch.no_grad()
def judge_accuracy(
    judge: Judge, images: torch.Tensor, labels: dict[str, torch.Tensor]
) -> dict[str, float]:
    preds = judge(images)
    return {a: float((preds[a] == labels[a]).float().mean()) for a in labels if a in preds}


@torch.no_grad()
def gate_autoencoder(
    ae: AutoencoderKL, judge: Judge, num_images: int = 512, seed: int = 777, tolerance: float = 0.01
) -> dict:
    """Judge accuracy per attribute on fresh renders and on their reconstructions.

    Passes when every attribute's reconstruction accuracy is within `tolerance` of the renders'.
    """
    # Single-object scenes: the judge is trained on (and reads) one main object.
    batch = world.SceneStream(seed, two_object_prob=0.0).batch(num_images)
    recon = reconstruct(ae, batch.images)
    on_renders = judge_accuracy(judge, batch.images, batch.labels)
    on_recons = judge_accuracy(judge, recon, batch.labels)
    mse = float((recon - batch.images).pow(2).mean())
    passed = all(on_recons[a] >= on_renders[a] - tolerance for a in on_renders)
    for a in on_renders:
        log.info("gate %-10s renders %.4f  reconstructions %.4f", a, on_renders[a], on_recons[a])
    log.info("gate reconstruction mse %.5f -> %s", mse, "PASS" if passed else "FAIL")
    return {"renders": on_renders, "reconstructions": on_recons, "mse": mse, "passed": passed}


@torch.no_grad()
def latent_colour_distances(
    ae: AutoencoderKL, scale_factor: float, scenes: int = 24
) -> dict[str, dict[str, float]]:
    """{size: {"a-b": mean L2 distance}} between the scaled latents of renders that differ only
    in the main object's colour, for each pair of `NEIGHBOUR_COLOURS`.

    Scene i of a pair: shape i mod 4, position i mod 9, the i mod 3-th of the backgrounds black,
    green, white, blue, red that is neither colour. The latents (posterior mean x `scale_factor`)
    have about unit spread, so a smaller distance asks the UNet to place a sample more precisely to
    draw the right hue: r113's autoencoder, the best reconstructing yet, put most neighbours 8-35%
    closer than the shipped file's, and its UNet drew colour worse.
    """
    out: dict[str, dict[str, float]] = {}
    for size in world.SIZES:
        row = {}
        for a, b in NEIGHBOUR_COLOURS:
            backgrounds = [c for c in ("black", "green", "white", "blue", "red") if c not in (a, b)]
            images = []
            for i in range(scenes):
                shape = world.SHAPES[i % len(world.SHAPES)]
                position = world.POSITION_NAMES[i % len(world.POSITION_NAMES)]
                for colour in (a, b):
                    obj = world.SceneObject(shape, colour, size, position)
                    images.append(world.render(world.Scene((obj,), backgrounds[i % 3])))
            z = ae.encode(world.images_to_tensor(images)) * scale_factor
            row[f"{a}-{b}"] = float((z[0::2] - z[1::2]).flatten(1).norm(dim=1).mean())
        out[size] = row
    return out
