"""Seeds and noise, reproducing A1111's `modules/rng.py` (ldm-formats.md §8.1).

Each image's noise comes from its own generator seeded with that image's seed, one image at a
time, so an image does not depend on the batch it was generated in. Generators are CPU
`torch.Generator`s by default, which makes a seed give the same noise on every device (A1111's
"RNG: CPU" setting); pass `generator_device="cuda"` for A1111's "GPU" setting on that device.
"""

from __future__ import annotations

import math
import secrets
import struct
from collections.abc import Sequence

import torch

MAX_RANDOM_SEED = 4294967294  # A1111: random.randrange(4294967294)
LATENT_DOWNSCALE = 8


def resolve_seed(seed: int | str | None, *, rng=None) -> int:
    """A concrete seed: -1, None or "" mean a random one (A1111 `get_fixed_seed`).

    `rng` (e.g. `random.Random(0)`) makes the random choice reproducible in tests.
    """
    if seed is None or seed == "":
        seed = -1
    elif isinstance(seed, str):
        try:
            seed = int(seed)
        except ValueError as err:
            raise ValueError(f"seed must be an integer, got {seed!r}") from err
    if seed == -1:
        return (
            int(rng.randrange(MAX_RANDOM_SEED))
            if rng is not None
            else secrets.randbelow(MAX_RANDOM_SEED)
        )
    return int(seed)


def seeds_for_batch(seed: int, n: int, *, subseed_strength: float = 0.0) -> list[int]:
    """Per-image seeds for `n` images: seed + i, or all `seed` when a variation seed is used."""
    return [int(seed) + (i if subseed_strength == 0 else 0) for i in range(n)]


def subseeds_for_batch(subseed: int, n: int) -> list[int]:
    """Per-image variation seeds: subseed + i (A1111 always increments them)."""
    return [int(subseed) + i for i in range(n)]


def create_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def randn(
    seed: int, shape: Sequence[int], *, generator_device: torch.device | str = "cpu"
) -> torch.Tensor:
    """float32 standard normal noise from a fresh generator seeded with `seed`."""
    generator = create_generator(seed, generator_device)
    return torch.randn(tuple(shape), generator=generator, device=generator_device)


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical interpolation of two [C, H, W] noises, normalised along dim 1.

    When the two are nearly parallel it falls back to `low*val + high*(1 - val)` — the weights
    swapped, exactly as A1111 does.
    """
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (
        torch.sin(val * omega) / so
    ).unsqueeze(1) * high


def _paste_centered(target: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Copy `noise` [C, h, w] into the centre of `target` [C, H, W] (cropping if larger)."""
    dx = (target.shape[2] - noise.shape[2]) // 2
    dy = (target.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    target[:, ty : ty + h, tx : tx + w] = noise[:, sy : sy + h, sx : sx + w]
    return target


class ImageRNG:
    """Per-image noise generators (A1111 `ImageRNG`).

    `shape` is one image's latent shape [C, H, W]. The first `next()` is the initial noise (with
    variation seed and resize-seed applied); later calls continue each image's generator and serve
    as the sampler noise stream. `eta_noise_seed_delta` (ENSD) reseeds the generators with
    seed + delta after the initial noise.
    """

    def __init__(
        self,
        shape: Sequence[int],
        seeds: Sequence[int],
        *,
        subseeds: Sequence[int] | None = None,
        subseed_strength: float = 0.0,
        seed_resize_from_h: int = 0,
        seed_resize_from_w: int = 0,
        eta_noise_seed_delta: int = 0,
        generator_device: torch.device | str = "cpu",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        latent_downscale: int = LATENT_DOWNSCALE,
    ) -> None:
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3:
            raise ValueError(f"ImageRNG shape must be [C, H, W] for one image, got {self.shape}")
        self.seeds = [int(s) for s in seeds]
        self.subseeds = None if subseeds is None else [int(s) for s in subseeds]
        self.subseed_strength = float(subseed_strength)
        self.seed_resize_from_h = int(seed_resize_from_h)
        self.seed_resize_from_w = int(seed_resize_from_w)
        self.eta_noise_seed_delta = int(eta_noise_seed_delta)
        self.generator_device = generator_device
        self.device = device
        self.dtype = dtype
        self.latent_downscale = latent_downscale
        self.generators = [create_generator(s, generator_device) for s in self.seeds]
        self.is_first = True

    def _out(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(xs).to(device=self.device, dtype=self.dtype)  # [B, C, H, W]

    def first(self) -> torch.Tensor:
        """The initial noise [B, C, H, W]."""
        noise_shape = self.shape
        if self.seed_resize_from_h > 0 and self.seed_resize_from_w > 0:
            f = self.latent_downscale
            noise_shape = (
                self.shape[0],
                self.seed_resize_from_h // f,
                self.seed_resize_from_w // f,
            )
        xs = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators, strict=True)):
            subnoise = None
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = self.subseeds[i] if i < len(self.subseeds) else 0
                subnoise = randn(subseed, noise_shape, generator_device=self.generator_device)
            if noise_shape != self.shape:
                noise = randn(seed, noise_shape, generator_device=self.generator_device)
            else:
                noise = torch.randn(self.shape, generator=generator, device=self.generator_device)
            if subnoise is not None:
                noise = slerp(self.subseed_strength, noise, subnoise)
            if noise_shape != self.shape:
                base = torch.randn(self.shape, generator=generator, device=self.generator_device)
                noise = _paste_centered(base, noise)
            xs.append(noise)
        if self.eta_noise_seed_delta:
            self.generators = [
                create_generator(s + self.eta_noise_seed_delta, self.generator_device)
                for s in self.seeds
            ]
        return self._out(xs)

    def next(self) -> torch.Tensor:
        """Initial noise on the first call, then the next draw of every image's generator."""
        if self.is_first:
            self.is_first = False
            return self.first()
        xs = [
            torch.randn(self.shape, generator=g, device=self.generator_device)
            for g in self.generators
        ]
        return self._out(xs)

    def noise_sampler(self):
        """A sampler `noise_sampler(sigma, sigma_next)` drawing from this stream."""
        return noise_sampler_from_rng(self)

    def brownian_noise_sampler(self, sigmas: torch.Tensor) -> BrownianTreeNoiseSampler:
        """Per-image Brownian-tree noise over the positive `sigmas`, seeded with the image seeds."""
        positive = sigmas[sigmas > 0]
        return BrownianTreeNoiseSampler(
            (len(self.seeds), *self.shape),
            float(positive.min()),
            float(sigmas.max()),
            seed=self.seeds,
            device=self.device,
            dtype=self.dtype,
        )


def noise_sampler_from_rng(rng: ImageRNG):
    """Adapt an ImageRNG to the sampler convention `noise_sampler(sigma, sigma_next)`."""
    return lambda sigma, sigma_next: rng.next()


# --- Brownian tree ------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _mix(*values: int) -> int:
    state = 0
    for v in values:
        state = _splitmix64(state ^ (v & _MASK64))
    return state & ((1 << 63) - 1)


class BrownianPath:
    """A seeded Brownian motion W on [t0, t1] (W(t0) = 0) that can be queried at any t.

    W(t) is a deterministic function of (seed, t): the interval is bisected to `depth` levels
    (32: leaves of ~2e-10 of the interval, about float32 resolution of sigma),
    each midpoint drawn from the Brownian bridge of its parent with noise keyed by its node index,
    and t inside the final interval gets a bridge sample keyed by t itself. Increments therefore
    add up across any partition, like torchsde's BrownianTree (not bit-identical to it).
    """

    def __init__(
        self,
        t0: float,
        t1: float,
        shape: Sequence[int],
        seed: int,
        *,
        depth: int = 32,
    ) -> None:
        if not t1 > t0:
            raise ValueError(f"Brownian path needs t0 < t1, got [{t0}, {t1}]")
        self.t0, self.t1 = float(t0), float(t1)
        self.shape = tuple(int(s) for s in shape)
        self.seed = int(seed)
        self.depth = depth
        self.w1 = math.sqrt(self.t1 - self.t0) * self._normal(1, 0)
        self._recent: dict[float, torch.Tensor] = {}  # samplers ask for each sigma twice

    def _normal(self, node: int, salt: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_mix(self.seed, node, salt))
        # float32 draws are several times faster than float64 ones; the sums stay in float64
        return torch.randn(self.shape, generator=generator).to(torch.float64)

    def __call__(self, t: float) -> torch.Tensor:
        """W(t), float64 [shape]; t is clamped into [t0, t1]."""
        t = min(max(float(t), self.t0), self.t1)
        if t not in self._recent:
            if len(self._recent) >= 4:
                self._recent.pop(next(iter(self._recent)))
            self._recent[t] = self._value(t)
        return self._recent[t]

    def _value(self, t: float) -> torch.Tensor:
        lo, hi = self.t0, self.t1
        w_lo, w_hi = torch.zeros(self.shape, dtype=torch.float64), self.w1
        if t == lo:
            return w_lo
        if t == hi:
            return w_hi
        node = 1
        for _ in range(self.depth):
            mid = 0.5 * (lo + hi)
            w_mid = 0.5 * (w_lo + w_hi) + math.sqrt((hi - lo) / 4) * self._normal(node, 1)
            if t == mid:
                return w_mid
            if t < mid:
                hi, w_hi, node = mid, w_mid, 2 * node
            else:
                lo, w_lo, node = mid, w_mid, 2 * node + 1
        frac = (t - lo) / (hi - lo)
        t_bits = struct.unpack("<q", struct.pack("<d", t))[0]
        std = math.sqrt((t - lo) * (hi - t) / (hi - lo))
        return w_lo + frac * (w_hi - w_lo) + std * self._normal(node, 2 + (t_bits << 2))


class BrownianTreeNoiseSampler:
    """Noise sampler (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma| over [sigma_min, sigma_max].

    `seed` is one int (one path for the whole batch) or one seed per image (batch-size
    independent, as A1111 seeds it); None draws a seed from torch's global generator.
    `x` is a tensor or a shape [B, C, H, W].
    """

    def __init__(
        self,
        x: torch.Tensor | Sequence[int],
        sigma_min: float,
        sigma_max: float,
        seed: int | Sequence[int] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(x, torch.Tensor):
            shape = tuple(x.shape)
            device = x.device if device is None else device
            dtype = x.dtype if dtype is None else dtype
        else:
            shape = tuple(int(s) for s in x)
        self.device, self.dtype = device, dtype or torch.float32
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, []).item())
        if isinstance(seed, int):
            self.paths = [BrownianPath(sigma_min, sigma_max, shape, seed)]
            self.batched = False
        else:
            seeds = list(seed)
            if len(seeds) != shape[0]:
                raise ValueError(f"{len(seeds)} seeds for a batch of {shape[0]}")
            self.paths = [BrownianPath(sigma_min, sigma_max, shape[1:], s) for s in seeds]
            self.batched = True

    def __call__(
        self, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float
    ) -> torch.Tensor:
        a, b = float(sigma), float(sigma_next)
        if a == b:
            raise ValueError("Brownian noise needs sigma != sigma_next")
        dw = [path(b) - path(a) for path in self.paths]
        w = torch.stack(dw) if self.batched else dw[0]
        return (w / math.sqrt(abs(b - a))).to(device=self.device, dtype=self.dtype)
